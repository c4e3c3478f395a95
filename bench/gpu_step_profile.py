"""Where a steady training step's time goes on the GPU: `peftopt bench`'s worker (the job's own trainer set-up, the
plan `peftopt run` makes) with torch's profiler over a few steps after the warm-up.

    [BACKEND=hf] python3 bench/gpu_step_profile.py SPEC OUT_DIR DATA.jsonl [key=value ...]   (overrides, as --set)

BACKEND: the training backend (unsloth, the default, or hf).

OUT_DIR gets profile.json (the step's wall clock, the GPU's busy time in it, the gaps where it waits for the host,
the kernels by total time, grouped), steps.trace.json.gz (chrome://tracing / Perfetto), kernels.txt, and syncs.txt
(each call that makes the host wait for the GPU in one later step, with its Python stack).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

SKIP, WARMUP, ACTIVE = 6, 2, 4  # steps: not traced, traced but dropped, traced and kept

GROUPS = [  # kernel name pattern -> group (first match)
    ("gemm (cuBLAS/cutlass)", r"gemm|nvjet|cutlass|sm90_xmma|ampere_.*_s16816|cublas"),
    ("flash attention", r"flash|fmha|varlen"),
    ("fused linear cross-entropy", r"_fl_|cross_?entropy|_ce_"),
    ("SwiGLU", r"_fg_kernel|_DWf_DW_dfg|swiglu|geglu"),
    ("RMSNorm", r"rms|layernorm|_rms_layernorm"),
    ("RoPE", r"rope|rotary"),
    ("optimizer (bitsandbytes)", r"optimizer|kOptimizer|kPreconditionOptimizer|bnb|adam"),
    ("reduction / norm", r"reduce|norm_kernel|multi_tensor"),
    ("copy / cast / fill", r"copy|memcpy|memset|fill|cast|CatArrayBatched"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def group_of(name: str) -> str:
    return next((g for g, pattern in GROUPS if re.search(pattern, name, re.I)), "other")


def analyse(events: list[dict], marks: list[float]) -> tuple[dict, list]:
    """The kept steps of a chrome trace: their wall clock, the GPU's busy time and gaps, kernels by group."""
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    steps_marked = [e for e in events if e.get("name", "").startswith("ProfilerStep#")
                    and e.get("cat") == "user_annotation"]  # the host's; the GPU's copy is "gpu_user_annotation"
    kept = sorted(steps_marked, key=lambda e: e["ts"])[-ACTIVE:]
    start, end = kept[0]["ts"], kept[-1]["ts"] + kept[-1]["dur"]
    window = [k for k in kernels if start <= k["ts"] < end]
    spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in window)
    busy, gaps, cursor = 0.0, [], start
    for a, b in spans:
        if a > cursor:
            gaps.append((a - cursor, cursor - start))
        if b > cursor:
            busy += b - max(a, cursor)
            cursor = b
    if end > cursor:
        gaps.append((end - cursor, cursor - start))
    by_name: dict[str, list[float]] = {}
    for k in window:
        by_name.setdefault(k["name"], []).append(k["dur"])
    groups: dict[str, float] = {}
    for name, durs in by_name.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + sum(durs)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    runtime, calls = {}, {}  # the host's waits: syncs and copies that block
    for e in events:
        if e.get("cat") == "cuda_runtime" and start <= e.get("ts", 0) < end:
            runtime[e["name"]] = runtime.get(e["name"], 0.0) + e.get("dur", 0)
            calls[e["name"]] = calls.get(e["name"], 0) + 1
    syncs = [e for e in events if e.get("cat") in ("cuda_runtime", "cpu_op") and start <= e.get("ts", 0) < end
             and re.match(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|aten::_local_scalar_dense",
                          e.get("name", ""))]
    ops = {}
    for e in events:
        if e.get("cat") == "cpu_op" and start <= e.get("ts", 0) < end and re.match(
                r"Optimizer|aten::item|aten::_local_scalar_dense|Torch-Compiled|autograd::engine", e.get("name", "")):
            ops[e["name"]] = ops.get(e["name"], 0.0) + e.get("dur", 0)
    profile_json = {
        "step_ms": per_step(end - start), "gpu_busy_ms": per_step(busy),
        "gpu_idle_ms": per_step(sum(g for g, _ in gaps)),
        "gaps_over_50us": {"count_per_step": len([g for g, _ in gaps if g > 50]) / ACTIVE,
                           "ms_per_step": per_step(sum(g for g, _ in gaps if g > 50)),
                           "largest_ms_at_ms": [(round(g / 1000, 3), round(at / 1000, 1))
                                                for g, at in sorted(gaps, reverse=True)[:12]]},
        "groups_ms_per_step": {g: per_step(v) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "kernels_per_step": len(window) / ACTIVE,
        "host_runtime_ms_per_step": {k: per_step(v) for k, v in sorted(runtime.items(), key=lambda kv: -kv[1])[:10]},
        "host_ops_ms_per_step": {k: per_step(v) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]},
        "host_step_s": [round(b - a, 4) for a, b in zip(marks, marks[1:])],
        "sync_calls_per_step": {k: v / ACTIVE for k, v in calls.items() if "ynchronize" in k or "Memcpy" in k},
        "syncs_at_ms": [(e["name"], round((e["ts"] - start) / 1000, 1), round(e.get("dur", 0) / 1000, 2))
                        for e in sorted(syncs, key=lambda e: e["ts"])][:60],
    }
    return profile_json, top


def per_step(us: float) -> float:
    return round(us / ACTIVE / 1000, 3)  # ms per step


def main() -> int:
    spec_path, out, data = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    overrides = sys.argv[4:]
    out.mkdir(parents=True, exist_ok=True)
    backend = os.environ.get("BACKEND", "unsloth")
    from job import settings as settings_module
    from job.backends import unsloth

    settings_module.init()
    if backend == "unsloth":
        unsloth.import_library()
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import AutoConfig, TrainerCallback

    from job import backends, bench
    from job.backends import trainer as shared
    from job.specfile import load_spec

    spec = load_spec(Path(spec_path), overrides)
    config = AutoConfig.from_pretrained(spec.model.base)
    plan = backends.load(backend).plan(spec, config, "cuda", settings_module.get())
    steps = SKIP + WARMUP + ACTIVE + 2
    timed = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": steps + bench.WARMUP})})
    trace = out / "steps.trace.json"
    marks: list[float] = []

    class Profiled(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                    schedule=schedule(skip_first=SKIP, wait=0, warmup=WARMUP, active=ACTIVE, repeat=1),
                                    on_trace_ready=lambda p: p.export_chrome_trace(str(trace)))
            self.profiler.start()

        def on_step_end(self, args, state, control, **kwargs):
            import time

            marks.append(time.perf_counter())  # the host's step ends (no sync: that would drain the queue)
            self.profiler.step()

        def on_train_end(self, args, state, control, **kwargs):
            self.profiler.stop()

    class SyncsListed(TrainerCallback):
        """One steady step after the profile (from one step's end to the next's, the batch's drawing included) under
        torch's sync debug mode: each synchronizing call's Python stack, to syncs.txt."""

        def __init__(self):
            self.seen: list[str] = []
            self.shown = None

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import traceback
            import warnings

            if state.global_step == SKIP + WARMUP + ACTIVE + 1:
                self.shown = warnings.showwarning
                warnings.simplefilter("always")

                def show(message, category, filename, lineno, file=None, line=None):
                    frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-8:]
                    self.seen.append(f"{message}\n" + "".join(traceback.format_list(frames)))

                warnings.showwarning = show
                torch.cuda.set_sync_debug_mode("warn")
            elif self.shown is not None:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning, self.shown = self.shown, None
                (out / "syncs.txt").write_text(f"{len(self.seen)} synchronizing calls in one step\n\n"
                                               + "\n".join(self.seen))

    built = shared.build_trainer

    def build_trainer(*args, **kwargs):
        trainer, session = built(*args, **kwargs)
        trainer.add_callback(Profiled())
        trainer.add_callback(SyncsListed())
        return trainer, session

    shared.build_trainer = build_trainer
    result = bench.worker({"spec": timed.model_dump(mode="json"), "backend": backend, "plan": asdict(plan),
                           "steps": steps, "data": data})
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(str(trace) + ".gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    trace.unlink()
    profile_json, top = analyse(events, marks)
    profile_json.update(plan=asdict(plan), bench=result)
    (out / "profile.json").write_text(json.dumps(profile_json, indent=1))
    with open(out / "kernels.txt", "w") as f:
        for name, durs in top[:60]:  # noqa: B007
            f.write(f"{per_step(sum(durs)):8.3f} ms/step {len(durs) / ACTIVE:6.1f}x  {group_of(name):28s} {name[:150]}\n")
    print(json.dumps({k: profile_json[k] for k in ("step_ms", "gpu_busy_ms", "gpu_idle_ms", "groups_ms_per_step")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
