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


def trainer_settings(spec: JobSpec, run_dir: RunDir) -> dict[str, Any]:
    """SFTConfig arguments (report_to, run_name), and the trackers' locations (through their environment)."""
    names = trackers(spec)
    if not names:
        return {"report_to": "none"}
    where = directory(run_dir)
    where.mkdir(parents=True, exist_ok=True)
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_TRACKING_URI", (where / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "peftopt")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the default local store is a folder
    if "wandb" in names:
        os.environ.setdefault("WANDB_DIR", str(where))
        os.environ.setdefault("WANDB_PROJECT", "peftopt")
    if "trackio" in names:
        os.environ.setdefault("TRACKIO_DIR", str(where / "trackio"))
    if "tensorboard" in names:  # transformers 5 reads the directory from the environment only
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(where / "tensorboard"))
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
                ids["tensorboard"] = os.environ["TENSORBOARD_LOGGING_DIR"]
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
    for quant, info in (metrics.get("gguf", {}).get("eval") or {}).items():
        if isinstance(info.get("pass_rate"), (int, float)):
            out[f"peftopt/eval/gguf-{quant}_pass_rate"] = float(info["pass_rate"])
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

            run = wandb.init(id=ids["wandb"], resume="allow", project=os.environ.get("WANDB_PROJECT"),
                             dir=os.environ.get("WANDB_DIR"))
            run.summary.update(values)
            run.finish()
    except Exception as exc:  # a tracker's failure must not fail a finished job
        log.warning("tracking_failed", error=f"{type(exc).__name__}: {exc}", trackers=names)
        return
    log.info("tracking_finished", trackers=names, figures=len(values))
