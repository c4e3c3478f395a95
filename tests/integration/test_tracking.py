"""Integration (CPU, offline): `train.report_to` logs a real run to TensorBoard, MLflow and W&B, and each is read
back with the tracker's own reader: the loss curve, the resolved spec as config, and peftopt's figures."""
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli, write_tiny_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model, tiny_data):
    out = tmp_path_factory.mktemp("tracked")
    path = write_tiny_spec(out, tiny_model, tiny_data, "tracked", data={"eval_split": 0.1}, lora={"r": 4, "alpha": 8},
                           train={"save_steps": 3, "report_to": ["tensorboard", "mlflow", "wandb"]},
                           evaluate={"prompts": [{"prompt": "Say hello.", "assert": [{"type": "icontains", "value": "hello"}]}],
                                     "max_new_tokens": 6, "targets": ["adapter"]})
    env = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for name in ("MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_API_KEY"):
        env.pop(name, None)
    result = run_cli("run", path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(json.loads(line)["event"] == "tracking_finished" for line in result.stdout.splitlines())
    run_dir = out / "runs" / "tracked"
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_tensorboard_holds_the_loss_curve_and_the_final_figures(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = tracked_run
    scalars, texts = {}, {}
    for events in (run_dir / "tracking" / "tensorboard").rglob("events.out.tfevents.*"):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in reader.Scalars(tag)]
        for tag in reader.Tags()["tensors"]:
            texts[tag] = reader.Tensors(tag)
    losses = [value for _, value in scalars["train/loss"]]
    assert len(losses) == 6 and losses == pytest.approx([p["loss"] for p in metrics["train"]["loss_curve"]], rel=1e-5)
    assert scalars["peftopt/train/tokens_per_s"][0][1] == pytest.approx(metrics["train"]["tokens_per_s"], rel=1e-5)
    assert "peftopt/heldout/adapter_loss" in scalars and "peftopt/eval/adapter_pass_rate" in scalars
    assert any("peftopt/spec" in tag for tag in texts)


def test_mlflow_run_holds_the_loss_curve_the_spec_and_the_final_figures(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, metrics = tracked_run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(run_dir / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("peftopt")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked"
    # MLflow's asynchronous logging (transformers' callback uses it) may store a history out of order: read it by step
    logged = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in logged] == [p["step"] for p in metrics["train"]["loss_curve"]]
    assert [m.value for m in logged] == pytest.approx([p["loss"] for p in metrics["train"]["loss_curve"]], rel=1e-5)
    assert run.data.metrics["peftopt.train.tokens_per_s"] == pytest.approx(metrics["train"]["tokens_per_s"], rel=1e-5)
    assert run.data.metrics["peftopt.eval.adapter_pass_rate"] == metrics["evaluate"]["adapter"]["pass_rate"]
    spec = json.loads(Path(client.download_artifacts(run.info.run_id, "peftopt-spec.json")).read_text())
    assert spec["name"] == "tracked" and spec["train"]["report_to"] == ["tensorboard", "mlflow", "wandb"]


def test_wandb_offline_run_holds_the_spec_and_the_summary(tracked_run):
    run_dir, metrics = tracked_run
    run_id = json.loads((run_dir / "tracking" / "runs.json").read_text())["wandb"]
    runs = list((run_dir / "tracking" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the training session, and the job's end adding its figures to the same run
    # wandb 0.31 keeps records in its own binary log (read by `wandb sync`); the strings are stored as they are
    logged = b"".join(path.read_bytes() for run in runs for path in run.glob("*.wandb"))
    assert b"peftopt" in logged and b'"tracked"' in logged  # the spec as config
    assert b"train/loss" in logged and b"peftopt/train/tokens_per_s" in logged


def test_a_tracker_that_is_not_installed_is_refused_before_work(make_spec):
    spec = make_spec("untracked", train={"report_to": ["trackio"]})
    result = run_cli("run", spec, timeout=300)
    assert result.returncode == 2 and "train.report_to: trackio is not installed" in result.stderr
