"""Experiment tracking (`train.report_to`: tensorboard, wandb, mlflow, trackio): the Trainer's own integrations
log the loss curve under the run's name; peftopt adds the resolved spec as the run's config when training
starts, and its own figures (tokens/s, peak memory, held-out loss, evaluation pass rates) when the job ends.
Files go under `<run dir>/tracking/` unless the tracker's own environment variables say otherwise
(MLFLOW_TRACKING_URI, WANDB_DIR); credentials come only from the environment (WANDB_API_KEY, ...).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from job import settings as settings_module
from job.log import get_logger
from job.rundir import RunDir, atomic_write_json, read_json
from job.spec import JobSpec

log = get_logger("peftopt.tracking")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def trackers(spec: JobSpec) -> list[str]:
    return list(spec.train.report_to) if spec.train else []


def check(spec: JobSpec) -> list[str]:
    """Preflight: each tracker's package is installed here."""
    return [f"train.report_to: {name} is not installed here (pip install {PACKAGES[name]})"
            for name in trackers(spec) if importlib.util.find_spec(PACKAGES[name]) is None]


def directory(run_dir: RunDir) -> Path:
    return run_dir.root / "tracking"


def locations(run_dir: RunDir, settings=None) -> dict[str, str]:
    """Where each tracker writes: the user's setting, else under <run dir>/tracking/."""
    settings = settings or settings_module.get()
    where = directory(run_dir)
    return {"mlflow": settings.mlflow_tracking_uri or (where / "mlruns").resolve().as_uri(),
            "wandb": settings.wandb_dir or str(where),
            "tensorboard": settings.tensorboard_logging_dir or str(where / "tensorboard"),
            "trackio": str(where / "trackio")}


def trainer_settings(spec: JobSpec, run_dir: RunDir, settings=None) -> dict[str, Any]:
    """SFTConfig arguments (report_to, run_name); the trackers' locations go to their environment variables,
    which their libraries (and transformers' integrations) read: writes for the libraries."""
    names = trackers(spec)
    if not names:
        return {"report_to": "none"}
    directory(run_dir).mkdir(parents=True, exist_ok=True)
    settings = settings or settings_module.get()
    where = locations(run_dir, settings)
    if "mlflow" in names:  # writes for mlflow and transformers' integration, which read them
        os.environ["MLFLOW_TRACKING_URI"] = where["mlflow"]
        os.environ["MLFLOW_EXPERIMENT_NAME"] = settings.mlflow_experiment_name
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the default local store is a folder
    if "wandb" in names:  # writes for wandb
        os.environ["WANDB_DIR"] = where["wandb"]
        os.environ["WANDB_PROJECT"] = settings.wandb_project
    if "trackio" in names:  # a write for trackio
        os.environ["TRACKIO_DIR"] = where["trackio"]
    if "tensorboard" in names:  # transformers 5 reads the directory from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = where["tensorboard"]
    return {"report_to": names, "run_name": spec.name}


def spec_callback(spec: JobSpec, run_dir: RunDir):
    """A TrainerCallback that puts the resolved spec on each tracker's run and remembers the run ids, so that
    the job's end can add its figures to the same runs."""
    from transformers import TrainerCallback

    config = spec.model_dump(mode="json")

    class SpecAsConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            ids: dict[str, Any] = {}
            if "mlflow" in trackers(spec):
                import mlflow

                if mlflow.active_run():
                    mlflow.log_dict(config, "peftopt-spec.json")
                    ids["mlflow"] = mlflow.active_run().info.run_id
            if "wandb" in trackers(spec):
                import wandb

                if wandb.run is not None:
                    wandb.config.update({"peftopt": config}, allow_val_change=True)
                    ids["wandb"] = wandb.run.id
            if "tensorboard" in trackers(spec):
                ids["tensorboard"] = locations(run_dir)["tensorboard"]
            atomic_write_json(directory(run_dir) / "runs.json", {**(read_json(directory(run_dir) / "runs.json") or {}),
                                                                 **ids})

    return SpecAsConfig()


def figures(metrics: dict) -> dict[str, float]:
    """peftopt's own numbers, flattened: training speed and memory, held-out loss, pass rates."""
    out: dict[str, float] = {}
    train = metrics.get("train", {})
    for key in ("tokens_per_s", "steady_tokens_per_s", "runtime_s", "peak_gpu_gb", "lora_gpu_gb", "peak_rss_gb",
                "final_loss", "tokens"):
        if isinstance(train.get(key), (int, float)):
            out[f"peftopt/train/{key}"] = float(train[key])
    evaluation = metrics.get("evaluate", {})
    for target, summary in evaluation.items():
        if target == "heldout":
            for which, values in summary.items():
                if isinstance(values.get("loss"), (int, float)):
                    out[f"peftopt/heldout/{which}_loss"] = float(values["loss"])
        elif isinstance(summary, dict) and isinstance(summary.get("pass_rate"), (int, float)):
            out[f"peftopt/eval/{target}_pass_rate"] = float(summary["pass_rate"])
    return out


def finish(spec: JobSpec, run_dir: RunDir, metrics: dict) -> None:
    """Adds the job's figures (and the spec) to each tracker's run once every stage is done."""
    names = trackers(spec)
    if not names:
        return
    values, ids = figures(metrics), read_json(directory(run_dir) / "runs.json") or {}
    step = int(metrics.get("train", {}).get("global_step") or 0)
    try:
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(ids.get("tensorboard") or str(directory(run_dir) / "tensorboard"))
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.add_text("peftopt/spec", "```json\n" + json.dumps(spec.model_dump(mode="json"), indent=2) + "\n```", step)
            writer.close()
        if "mlflow" in names and ids.get("mlflow"):
            import mlflow

            with mlflow.start_run(run_id=ids["mlflow"]):
                mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)
        if "wandb" in names and ids.get("wandb"):
            import wandb

            run = wandb.init(id=ids["wandb"], resume="allow", dir=locations(run_dir)["wandb"])  # WANDB_PROJECT: wandb reads it
            run.summary.update(values)
            run.finish()
    except Exception as exc:  # a tracker's failure must not fail a finished job
        log.warning("tracking_failed", error=f"{type(exc).__name__}: {exc}", trackers=names)
        return
    log.info("tracking_finished", trackers=names, figures=len(values))
