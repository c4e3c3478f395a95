"""On the GPU machine, after a finished t1 run: the evaluate stage's answers against the way it answered before
issue 37's changes, in one fresh process, with the times of both.

    python bench/gpu_eval_same.py RUN_DIR SPEC.json OUT.json [--set KEY=VALUE ...]

- adapter: the run's eval/adapter.jsonl (base dequantized once, library compile regions run eagerly) against the
  4-bit base with torch.compile regions compiled, as before;
- each GGUF: the run's answers (llama.cpp on all cores but one, beside the GPU target) against llama.cpp on every
  physical core, alone, as before.
The token ids must be equal.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from job.backends import unsloth

    unsloth.import_library()  # as the job: before transformers
    import torch
    from peft import PeftModel

    from job import llamacpp, modelsrc
    from job.evaluation import generate, suite
    from job.rundir import RunDir
    from job.specfile import load_spec
    from job.stages import evaluate as stage

    run_dir = RunDir(Path(sys.argv[1]))
    overrides = [a for a in sys.argv[4:] if a != "--set"]
    spec = load_spec(sys.argv[2], overrides)
    prompts = suite.load(spec.evaluate)
    out: dict = {}

    def rows(name):
        return [json.loads(line) for line in (run_dir.eval_dir / f"{name}.jsonl").read_text().splitlines()]

    # The adapter as before: 4-bit base, compiled regions compiled.
    real_stance = torch.compiler.set_stance
    torch.compiler.set_stance = lambda *a, **k: contextlib.nullcontext()
    started = time.perf_counter()
    location = modelsrc.model_location(spec, run_dir)
    model = PeftModel.from_pretrained(modelsrc.load_model(location, spec, "cuda"), str(run_dir.adapter_dir))
    tokenizer = stage._tokenizer(str(run_dir.adapter_dir), spec)
    loaded = time.perf_counter()
    before = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
    out["adapter_before_s"] = {"load": round(loaded - started, 2), "generate": round(time.perf_counter() - loaded, 2)}
    full = os.environ.get("EVAL_SAME_FULL", "1") == "1"  # 0: the comparisons only, not the extra passes' times
    started = time.perf_counter()
    again = generate.generate_hf(model, tokenizer, prompts, spec.evaluate) if full else before
    out["adapter_before_second_pass_s"] = round(time.perf_counter() - started, 2)
    torch.compiler.set_stance = real_stance
    del model
    now = rows("adapter")
    out["adapter_same_tokens"] = [a["token_ids"] for a in before] == [b["token_ids"] for b in now]
    out["adapter_second_pass_same"] = [a["token_ids"] for a in before] == [b["token_ids"] for b in again]
    out["adapter_first_difference"] = next(
        ({"prompt": i, "token": next((k for k, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y),
                                      min(len(a["token_ids"]), len(b["token_ids"])))}
         for i, (a, b) in enumerate(zip(before, now)) if a["token_ids"] != b["token_ids"]), None)
    # The new path in this process too (dequantized, eager), for its time beside the old one's
    if not full:
        return finish(out, llamacpp, generate, suite, stage, spec, run_dir, prompts, rows)
    started = time.perf_counter()
    model, tokenizer = stage.load_target("adapter", spec, run_dir)
    loaded = time.perf_counter()
    fresh = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
    out["adapter_now_s"] = {"load": round(loaded - started, 2), "generate": round(time.perf_counter() - loaded, 2)}
    out["adapter_now_same_as_run"] = [a["token_ids"] for a in fresh] == [b["token_ids"] for b in now]
    del model

    finish(out, llamacpp, generate, suite, stage, spec, run_dir, prompts, rows)


def finish(out, llamacpp, generate, suite, stage, spec, run_dir, prompts, rows) -> None:
    """Each GGUF's answers made alone, on the CPU and (with the CUDA build) on the GPU, against the run's."""
    tools = llamacpp.find()
    merged_tokenizer = stage._tokenizer(str(run_dir.merged_dir), spec)
    files = json.loads(run_dir.metrics_path.read_text())["gguf"]["files"]
    for quant, info in files.items():
        started = time.perf_counter()
        alone = generate.generate_gguf(tools, run_dir.gguf_dir / info["file"], merged_tokenizer, prompts, spec.evaluate)
        out[f"gguf-{quant}_alone_s"] = round(time.perf_counter() - started, 2)
        out[f"gguf-{quant}_same_tokens"] = [a["token_ids"] for a in alone] == [b["token_ids"] for b in rows(f"gguf-{quant}")]
        gpu = llamacpp.gpu_generation(tools)
        out["gguf_gpu_environment"] = gpu
        if gpu:  # the CUDA build alone, and its answers against the CPU build's
            started = time.perf_counter()
            on_gpu = generate.generate_gguf(tools, run_dir.gguf_dir / info["file"], merged_tokenizer, prompts,
                                            spec.evaluate, gpu=gpu)
            out[f"gguf-{quant}_gpu_alone_s"] = round(time.perf_counter() - started, 2)
            out[f"gguf-{quant}_gpu_same_as_run"] = [a["token_ids"] for a in on_gpu] == [b["token_ids"] for b in rows(f"gguf-{quant}")]
            out[f"gguf-{quant}_gpu_same_as_cpu"] = [a["token_ids"] for a in on_gpu] == [b["token_ids"] for b in alone]
            out[f"gguf-{quant}_gpu_vs_cpu"] = suite.agreement(alone, on_gpu)
    out["physical_cores"] = llamacpp.physical_cores()
    Path(sys.argv[3]).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
