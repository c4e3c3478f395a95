"""Why is evaluating the adapter slower inside the job than in a fresh process? (one-off GPU probe)

    python tests/gpu_probe_eval.py MODEL_DIR DATA.jsonl OUT_DIR [fresh]

Trains t1 for 30 steps with auto (unsloth) in this process, then answers the suite with the adapter three
ways, each timed per decode step, with the time spent in Python's garbage collector counted: as the job
does, after gc.freeze(), and (argument `fresh`) in a new process that never trained.
"""
from __future__ import annotations

import cProfile
import gc
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GC = {"s": 0.0, "n": 0, "t": 0.0}


def on_gc(phase, info):
    if phase == "start":
        GC["t"] = time.perf_counter()
    else:
        GC["s"] += time.perf_counter() - GC["t"]
        GC["n"] += 1 if info.get("generation") == 2 else 0


def answer(spec, run_dir, label: str, profile: bool = False) -> dict:
    import torch
    from peft import PeftModel

    from job import backends, modelsrc
    from job.evaluation import generate

    prompts = generate.load_suite(spec.evaluate)
    template = spec.model_copy(update={"model": spec.model.model_copy(update={"chat_template": "tokenizer"})})
    tokenizer, _ = modelsrc.load_tokenizer(str(run_dir.adapter_dir), template)
    model = PeftModel.from_pretrained(modelsrc.load_model(modelsrc.model_location(spec, run_dir), spec,
                                                          backends.device()), str(run_dir.adapter_dir))
    GC.update(s=0.0, n=0)
    gc.callbacks.append(on_gc)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    answers = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
    if profiler:
        profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    gc.callbacks.remove(on_gc)
    tokens = sum(len(a["token_ids"]) for a in answers)
    out = {"label": label, "generate_s": round(seconds, 2), "new_tokens": tokens,
           "ms_per_step": round(1000 * seconds / max(len(a["token_ids"]) for a in answers), 1),
           "gc_s": round(GC["s"], 2), "gen2_collections": GC["n"], "gc_objects": len(gc.get_objects()),
           "forward": type(model.base_model.model).forward.__qualname__,
           "forward_module": type(model.base_model.model).forward.__module__}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        out["profile"] = text.getvalue()[-6000:]
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    model_dir, data, out_dir = sys.argv[1:4]
    from job.cli import expandable_cuda_segments

    expandable_cuda_segments()
    from job.rundir import RunDir
    from job.runner import run_job
    from job.specfile import load_spec

    overrides = [f"model.base={model_dir}", f"data.source={data}", "push=null", "name=probe",
                 "train.max_steps=30", "export.merge=false", "export.gguf=[]", "evaluate.targets=[\"adapter\"]"]
    spec = load_spec("jobspecs/t1.json", overrides)
    if len(sys.argv) > 4 and sys.argv[4] == "fresh":
        spec = spec.model_copy(update={"output_dir": out_dir})
        if len(sys.argv) > 5:
            import unsloth  # noqa: F401  the import alone, as the job's process has it
        print(json.dumps(answer(spec, RunDir(Path(out_dir) / "probe"), sys.argv[5] if len(sys.argv) > 5 else "fresh")))
        return
    spec = spec.model_copy(update={"output_dir": out_dir})
    run_job(spec, output_dir=out_dir, only=["prepare", "train"], restart=False, dry_run=False)
    run_dir = RunDir(Path(out_dir) / "probe")
    results = [answer(spec, run_dir, "in-job", profile=True)]
    gc.collect()
    gc.freeze()
    results.append(answer(spec, run_dir, "in-job after gc.freeze"))
    gc.unfreeze()
    for extra in ([], ["fresh+unsloth-import"]):
        done = subprocess.run([sys.executable, __file__, model_dir, data, out_dir, "fresh", *extra],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith('{"label"')]
        results.append(json.loads(lines[-1]) if lines else {"label": "fresh", "error": done.stderr[-2000:]})
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}))
    print(results[0].get("profile", ""))


if __name__ == "__main__":
    main()
