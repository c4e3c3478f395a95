"""Checkpoints (in the run directory, or restored from the Hub through train.checkpoint_sync): everything the trainer
will load is checked as it loads it; one that still fails is set aside and the run falls back to the one before,
never a crash on every retry (README, "Threat model": checkpoints)."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import events, run_cli, write_tiny_spec
from hub_standin import HubStandIn
from security.canary import CANARY, ENV, assert_no_canary

pytestmark = pytest.mark.integration


def _sync_env(hub):
    return {**ENV, "PEFTOPT_TEST_TOKEN": CANARY, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
            "PEFTOPT_HUB_BACKOFF_S": "0.01", "HF_HOME": str(Path(hub.home))}


def test_two_experiments_with_one_name_never_touch_each_others_checkpoints(tmp_path, make_spec, tiny_model, tiny_data):
    sync = {"repo": "me/ckpts", "token_env": "PEFTOPT_TEST_TOKEN"}
    with HubStandIn(CANARY) as hub:
        hub.home = tmp_path / "hf"
        first = make_spec("same", train={"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "checkpoint_sync": sync})
        assert run_cli("run", first, env=_sync_env(hub)).returncode == 0
        theirs = {n: d for n, d in hub.files["me/ckpts"].items()}
        other = tmp_path / "other"
        other.mkdir()
        second = write_tiny_spec(other, tiny_model, tiny_data, "same",  # a --set override keeps the name too
                                 train={"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "learning_rate": 1e-3,
                                        "checkpoint_sync": sync})
        assert run_cli("run", second, env=_sync_env(hub)).returncode == 0
        now = hub.files["me/ckpts"]
        assert all(now.get(name) == data for name, data in theirs.items())  # nothing of the first was touched
        folders = {name.split("/checkpoint-")[0] for name in now}
        assert len(folders) == 2 and all(f.startswith("same/") for f in folders)

        # a shared folder: the other experiment's steps are never written over or deleted
        shared = {**sync, "path_in_repo": "shared"}
        a = make_spec("a", train={"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "checkpoint_sync": shared})
        assert run_cli("run", a, env=_sync_env(hub)).returncode == 0
        kept = {n: d for n, d in hub.files["me/ckpts"].items() if n.startswith("shared/")}
        b = make_spec("b", train={"max_steps": 4, "save_steps": 2, "save_total_limit": 1, "learning_rate": 1e-3,
                                  "checkpoint_sync": shared})
        result = run_cli("run", b, "--restart", env=_sync_env(hub))
        assert result.returncode == 0, result.stderr[-2000:]
        assert [e for e in events(result.stdout) if e["event"] == "checkpoint_sync_foreign"]
        assert all(hub.files["me/ckpts"].get(n) == d for n, d in kept.items())
        assert_no_canary(result.stdout, result.stderr, dirs=[tmp_path / "runs"], uploads=hub.files)


def test_an_unloadable_checkpoint_is_removed_and_the_previous_one_resumes(tmp_path, make_spec):
    spec = make_spec("torn", train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3})
    first = run_cli("run", spec)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "torn"
    newest = run_dir / "checkpoints" / "checkpoint-6"
    size = (newest / "optimizer.pt").stat().st_size
    (newest / "optimizer.pt").write_bytes(b"\x80" * size)  # same size: the marker still matches
    shutil.rmtree(run_dir / "adapter")
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["train"]["status"] = "interrupted"
    (run_dir / "state.json").write_text(json.dumps(state))
    rerun = run_cli("run", spec)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    refused = [e for e in events(rerun.stdout) if e["event"] == "checkpoint_refused"]
    assert refused and refused[0]["path"].endswith("checkpoint-6")
    assert [e["step"] for e in events(rerun.stdout) if e["event"] == "train_resumed"] == [4]
    from job.checkpoints import load_problem

    assert load_problem(newest) is None  # written again by the resumed training
