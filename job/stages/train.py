"""Train the LoRA adapter with the backend the spec picks, resuming from the newest complete checkpoint."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from job import backends, distributed, methods, modelsrc, tracking
from job.errors import Interrupted, SpecError
from job.log import get_logger
from job.metrics import peak_rss_gb, update_metrics
from job.rundir import read_json
from job.spec import JobSpec
from job.stages.base import CheckScope, RunContext, Stage, StageResult

log = get_logger("peftopt.train")

# Settings that change how a run executes but not what it computes (backend, micro-batch, grace period) are
# left out, so a retry on another machine resumes instead of being refused.
FIELDS = ("model.load_in_4bit", "model.dtype", "lora", "train.max_steps", "train.per_device_batch_size",
          "train.gradient_accumulation_steps", "train.learning_rate", "train.embedding_learning_rate",
          "train.lr_scheduler", "train.warmup_steps",
          "train.weight_decay", "train.optim", "train.packing", "train.seed", "train.save_steps", "train.method",
          # each method's own (job/methods/), but for where the reference's log-probs are computed (the same values)
          *(f"train.{name}" for name in methods.method_fields() if name != "precompute_reference"))


def check(spec: JobSpec, scope: CheckScope) -> list[str]:
    """The base model, the backend on this machine, the trackers, the checkpoint-sync token."""
    if not scope.machine:
        return []
    problems = modelsrc.problems(spec) + tracking.check(spec)
    if spec.train.checkpoint_sync:
        from job import checkpoint_sync

        try:
            checkpoint_sync.token(spec)
        except SpecError as exc:
            problems.append(exc.message)
    if spec.train.parallel == "fsdp":
        problems += shardable_problems(spec)
    if spec.train.backend != "hf":
        try:  # the import itself is the job's first step (`imports`), beside prepare's child process
            backends.choose(spec.train.backend, backends.device(spec), spec.lora, spec.train.method,
                            load_library=False)
        except SpecError as exc:
            problems.append(exc.message)
    return problems


@contextlib.contextmanager
def warm_up(ctx: RunContext):
    """The training step's Triton kernels compiled by a child process while the job imports, prepares and loads
    (job/backends/kernels_ahead.py), when this job trains on one GPU (unsloth, or hf for supervised fine-tuning)."""
    from job.backends import kernels_ahead

    if ctx.dry_run or not kernels_ahead.wanted(ctx.spec, ctx.settings, backends.device(ctx.spec)):
        yield None
        return
    with kernels_ahead.started(ctx.spec, ctx.run_dir, ctx.settings) as child:
        yield child


def imports(ctx: RunContext) -> None:
    """unsloth imported before anything imports transformers (it patches it), before any stage's work: a backend
    that cannot run here fails now (MachineError: exit 4), while prepare's child process reads the data."""
    spec = ctx.spec
    if spec.train.backend == "hf" or "unsloth" in sys.modules:
        return
    started = time.perf_counter()
    name, _ = backends.choose(spec.train.backend, backends.device(spec), spec.lora, spec.train.method)
    if name == "unsloth":
        log.info("backend_imported", backend=name, seconds=round(time.perf_counter() - started, 3))


def shardable_problems(spec: JobSpec) -> list[str]:
    """Under train.parallel fsdp, a base on this machine (a model directory, or an earlier run's merged model) whose
    class declares no decoder layer to shard by is refused before any work; a Hub base is checked once it is here."""
    kind = modelsrc.source_kind(spec.model.base)
    location = spec.model.base if kind == "dir" else \
        str(modelsrc.earlier_run(spec) / "merged") if kind == "run" else None
    if location is None or not modelsrc.source_file(location, "config.json"):
        return []
    try:
        classes = distributed.layer_classes(location)
    except (OSError, ValueError, KeyError) as exc:
        return [f"model.base: {spec.model.base}: its config cannot be read ({str(exc).splitlines()[0][:200]})"]
    return [] if classes else [distributed.NO_LAYERS]


def reads(spec: JobSpec) -> dict[str, Any]:
    return {"base": modelsrc.source_digest(spec)}


def run(ctx: RunContext) -> StageResult:
    spec, run_dir = ctx.spec, ctx.run_dir
    device = backends.device(spec)
    name, why = backends.choose(spec.train.backend, device, spec.lora, spec.train.method)
    log.info("backend_chosen", backend=name, why=why, device=device)
    try:
        figures = backends.load(name).train(spec, run_dir, device, fingerprint=ctx.fingerprints["train"],
                                            settings=ctx.settings, restart=ctx.restart)
    except Interrupted as exc:  # the session's time and tokens count in the run's figures when it is resumed
        if getattr(exc, "session", None) and distributed.world().is_main:
            previous = (read_json(run_dir.metrics_path) or {}).get("train", {})
            update_metrics(run_dir, "train", {"sessions": list(previous.get("sessions", [])) + [exc.session]})
        raise
    previous = (read_json(run_dir.metrics_path) or {}).get("train", {})
    # A resumed run adds this session to the time and tokens of the sessions before it.
    sessions = list(previous.get("sessions", [])) + [
        {"runtime_s": figures["session_runtime_s"], "tokens": figures["session_tokens"],
         "from_step": figures.get("resumed_from_step") or 0, "to_step": figures["global_step"]}]
    runtime = sum(s["runtime_s"] for s in sessions)
    tokens = sum(s["tokens"] for s in sessions)
    figures.update(sessions=sessions, runtime_s=round(runtime, 3), tokens=tokens,
                   tokens_per_s=round(tokens / runtime, 1) if runtime else None, peak_rss_gb=peak_rss_gb(),
                   backend_reason=why, method=spec.train.method)
    if "peak_gpu_gb" in figures:
        import torch

        gpu = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(gpu).total_memory / 1024**3
        figures.update(gpu_name=torch.cuda.get_device_name(gpu), gpu_memory_gb=round(total, 3),
                       peak_gpu_share=round(figures["peak_gpu_gb"] / total, 4),
                       lora_gpu_share=round(figures["lora_gpu_gb"] / total, 4))
    log.info("train_finished", **{k: v for k, v in figures.items() if k not in ("loss_curve", "sessions")})
    return StageResult(artifacts=("adapter",), metrics=figures)


STAGE = Stage(
    name="train",
    doc="LoRA via peft + trl (packing), checkpoints every `save_steps`, resumes from the newest complete one",
    enabled=lambda spec: spec.train is not None,
    run=run, check=check, reads=reads, fields=FIELDS, fields_when_set=("train.epochs",), imports=imports,
    warm_up=warm_up,
    needs=lambda spec: ("prepare",),
    artifacts=("adapter", "checkpoints"),
    all_ranks=True,
    safe_points=True,
)
