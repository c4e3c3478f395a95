"""The job: preflight, then the registered stages in order (job/stages/__init__.py), each skipped when the run
directory already holds its finished work for the same inputs.

    python -m job run jobspecs/smoke.json      # what `peftopt run` calls
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import structlog

from job import distributed, interrupt, preflight, stages as registry, tracking
from job.errors import ExternalError, Interrupted, PeftoptError, RunConflict, SpecError, disk_error
from job.log import attach_events_file, detach_events_file, get_logger, log_failure
from job.metrics import append_experiment_row, hardware, package_versions, update_metrics
from job.rundir import RunDir, RunState, StageState, atomic_write_json, now_iso, read_json
from job.settings import Settings
from job.spec import JobSpec
from job.stages.base import RunContext, Stage

log = get_logger("peftopt")


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: data}


def _diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def selected_stages(spec: JobSpec, only: list[str] | None) -> list[Stage]:
    """The enabled stages, or those of them `--stages` names. Raises SpecError for an unknown name."""
    stages = registry.enabled(spec)
    if only:
        unknown = [s for s in only if s not in registry.names()]
        if unknown:
            raise SpecError(f"--stages: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(registry.names())}")
        stages = [s for s in stages if s.name in only]
    return stages


def reconcile(spec: JobSpec, run_dir: RunDir, state: RunState, prints: dict[str, str], restart: bool) -> None:
    """Marks the stages whose finished (or partial) work came from other inputs, and redoes exactly those
    (each stage's fingerprint includes the ones it needs, so they are the changed stages and everything
    downstream of them); refuses unless `restart`.

    Raises:
        RunConflict: finished work would be invalidated and restart was not given.
    """
    stale = []
    for stage in registry.enabled(spec):  # a stage the spec no longer asks for keeps what it made
        info = state.stages[stage.name]
        if info.status == "done" and info.fingerprint != prints[stage.name]:
            stale.append(stage)
        elif info.status == "done" and run_dir.missing_artifacts(info):
            log.warning("artifact_missing", stage=stage.name, missing=run_dir.missing_artifacts(info),
                        action="stage will run again")
            info.status = "pending"
        elif info.status != "done" and info.fingerprint not in (None, prints[stage.name]) and \
                any((run_dir.root / entry).exists() for entry in stage.artifacts):
            stale.append(stage)  # partial work of another experiment (checkpoints) must not be resumed
    if stale and not restart:
        raise RunConflict(
            f"{run_dir.root} holds work from other inputs: {stale_reasons(spec, run_dir, state, stale)}; pass "
            f"--restart to redo {'it' if len(stale) == 1 else 'those stages'} (finished work of the others is "
            "kept), or use another name or output directory")
    for stage in stale:
        reset_stage(run_dir, state, stage)
    if stale:
        state.logged_to_experiments = False  # the redone run's result is a new row
        log.warning("run_restarted", stages=[s.name for s in stale])


def stale_reasons(spec: JobSpec, run_dir: RunDir, state: RunState, stale: list[Stage]) -> str:
    """Each stale stage with what changed for it: the fields and files among its own inputs, or the stage before it
    whose work it uses. A stage recorded without its inputs (an older run) gets the spec's changed fields."""
    parts, hit = [], set()
    for stage in stale:
        recorded = state.stages[stage.name].inputs
        if recorded is None:
            changed = _diff(read_json(run_dir.spec_path, {}) or {}, spec.model_dump(mode="json"))
            why = ", ".join(changed[:6]) or "a file the spec names"
        else:
            why = ", ".join(changed_inputs(spec, recorded, stage.inputs(spec))[:6])
            if not why:
                upstream = [n for n in registry.needs(stage, spec) if n in hit]
                why = f"uses {' and '.join(upstream)}" if upstream else "its inputs"
        hit.add(stage.name)
        parts.append(f"{stage.name} ({why})")
    return "; ".join(parts)


def changed_inputs(spec: JobSpec, old: dict, new: dict) -> list[str]:
    """The names of this stage's inputs whose value or content differs: spec fields by their dotted name, files by
    their path. Only names of the current inputs are given (the recorded ones come from the volume)."""
    out = []
    old_fields = old.get("fields") if isinstance(old.get("fields"), dict) else {}
    for key, value in (new.get("fields") or {}).items():
        before, now = _flatten(old_fields.get(key), key), _flatten(value, key)
        out += [k for k in sorted(now) if before.get(k) != now[k]]
        if set(before) - set(now):  # a setting recorded then and absent now: named by the field that holds it
            out.append(key)
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    for key, value in new_files.items():
        before = old_files.get(key) if isinstance(old_files, dict) else None
        if before == value:
            continue
        if key == "data" and spec.data and isinstance(value, list):
            sources = spec.data.all_sources()
            out += [f"data file {sources[i].source}" for i, digest in enumerate(value)
                    if i < len(sources) and (not isinstance(before, list) or i >= len(before) or before[i] != digest)]
        elif key == "base":
            out.append(f"the base model's files ({spec.model.base})")
        elif key == "chat_template":
            out.append(f"chat template file {spec.model.chat_template}")
        else:
            out.append(f"file {key}")
    return list(dict.fromkeys(out))


def reset_stage(run_dir: RunDir, state: RunState, stage: Stage) -> None:
    for entry in stage.artifacts:
        run_dir.remove(entry)
    metrics = read_json(run_dir.metrics_path) or {}
    if stage.name in metrics:
        metrics.pop(stage.name)
        atomic_write_json(run_dir.metrics_path, metrics)
    state.stages[stage.name] = StageState()


def run_job(spec: JobSpec, settings: Settings, *, output_dir: str | None = None, only: list[str] | None = None,
            restart: bool = False, dry_run: bool = False) -> RunState:
    """Runs the job and returns its final state. Raises a PeftoptError subclass on expected failures."""
    if output_dir:  # the spec says where its runs are from here on (a `run:NAME` base is looked up there too)
        spec = spec.model_copy(update={"output_dir": str(output_dir)})
    run_dir = RunDir(Path(spec.output_dir) / spec.name)
    stages = selected_stages(spec, only)
    if spec.train:
        interrupt.set_grace(spec.train.grace_period_s)
    me = distributed.world(settings)
    if me.is_main:  # rank 0 alone speaks; the others follow its exit code
        run_dir.refuse_foreign()
        preflight.check(spec, [s.name for s in stages])  # every input the stages need, before any work
    prints = registry.fingerprints(spec)
    ctx = RunContext(spec=spec, run_dir=run_dir, settings=settings, fingerprints=prints, dry_run=dry_run,
                     restart=restart)
    with structlog.contextvars.bound_contextvars(run=spec.name):
        if distributed.active(settings):
            distributed.init(settings)
            if not me.is_main:  # runs the stages every rank joins when rank 0 says so; leaves with its code
                together = [s for s in stages if s.all_ranks]
                return distributed.follow(lambda: [s.run(ctx) for s in together])
        try:
            with run_dir.lock():
                run_dir.clean_scratch()
                with run_dir.open_append(run_dir.events_path) as events:
                    attach_events_file(events)
                    try:
                        state = _run_locked(ctx, stages, only)
                    except PeftoptError as exc:  # its event belongs in events.jsonl too
                        log_failure(exc)
                        raise
                    finally:
                        detach_events_file()
        except BaseException as exc:
            distributed.release(exc)
            raise
    distributed.release(None)
    return state


def _run_locked(ctx: RunContext, stages: list[Stage], only: list[str] | None) -> RunState:
    spec, run_dir, prints = ctx.spec, ctx.run_dir, ctx.fingerprints
    state = run_dir.load_state(registry.names())
    reconcile(spec, run_dir, state, dict(prints), ctx.restart)
    atomic_write_json(run_dir.spec_path, spec.model_dump(mode="json"))
    state.name, state.status, state.attempts = spec.name, "running", state.attempts + 1
    state.started_at = state.started_at or now_iso()
    run_dir.save_state(state)
    env = {"versions": package_versions(), "hardware": hardware()}
    update_metrics(run_dir, "run", {"name": spec.name, "started_at": state.started_at, **env})
    log.info("job_started", run_dir=str(run_dir.root), stages=[s.name for s in stages], attempt=state.attempts,
             settings=ctx.settings.described(), **env)
    job_started = time.perf_counter()
    enabled = {s.name for s in registry.enabled(spec)}
    ahead = contextlib.ExitStack()

    def record_give_up() -> None:  # the watchdog's thread, as the process leaves at the end of the grace period
        for info in state.stages.values():
            if info.status == "running":
                info.status, info.finished_at = "interrupted", now_iso()
        state.status, state.error = "interrupted", "the grace period after a stop request ended before a safe point"
        run_dir.save_state(state)

    interrupt.on_give_up(record_give_up)
    ahead.callback(interrupt.off_give_up, record_give_up)
    try:
        for stage in stages:  # the stages still to do start what they can ahead of their turn
            if not _finished(state, stage, prints):
                ctx.warm[stage.name] = ahead.enter_context(stage.warm_up(ctx))
            stage.imports(ctx)  # unsloth, while prepare's child process (its warm_up) reads the data
        for stage in stages:
            if _finished(state, stage, prints):
                log.info("stage_skipped", stage=stage.name, reason="finished earlier with the same inputs")
                ctx.done[stage.name].set()
                continue
            if only:
                missing = [n for n in registry.needs(stage, spec) if n in enabled and n not in only
                           and state.stages[n].status != "done"]
                if missing:
                    raise SpecError(f"--stages: {stage.name} needs {', '.join(missing)} done first")
            if interrupt.stop_requested():
                raise Interrupted(f"stopped by a signal before {stage.name}; rerun to continue")
            if stage.all_ranks:
                with distributed.training_together():  # the other ranks join this stage only
                    _run_stage(stage, ctx, state)
            else:
                _run_stage(stage, ctx, state)
            ctx.done[stage.name].set()
    except PeftoptError as exc:
        state.status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        state.error = exc.message
        run_dir.save_state(state)
        update_metrics(run_dir, "run", {"status": state.status})
        raise
    except BaseException as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        run_dir.save_state(state)
        raise
    finally:
        ahead.close()
    state.status, state.finished_at, state.error = "done", now_iso(), None
    run_dir.save_state(state)
    metrics = update_metrics(run_dir, "run", {"status": "done", "finished_at": state.finished_at,
                                              "last_attempt_s": round(time.perf_counter() - job_started, 3)})
    tracking.finish(spec, run_dir, metrics)
    if not state.logged_to_experiments and not only:
        append_experiment_row(run_dir.root.parent / "experiments_log.csv", experiment_row(spec, metrics))
        state.logged_to_experiments = True
        run_dir.save_state(state)
    log.info("job_finished", run_dir=str(run_dir.root), status="done")
    return state


def _finished(state: RunState, stage: Stage, prints) -> bool:
    """The run directory holds this stage's finished work for the same inputs."""
    info = state.stages[stage.name]
    return info.status == "done" and info.fingerprint == prints[stage.name]


def _run_stage(stage: Stage, ctx: RunContext, state: RunState) -> None:
    run_dir = ctx.run_dir
    info = state.stages[stage.name] = StageState(status="running", started_at=now_iso(),
                                                 fingerprint=ctx.fingerprints[stage.name],
                                                 inputs=stage.inputs(ctx.spec))
    run_dir.save_state(state)
    with structlog.contextvars.bound_contextvars(stage=stage.name):
        log.info("stage_started", stage=stage.name)
        started = time.perf_counter()
        try:
            with interrupt.stage(stage.name, safe_points=stage.safe_points):
                result = stage.run(ctx)
        except Interrupted:
            info.status, info.finished_at = "interrupted", now_iso()
            run_dir.save_state(state)
            raise
        except PeftoptError as exc:
            info.status, info.finished_at, info.error = "failed", now_iso(), exc.message
            run_dir.save_state(state)
            raise
        except BaseException as exc:
            problem = disk_error(exc)
            message = f"{stage.name}: disk error: {problem}; finished stages are kept, rerun when there is room" \
                if problem else f"{type(exc).__name__}: {exc}"
            info.status, info.finished_at, info.error = "failed", now_iso(), message
            run_dir.save_state(state)
            if problem:
                raise ExternalError(message) from exc
            raise
        runtime = round(time.perf_counter() - started, 3)
        update_metrics(run_dir, stage.name, dict(result.metrics))
        metrics = read_json(run_dir.metrics_path) or {}
        metrics.setdefault("stages", {})[stage.name] = {"runtime_s": runtime, "finished_at": now_iso()}
        atomic_write_json(run_dir.metrics_path, metrics)
        info.status = "pending" if result.keep_pending else "done"  # a dry run leaves the stage to do
        info.finished_at, info.runtime_s, info.artifacts = now_iso(), runtime, list(result.artifacts)
        run_dir.save_state(state)
        log.info("stage_finished", stage=stage.name, runtime_s=runtime, artifacts=info.artifacts)


def experiment_row(spec: JobSpec, metrics: dict) -> dict:
    train = metrics.get("train", {})
    return {
        "run_name": spec.name, "model": spec.model.base,
        "dataset_slice": " + ".join(f"{s.source}:{s.split}" for s in spec.data.all_sources()) if spec.data else "",
        "r": spec.lora.r if spec.lora else "", "alpha": spec.lora.alpha if spec.lora else "",
        "max_steps": (spec.train.max_steps or train.get("global_step")) if spec.train else "",
        "final_loss": train.get("final_loss"),
        "runtime_s": train.get("runtime_s"), "peak_gpu_gb": train.get("peak_gpu_gb"),
        "lora_gpu_gb": train.get("lora_gpu_gb"), "tokens_per_s": train.get("tokens_per_s"),
        "finished_at": metrics.get("run", {}).get("finished_at"),
    }

