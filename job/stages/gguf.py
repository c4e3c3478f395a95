"""GGUF: convert the merged model once with llama.cpp's converter, quantize each requested type with
llama-quantize, then prove every file works: load it with llama.cpp, answer the first prompts of the
suite with the model's own chat template, and compare the tokens with the merged transformers model's.
"""
from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from job import llamacpp, modelsrc, templates
from job.errors import ExternalError
from job.evaluation import generate, suite
from job.log import get_logger, route_library_logs
from job.rundir import RunDir, atomic_dir, file_sha256
from job.spec import EvaluateSpec, JobSpec

log = get_logger("peftopt.gguf")
FLOAT_TYPES = ("f32", "f16", "bf16")
EXACT_PREFIX = 8  # a float GGUF must reproduce at least this many greedy tokens (or all, if fewer)


def plan(types: list[str]) -> tuple[str | None, dict[str, str]]:
    """(the one conversion's outtype, how each type is made: 'convert' or 'quantize')."""
    floats = [t for t in types if t in FLOAT_TYPES]
    others = [t for t in types if t not in FLOAT_TYPES]
    if not floats and others == ["q8_0"]:
        return "q8_0", {"q8_0": "convert"}  # the converter writes q8_0 directly
    master = floats[0] if floats else "bf16"
    return master, {t: ("convert" if t == master else "quantize") for t in types}


def run(spec: JobSpec, run_dir: RunDir, ctx) -> dict:
    route_library_logs()
    tools = llamacpp.find()
    tokenizer, _ = modelsrc.load_tokenizer(str(run_dir.merged_dir), spec.model_copy(
        update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})}))
    evaluate = spec.evaluate or EvaluateSpec()
    prompts = generate.load_suite(evaluate)[: spec.export.verify_prompts] if spec.evaluate or \
        Path(evaluate.prompts).exists() else [{"id": "p0", "prompt": "Say hello.", "checks": {}}]
    master, how = plan(spec.export.gguf)
    files: dict[str, dict] = {}
    with atomic_dir(run_dir.gguf_dir) as out, ThreadPoolExecutor(1, thread_name_prefix="reference") as pool:
        # The merged model answers on the GPU (or a core) while the converter, a subprocess, works on another;
        # the thread logs with this stage's run and stage fields
        reference_job = pool.submit(contextvars.copy_context().run, merged_reference, spec, run_dir, tokenizer,
                                    prompts, evaluate)
        started = time.perf_counter()
        master_path = out / f"{spec.name}-{master}.gguf"
        llamacpp.convert(tools, run_dir.merged_dir, master_path, master, spec.export.tokenizer_pre)
        log.info("gguf_converted", outtype=master, seconds=round(time.perf_counter() - started, 2))
        reference = reference_job.result()
        for quant, method in how.items():
            path = out / f"{spec.name}-{quant}.gguf"
            started = time.perf_counter()
            if method == "quantize":
                llamacpp.quantize(tools, master_path, path, quant)
            files[quant] = {"file": path.name, "method": method, "seconds": round(time.perf_counter() - started, 2)}
        if master not in how:
            master_path.unlink()
        for quant, info in files.items():
            path = out / info["file"]
            info.update(size_bytes=path.stat().st_size, sha256=file_sha256(path))
            info["verify"] = verify(tools, path, quant, tokenizer, prompts, reference, evaluate)
            log.info("gguf_verified", type=quant, **{k: v for k, v in info.items() if k != "verify"},
                     agreement=info["verify"]["agreement"], tokenizer_match=info["verify"]["tokenizer_match"])
        (out / "Modelfile").write_text(modelfile(spec, tokenizer, files))
    results = {"llama_cpp": tools.version, "files": files}
    artifacts = ["gguf/Modelfile"] + [f"gguf/{f['file']}" for f in files.values()]
    if spec.evaluate and "gguf" in spec.evaluate.targets:
        full_suite = generate.load_suite(spec.evaluate)
        for quant, info in files.items():
            started = time.perf_counter()
            answers = answer_suite(tools, run_dir.gguf_dir / info["file"], tokenizer, full_suite, spec.evaluate)
            results.setdefault("eval", {})[quant] = suite.record(run_dir, f"gguf-{quant}", full_suite, answers)
            results["eval"][quant]["timing"] = suite.timing(answers, 0.0, time.perf_counter() - started)
            artifacts.append(f"eval/gguf-{quant}.jsonl")
    return {"artifacts": artifacts, "metrics": results}


def merged_reference(spec, run_dir, tokenizer, prompts, evaluate) -> list[dict]:
    """Greedy answers of the merged transformers model: what a float GGUF must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.backends import device

    # On the GPU when there is one: unsloth, once imported, patches Llama's forward for CUDA only.
    model = AutoModelForCausalLM.from_pretrained(str(run_dir.merged_dir), dtype=torch.float32).to(device())
    greedy = evaluate.model_copy(update={"do_sample": False})
    answers = generate.generate_hf(model, tokenizer, prompts, greedy, max_new_tokens=spec.export.verify_tokens)
    del model
    return answers


def verify(tools, path: Path, quant: str, tokenizer, prompts: list[dict], reference: list[dict],
           evaluate: EvaluateSpec) -> dict:
    """Raises ExternalError when the GGUF does not load, answers nothing, or (float types) disagrees."""
    texts = [generate.render(tokenizer, item["prompt"], evaluate.system_prompt) for item in prompts]
    longest = max(len(ref["token_ids"]) + (1 if ref["stop_reason"] == "end_of_turn" else 0) for ref in reference)
    results = llamacpp.generate_many(tools, path, texts, max(longest, 1))
    per_prompt, tokenizer_match, agreements = [], True, []
    for item, text, ref, result in zip(prompts, texts, reference, results):
        tokenizer_match &= result.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        want, got = ref["token_ids"], result.token_ids
        common = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        agreements.append(common / len(want) if want else float(not got))
        per_prompt.append({"id": item["id"], "gguf_tokens": got, "merged_tokens": want, "common_prefix": common,
                           "text": result.text})
    if not any(p["gguf_tokens"] for p in per_prompt) and any(p["merged_tokens"] for p in per_prompt):
        raise ExternalError(f"{path.name}: llama.cpp loaded it but produced no output")
    report = {"tokenizer_match": tokenizer_match, "agreement": round(sum(agreements) / len(agreements), 4),
              "prompts": per_prompt}
    if quant in FLOAT_TYPES:
        if not tokenizer_match:
            raise ExternalError(f"{path.name}: llama.cpp tokenizes the prompt differently from the merged "
                                "model's tokenizer (the tokenizer was lost in conversion)")
        short = [p["id"] for p in per_prompt if p["common_prefix"] < min(EXACT_PREFIX, len(p["merged_tokens"]))]
        if short:
            raise ExternalError(f"{path.name}: greedy tokens differ from the merged model's within the first "
                                f"{EXACT_PREFIX} on prompt(s) {', '.join(short)}")
    return report


def answer_suite(tools, path: Path, tokenizer, prompts: list[dict], evaluate: EvaluateSpec) -> list[dict]:
    """The whole suite in one llama.cpp process that decodes the prompts together."""
    started = time.perf_counter()
    texts = [generate.render(tokenizer, item["prompt"], evaluate.system_prompt) for item in prompts]
    results = llamacpp.generate_many(tools, path, texts, evaluate.max_new_tokens)
    seconds = round((time.perf_counter() - started) / max(len(prompts), 1), 3)
    return [{"id": item["id"], "prompt": item["prompt"], "answer": result.text.strip(),
             "token_ids": result.token_ids, "prompt_tokens": len(result.prompt_ids),
             "stop_reason": result.stop_reason, "seconds": seconds, "batch_size": len(prompts)}
            for item, result in zip(prompts, results)]


def modelfile(spec: JobSpec, tokenizer, files: dict[str, dict]) -> str:
    """An Ollama Modelfile for the smallest-but-safest file (q8_0 first), with template and stop tokens."""
    order = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "bf16", "f16"]
    chosen = next((q for q in order if q in files), next(iter(files)))
    name = next((k for k, v in templates.BUILTIN.items() if v == tokenizer.chat_template), None)
    lines = [f"# Ollama Modelfile for {spec.name}: ollama create {spec.name} -f Modelfile",
             f"FROM ./{files[chosen]['file']}"]
    if name:
        lines.append(f'TEMPLATE """{templates.OLLAMA[name]}"""')
    for stop in templates.stop_strings(tokenizer.chat_template or "", tokenizer.eos_token):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
