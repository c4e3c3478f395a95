"""The job: preflight, then the stages in order (prepare, train, evaluate, merge, gguf, push), each
skipped when the run directory already holds its finished work for the same spec.

    python -m job run jobspecs/smoke.json      # what `peftopt run` calls
"""
from __future__ import annotations

import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from job import distributed, interrupt, modelsrc, preflight, tracking
from job.errors import ExternalError, Interrupted, PeftoptError, RunConflict, SpecError, disk_error
from job.log import attach_events_file, detach_events_file, get_logger, route_library_logs
from job.metrics import append_experiment_row, hardware, package_versions, update_metrics
from job.fingerprint import UPSTREAM, fingerprints
from job.rundir import STAGES, RunDir, atomic_write_json, now_iso, read_json
from job.spec import JobSpec

log = get_logger("peftopt")

@dataclass
class StageContext:
    dry_run: bool = False
    restart: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def enabled_stages(spec: JobSpec) -> list[str]:
    on = {
        "prepare": spec.data is not None or modelsrc.needs_local_copy(spec),
        "train": spec.train is not None,
        "evaluate": bool(spec.evaluate and {"base", "adapter"} & set(spec.evaluate.targets)),
        "merge": bool(spec.export and spec.export.merge),
        "gguf": bool(spec.export and spec.export.gguf),
        "push": bool(spec.push and (spec.push.adapter_repo or spec.push.gguf_repo or spec.push.merged_repo)),
    }
    return [s for s in STAGES if on[s]]


def _diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def reconcile(spec: JobSpec, run_dir: RunDir, state: dict, restart: bool) -> dict:
    """Marks stages whose finished work no longer matches the spec; refuses unless `restart`.

    Raises:
        RunConflict: finished work would be invalidated and restart was not given.
    """
    prints = fingerprints(spec)
    stale = []
    for stage in STAGES:
        info = state["stages"][stage]
        if info.get("status") == "done" and info.get("fingerprint") != prints[stage]:
            stale.append(stage)
        elif info.get("status") == "done" and run_dir.missing_artifacts(info):
            log.warning("artifact_missing", stage=stage, missing=run_dir.missing_artifacts(info),
                        action="stage will run again")
            info["status"] = "pending"
    train_info = state["stages"]["train"]
    if train_info.get("status") != "done" and train_info.get("fingerprint") not in (None, prints["train"]) \
            and run_dir.checkpoints_dir.exists():
        stale.append("train")  # checkpoints of another experiment must not be resumed
    if stale and not restart:
        changed = _diff(read_json(run_dir.spec_path, {}) or {}, spec.model_dump(mode="json"))
        raise RunConflict(
            f"{run_dir.root} holds finished work ({', '.join(stale)}) from a different spec "
            f"(changed: {', '.join(changed[:8]) or 'inputs such as the data file'}); pass --restart to redo "
            "it, or use another name or output directory")
    if stale:
        first = min(STAGES.index(s) for s in stale)
        for stage in STAGES[first:]:
            reset_stage(run_dir, state, stage)
        log.warning("run_restarted", from_stage=STAGES[first])
    return prints


ARTIFACT_DIRS = {"prepare": ("data", "base"), "train": ("adapter", "checkpoints"), "merge": ("merged",),
                 "gguf": ("gguf",), "evaluate": (), "push": ()}


def reset_stage(run_dir: RunDir, state: dict, stage: str) -> None:
    for name in ARTIFACT_DIRS[stage]:
        shutil.rmtree(run_dir.root / name, ignore_errors=True)
    if stage == "evaluate":
        shutil.rmtree(run_dir.eval_dir, ignore_errors=True)
    if stage == "push":
        (run_dir.root / "push-ledger.json").unlink(missing_ok=True)
    if stage == "train":
        metrics = read_json(run_dir.metrics_path) or {}
        metrics.pop("train", None)
        atomic_write_json(run_dir.metrics_path, metrics)
    state["stages"][stage] = {"status": "pending"}


def run_job(spec: JobSpec, *, output_dir: str | None = None, only: list[str] | None = None,
            restart: bool = False, dry_run: bool = False) -> dict:
    """Runs the job and returns its final state. Raises a PeftoptError subclass on expected failures."""
    run_dir = RunDir(Path(output_dir or spec.output_dir) / spec.name)
    if run_dir.root.is_symlink():
        raise RunConflict(f"{run_dir.root} is a symbolic link; a run directory must be a real directory "
                          "inside the output directory")
    stages = enabled_stages(spec)
    if only:
        unknown = [s for s in only if s not in STAGES]
        if unknown:
            raise SpecError(f"--stages: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        stages = [s for s in stages if s in only]
    if spec.train:
        interrupt.set_grace(spec.train.grace_period_s)
    if distributed.world().is_main:  # rank 0 alone speaks; the others follow its exit code
        preflight.check(spec, stages)  # every input the stages need, before any work
    structlog.contextvars.bind_contextvars(run=spec.name)
    if distributed.active():
        distributed.init()
        if not distributed.world().is_main:  # trains when rank 0 says so; leaves with rank 0's exit code
            return distributed.follow(lambda: importlib.import_module("job.stages.train").run(
                spec, run_dir, StageContext()))
    try:
        with run_dir.lock():
            run_dir.clean_scratch()
            attach_events_file(run_dir.events_path)
            try:
                state = _run_locked(spec, run_dir, stages, restart, dry_run, only)
            finally:
                detach_events_file()
                structlog.contextvars.unbind_contextvars("run", "stage")
    except BaseException as exc:
        distributed.release(exc)
        raise
    distributed.release(None)
    return state


def _run_locked(spec, run_dir, stages, restart, dry_run, only) -> dict:
    state = run_dir.load_state()
    prints = reconcile(spec, run_dir, state, restart)
    atomic_write_json(run_dir.spec_path, spec.model_dump(mode="json"))
    state.update(name=spec.name, status="running", attempts=state.get("attempts", 0) + 1,
                 started_at=state.get("started_at") or now_iso())
    run_dir.save_state(state)
    env = {"versions": package_versions(), "hardware": hardware()}
    update_metrics(run_dir, "run", {"name": spec.name, "started_at": state["started_at"], **env})
    log.info("job_started", run_dir=str(run_dir.root), stages=stages, attempt=state["attempts"], **env)
    ctx = StageContext(dry_run=dry_run, restart=restart)
    job_started = time.perf_counter()
    try:
        for stage in stages:
            info = state["stages"][stage]
            if info.get("status") == "done" and info.get("fingerprint") == prints[stage]:
                log.info("stage_skipped", stage=stage, reason="finished earlier for this spec")
                continue
            if only:
                missing = [u for u in UPSTREAM[stage] if u in enabled_stages(spec) and u not in stages
                           and state["stages"][u].get("status") != "done"]
                if missing:
                    raise SpecError(f"--stages: {stage} needs {', '.join(missing)} done first")
            if interrupt.stop_requested():
                raise Interrupted(f"stopped by a signal before {stage}; rerun to continue")
            if stage == "train":
                with distributed.training_together():  # the other ranks join this stage only
                    _run_stage(stage, spec, run_dir, state, prints[stage], ctx)
                continue
            _run_stage(stage, spec, run_dir, state, prints[stage], ctx)
    except PeftoptError as exc:
        state["status"] = "interrupted" if isinstance(exc, Interrupted) else "failed"
        state["error"] = exc.message
        run_dir.save_state(state)
        update_metrics(run_dir, "run", {"status": state["status"]})
        raise
    except BaseException as exc:
        state["status"], state["error"] = "failed", f"{type(exc).__name__}: {exc}"
        run_dir.save_state(state)
        raise
    state.update(status="done", finished_at=now_iso(), error=None)
    run_dir.save_state(state)
    metrics = update_metrics(run_dir, "run", {"status": "done", "finished_at": state["finished_at"],
                                              "last_attempt_s": round(time.perf_counter() - job_started, 3)})
    tracking.finish(spec, run_dir, metrics)
    if not state.get("logged_to_experiments") and not only:
        append_experiment_row(run_dir.root.parent / "experiments_log.csv", experiment_row(spec, metrics))
        state["logged_to_experiments"] = True
        run_dir.save_state(state)
    log.info("job_finished", run_dir=str(run_dir.root), status="done")
    return state


def _run_stage(stage: str, spec: JobSpec, run_dir: RunDir, state: dict, fingerprint: str, ctx) -> None:
    structlog.contextvars.bind_contextvars(stage=stage)
    info = {"status": "running", "started_at": now_iso(), "fingerprint": fingerprint}
    state["stages"][stage] = info
    run_dir.save_state(state)
    log.info("stage_started", stage=stage)
    started = time.perf_counter()
    module = importlib.import_module(f"job.stages.{stage}")
    route_library_logs()
    try:
        result = module.run(spec, run_dir, ctx)
    except Interrupted:
        info.update(status="interrupted", finished_at=now_iso())
        run_dir.save_state(state)
        raise
    except PeftoptError as exc:
        info.update(status="failed", finished_at=now_iso(), error=exc.message)
        run_dir.save_state(state)
        raise
    except BaseException as exc:
        problem = disk_error(exc)
        message = f"{stage}: disk error: {problem}; finished stages are kept, rerun when there is room" \
            if problem else f"{type(exc).__name__}: {exc}"
        info.update(status="failed", finished_at=now_iso(), error=message)
        run_dir.save_state(state)
        if problem:
            raise ExternalError(message) from exc
        raise
    runtime = round(time.perf_counter() - started, 3)
    update_metrics(run_dir, stage, result.get("metrics", {}))
    metrics = read_json(run_dir.metrics_path) or {}
    stage_times = metrics.get("stages", {})
    stage_times[stage] = {"runtime_s": runtime, "finished_at": now_iso()}
    metrics["stages"] = stage_times
    atomic_write_json(run_dir.metrics_path, metrics)
    done = "pending" if result.get("keep_pending") else "done"  # a dry run leaves the stage to do
    info.update(status=done, finished_at=now_iso(), runtime_s=runtime, artifacts=result.get("artifacts", []))
    run_dir.save_state(state)
    log.info("stage_finished", stage=stage, runtime_s=runtime, artifacts=info["artifacts"])
    structlog.contextvars.unbind_contextvars("stage")


def experiment_row(spec: JobSpec, metrics: dict) -> dict:
    train = metrics.get("train", {})
    return {
        "run_name": spec.name, "model": spec.model.base,
        "dataset_slice": " + ".join(f"{s.source}:{s.split}" for s in spec.data.all_sources()) if spec.data else "",
        "r": spec.lora.r if spec.lora else "", "alpha": spec.lora.alpha if spec.lora else "",
        "max_steps": spec.train.max_steps if spec.train else "", "final_loss": train.get("final_loss"),
        "runtime_s": train.get("runtime_s"), "peak_gpu_gb": train.get("peak_gpu_gb"),
        "lora_gpu_gb": train.get("lora_gpu_gb"), "tokens_per_s": train.get("tokens_per_s"),
        "finished_at": metrics.get("run", {}).get("finished_at"),
    }
