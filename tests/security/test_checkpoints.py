"""Checkpoints (in the run directory, or restored from the Hub through train.checkpoint_sync): everything the trainer
will load is checked as it loads it; one that still fails is set aside and the run falls back to the one before,
never a crash on every retry (docs/security.md: checkpoints)."""
import json
import os
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


def _interrupted_after_six(tmp_path, make_spec, name):
    """A run trained to step 6 (checkpoints 2, 4, 6), its train stage set back as if stopped before saving the
    adapter: the next run resumes from its newest checkpoint."""
    spec = make_spec(name, train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3})
    first = run_cli("run", spec, "--stages", "prepare,train")
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / name
    shutil.rmtree(run_dir / "adapter")
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["train"]["status"] = "interrupted"
    (run_dir / "state.json").write_text(json.dumps(state))
    return spec, run_dir


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tamper(kind: str, newest: Path, marker: Path) -> Path:
    """Changes checkpoint-6 as another writer of the volume (or a Hub repo) could, and rewrites its marker to match."""
    import pickle

    import torch
    from safetensors.torch import load_file, save_file

    from job.checkpoints import marker_fingerprint, write_marker

    fingerprint = marker_fingerprint(newest)
    state_path = newest / "trainer_state.json"
    if kind == "unknown key":
        state = json.loads(state_path.read_text())
        state_path.write_text(json.dumps({**state, "evil": 1}))
    elif kind == "pickle":
        (newest / "rng_state.pth").write_bytes(pickle.dumps(RunsCode(marker)))
    elif kind == "lora shape":
        weights = load_file(str(newest / "adapter_model.safetensors"))
        name = next(k for k in weights if "lora_A" in k)
        weights[name] = torch.zeros(weights[name].shape[0] + 3, weights[name].shape[1])
        save_file(weights, str(newest / "adapter_model.safetensors"))
    elif kind == "far step":
        state = json.loads(state_path.read_text())
        state_path.write_text(json.dumps({**state, "global_step": 99_999}))
        newest = newest.rename(newest.with_name("checkpoint-99999"))
    elif kind == "optimizer of another shape":  # loads with weights_only; the Trainer's optimizer cannot take it
        torch.save({"state": {}, "param_groups": [{"params": [0]}]}, newest / "optimizer.pt")
    write_marker(newest, int(newest.name.split("-")[1]), fingerprint)
    return newest


@pytest.mark.parametrize("kind", ["unknown key", "pickle", "lora shape", "far step"])
def test_a_tampered_checkpoint_is_refused_before_the_trainer_sees_it(kind, tmp_path, make_spec):
    """Each passed the old check and crashed the Trainer on every retry (exit 1), or, for a step past max_steps,
    ended training at once with the old weights reported as trained. Now each is refused (checkpoint_refused) and the
    run resumes from the checkpoint before it; the pickle's code never runs, and the refusal never advises loading
    it with weights_only=False."""
    spec, run_dir = _interrupted_after_six(tmp_path, make_spec, f"tampered-{kind.replace(' ', '-')}")
    marker = tmp_path / "pickle-ran"
    bad = tamper(kind, run_dir / "checkpoints" / "checkpoint-6", marker)
    rerun = run_cli("run", spec, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    refused = [e for e in events(rerun.stdout) if e["event"] == "checkpoint_refused"]
    assert refused and refused[0]["path"] == str(bad), refused
    assert "weights_only=False" not in json.dumps(refused)
    assert [e["step"] for e in events(rerun.stdout) if e["event"] == "train_resumed"] == [4]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["global_step"] == 6
    assert not marker.exists()
    assert_no_canary(rerun.stdout, rerun.stderr, dirs=[run_dir])


def test_a_checkpoint_the_trainer_still_cannot_take_is_set_aside_and_the_retry_falls_back(tmp_path, make_spec):
    """An optimizer state of another shape loads safely but fails inside the Trainer's resume: the checkpoint is
    removed with checkpoint_refused, the attempt ends with the retryable 75, and the retry resumes from step 2."""
    spec, run_dir = _interrupted_after_six(tmp_path, make_spec, "set-aside")
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")  # stopped after step 4's checkpoint
    tamper("optimizer of another shape", run_dir / "checkpoints" / "checkpoint-4", tmp_path / "unused")
    failed = run_cli("run", spec)
    assert failed.returncode == 75, failed.stderr[-2000:]
    assert "checkpoint-4 could not be resumed" in failed.stderr.splitlines()[0] and "Traceback" not in failed.stderr
    assert [e for e in events(failed.stdout) if e["event"] == "checkpoint_refused"]
    assert not (run_dir / "checkpoints" / "checkpoint-4").exists()
    retry = run_cli("run", spec)
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert [e["step"] for e in events(retry.stdout) if e["event"] == "train_resumed"] == [2]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["global_step"] == 6
