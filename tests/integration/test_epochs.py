"""train.epochs instead of train.max_steps (CLI, CPU, the tiny model): the steps are counted from the training
sequences the trainer holds once the data is prepared (after packing), every one of them is trained, and the
spec says one or the other."""
import json
import math

import pytest

from conftest import events, run_cli

pytestmark = pytest.mark.integration


def trained(result, run_dir):
    assert result.returncode == 0, result.stderr[-3000:]
    started = next(e for e in events(result.stdout) if e["event"] == "train_started")
    metrics = json.loads((run_dir / "metrics.json").read_text())["train"]
    return started, metrics


def test_epochs_train_every_sequence_that_many_times(tmp_path, make_spec):
    spec = make_spec("ep", train={"max_steps": None, "epochs": 1.5, "packing": False, "save_steps": 4})
    started, metrics = trained(run_cli("run", spec, "--stages", "prepare,train"), tmp_path / "runs" / "ep")
    rows = sum(1 for line in (tmp_path / "runs" / "ep" / "data" / "train.jsonl").open() if line.strip())
    assert started["epochs"] == 1.5
    assert started["max_steps"] == math.ceil(1.5 * rows / 2) == metrics["global_step"]
    state = json.loads((tmp_path / "runs" / "ep" / "state.json").read_text())
    assert state["stages"]["train"]["status"] == "done"

    again = run_cli("run", spec, "--stages", "prepare,train")  # the counted steps are not a change of inputs
    assert again.returncode == 0 and [e["stage"] for e in events(again.stdout) if e["event"] == "stage_skipped"] \
        == ["prepare", "train"]


def test_packed_sequences_are_what_an_epoch_counts(tmp_path, make_spec):
    loose = make_spec("loose", train={"max_steps": None, "epochs": 1, "packing": False})
    packed = make_spec("packed", train={"max_steps": None, "epochs": 1, "packing": True})
    loose_started, _ = trained(run_cli("run", loose, "--stages", "prepare,train"), tmp_path / "runs" / "loose")
    packed_started, packed_metrics = trained(run_cli("run", packed, "--stages", "prepare,train"),
                                             tmp_path / "runs" / "packed")
    assert 1 <= packed_started["max_steps"] < loose_started["max_steps"]
    assert packed_metrics["global_step"] == packed_started["max_steps"]


@pytest.mark.parametrize("train, message", [
    ({"max_steps": None}, "train: give train.max_steps (optimizer steps) or train.epochs (passes over the data)"),
    ({"epochs": 2}, "not both"),
    ({"max_steps": None, "epochs": 0}, "train.epochs: Input should be greater than 0"),
])
def test_the_spec_gives_steps_or_epochs(tmp_path, make_spec, train, message):
    result = run_cli("validate", make_spec("v", train=train))
    assert result.returncode == 2 and message in result.stdout + result.stderr
