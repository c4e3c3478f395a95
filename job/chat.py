"""`peftopt chat RUN_DIR`: try what a run made on your own prompts: the adapter (on its base), the merged model, the
base, or a GGUF with the pinned llama.cpp, each prompt rendered with the run's chat template and answered greedily
(the spec's evaluation settings: system prompt, token budget, thinking), as the evaluate stage answers a suite.
Prompts come from `--prompt` (repeatable) or, on a terminal, one per line until an empty line or end of input.
"""
from __future__ import annotations

from pathlib import Path

from job.errors import SpecError
from job.rundir import RunDir, read_json
from job.spec import EvaluateSpec, JobSpec


def run_spec(run_dir: RunDir) -> JobSpec:
    """The run's resolved spec (spec.json), validated again: the directory may come from another writer."""
    from job.specfile import validate_data

    data = read_json(run_dir.spec_path)
    if data is None:
        raise SpecError(f"chat: {run_dir.root} is not a run directory (no spec.json): name one under your output_dir")
    return validate_data(data, str(run_dir.spec_path))


def targets_of(run_dir: RunDir) -> list[str]:
    """What the run has made that can answer, in the order a user would try them."""
    made = []
    if (run_dir.adapter_dir / "adapter_config.json").is_file():
        made.append("adapter")
    if (run_dir.merged_dir / "config.json").is_file():
        made.append("merged")
    made.append("base")
    made += [f"gguf-{quant}" for quant in run_dir.gguf_files()]
    return made


def answer(run_path: Path, target: str | None, prompts: list[str], max_new_tokens: int | None) -> tuple[str, list[dict]]:
    """(the target used, [{prompt, answer, stop_reason}])."""
    from job.evaluation import generate
    from job.stages import evaluate as evaluate_stage

    run_dir = RunDir(run_path)
    spec = run_spec(run_dir)
    available = targets_of(run_dir)
    target = target or available[0]
    if target == "gguf":
        target = next((t for t in available if t.startswith("gguf-")), "gguf")
    if target not in available:
        raise SpecError(f"chat: {run_dir.root} has no {target!r} to answer with; it has {', '.join(available)}")
    settings = spec.evaluate.model_dump() if spec.evaluate else {}  # its system prompt, budget and thinking
    evaluation = EvaluateSpec.model_construct(**{**settings, "prompts": prompts, "do_sample": False,
                                                 **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})})
    suite = [{"id": f"chat-{i}", "prompt": text} for i, text in enumerate(prompts)]
    if target.startswith("gguf-"):
        from job import llamacpp

        path = run_dir.gguf_dir / run_dir.gguf_files()[target.removeprefix("gguf-")]["file"]
        tokenizer = evaluate_stage._tokenizer(str(run_dir.merged_dir), spec)
        answers = generate.generate_gguf(llamacpp.find(), path, tokenizer, suite, evaluation)
    else:
        model, tokenizer = evaluate_stage.load_target(target, spec, run_dir)
        answers = generate.generate_hf(model, tokenizer, suite, evaluation)
    return target, [{"prompt": a["prompt"], "answer": a["answer"], "stop_reason": a["stop_reason"]} for a in answers]
