"""The model card pushed with each repo: what was trained on what, how it scored, and how to run it.

Everything in it is public: no local path (a file the spec names appears by its file name), and the YAML
front matter holds only values quoted for YAML (JSON strings, which YAML reads as they are).
"""
from __future__ import annotations

import json
from typing import Any

from job import methods
from job.rundir import RunDir, read_json
from job.spec import REPO_ID, JobSpec


def public(value: str) -> str:
    """A local path by its file name; anything else as it is."""
    return value.rstrip("/").rsplit("/", 1)[-1] if value.startswith(("/", ".")) else value


def public_spec(spec: JobSpec) -> dict[str, Any]:
    """The resolved spec with every local path reduced to its file name."""
    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return public(node) if isinstance(node, str) else node

    return walk(spec.model_dump(mode="json", exclude={"output_dir"}))


def chain_origin(spec: JobSpec) -> str | None:
    """The model a chain of runs started from (`run:A` whose own base is `run:B` ... whose base is a Hub id)."""
    from job.modelsrc import earlier_run

    base, seen = spec.model.base, set()
    while base.startswith("run:") and base not in seen:
        seen.add(base)
        earlier = (read_json(earlier_run(spec.model_copy(update={"model": spec.model.model_copy(
            update={"base": base})})) / "spec.json") or {}).get("model", {}).get("base")
        if not isinstance(earlier, str):
            return None
        base = earlier
    return public(base)


def render(spec: JobSpec, run_dir: RunDir, repo: str) -> str:
    metrics = read_json(run_dir.metrics_path) or {}
    train, gguf = metrics.get("train", {}), metrics.get("gguf", {})
    summary = (read_json(run_dir.eval_dir / "summary.json") or {}).get("targets", {})
    base, origin = public(spec.model.base), chain_origin(spec)
    front = ["---"] + ([f"base_model: {json.dumps(origin)}"] if origin and REPO_ID.match(origin) else []) + \
        ["library_name: peft", "tags: [peftopt, lora, gguf" + (f", {spec.train.method}" if spec.train and
                                                                 spec.train.method != "sft" else "") + "]", "---"]
    lines = [*front, "",
             f"# {spec.name}", "", spec.description or "", "",
             "## Training", "",
             f"- Base model: `{base}`" + (f", the merged model of that run (from `{origin}`)" if
                                          spec.model.base.startswith("run:") else "") +
             (" (4-bit NF4 during training)" if spec.model.load_in_4bit else ""),
             ]
    if spec.train:
        method = methods.get(spec.train.method)
        lines.append(f"- Method: {method.name} ({method.doc}"
                     + (f", beta {spec.train.beta_value()})" if "beta" in method.fields else ")"))
    for source in spec.data.all_sources() if spec.data else []:  # a local path is named by its file only
        name = public(source.source)
        share = f", weight {source.weight}" if source.weight else f", {source.num_samples} samples" \
            if source.num_samples else ""
        lines.append(f"- Data: `{name}` split `{source.split}`{share}")
    if spec.data and spec.data.num_samples:
        lines.append(f"- Rows: at most {spec.data.num_samples}")
    if spec.lora and spec.train:
        lines += [f"- LoRA: r={spec.lora.r}, alpha={spec.lora.alpha}, dropout={spec.lora.dropout}, "
                  f"targets={spec.lora.target_modules}",
                  f"- Steps: {train.get('global_step') or spec.train.max_steps}"
                  f"{f' ({spec.train.epochs:g} epochs)' if spec.train.epochs else ''}, "
                  f"{spec.train.per_device_batch_size} x "
                  f"{spec.train.gradient_accumulation_steps} sequences per step, lr {spec.train.learning_rate}"]
    for key, label in (("final_loss", "Final loss"), ("runtime_s", "Training time (s)"),
                       ("tokens_per_s", "Tokens/s"), ("peak_gpu_gb", "Peak GPU memory (GB)"),
                       ("backend", "Backend")):
        if train.get(key) is not None:
            lines.append(f"- {label}: {train[key]}")
    if summary:
        lines += ["", "## Evaluation (automatic checks)", "", "| target | pass rate | leaking answers |", "|---|---|---|"]
        lines += [f"| {t} | {s.get('pass_rate')} | {s.get('leaking_answers')} |" for t, s in summary.items()]
    lines += ["", "## Use", "", "transformers + peft:", "", "```python",
              "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
              f"model = AutoPeftModelForCausalLM.from_pretrained({spec.push.adapter_repo or repo!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({spec.push.adapter_repo or repo!r})", "```"]
    files = gguf.get("files", {})
    if files:
        first = next(iter(files.values()))["file"]
        lines += ["", "llama.cpp:", "", "```sh", f"llama-cli -hf {spec.push.gguf_repo or repo} -cnv  # or -m {first}",
                  "```", "", "Ollama (the repo holds a Modelfile with the chat template and stop tokens):", "",
                  "```sh", f"ollama create {spec.name} -f Modelfile && ollama run {spec.name}", "```", "",
                  "| file | size (bytes) | sha256 |", "|---|---|---|"]
        lines += [f"| {f['file']} | {f['size_bytes']} | `{f['sha256'][:16]}…` |" for f in files.values()]
    lines += ["", "Made with [peftopt](https://github.com/) from this jobspec:", "", "```json",
              json.dumps(public_spec(spec), indent=2), "```", ""]
    return "\n".join(lines)
