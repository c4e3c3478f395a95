"""Integration: checkpoints pushed to a (stand-in) Hub as they are saved, and restored on a fresh machine.

The machine is "lost" by deleting the whole run directory after a SIGTERM; the rerun must restore the
newest checkpoint from the Hub and finish with the same adapter as a run that was never interrupted.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from hub_standin import HubStandIn

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_CanarySyncToken0123456789abcdef"
SYNC = {"repo": "me/tiny-checkpoints", "token_env": "PEFTOPT_TEST_TOKEN"}


def env_for(hub: HubStandIn) -> dict:
    return {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_TEST_TOKEN": TOKEN, "HF_TOKEN": "",
            "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "PEFTOPT_HUB_BACKOFF_S": "0.01", "HF_HOME": str(Path(hub.home))}


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def sync_spec(make_spec, name, **train):
    return make_spec(name, train={"max_steps": 12, "save_steps": 2, "save_total_limit": 2,
                                  "checkpoint_sync": SYNC, "grace_period_s": 20, **train})


def step_of(name: str) -> int:
    """The step of a remote checkpoint file (`<run>/<training fingerprint>/checkpoint-N/...`)."""
    return int(re.search(r"/checkpoint-(\d+)/", name).group(1))


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def hub(tmp_path):
    with HubStandIn(TOKEN) as standin:
        standin.home = tmp_path / "hf-home"
        yield standin


def test_checkpoints_follow_the_local_directory_and_survive_a_lost_machine(tmp_path, make_spec, hub):
    reference = make_spec("reference", train={"max_steps": 12, "save_steps": 2, "save_total_limit": 2})
    done = run_cli("run", reference, env=env_for(hub), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    spec = sync_spec(make_spec, "synced")
    run_dir = tmp_path / "runs" / "synced"
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env_for(hub))
    # Stop once the Hub has at least two checkpoints: the commit deleting rotated ones has happened.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        steps = {step_of(n) for n in hub.files.get(SYNC["repo"], {}) if n.startswith("synced/")}
        if len(steps) >= 2 and hub.commits >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    log = events(out)
    stop_step = max(e["step"] for e in log if e["event"] == "checkpoint_saved")
    assert stop_step < 12
    synced = [e["step"] for e in log if e["event"] == "checkpoint_synced"]
    assert synced and synced[-1] == stop_step  # the checkpoint written on SIGTERM reached the Hub in the grace

    remote = hub.files[SYNC["repo"]]
    local_steps = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    remote_steps = sorted({f"checkpoint-{step_of(name)}" for name in remote})
    assert remote_steps == local_steps and len(local_steps) == 2  # rotated ones deleted remotely too
    marker = json.loads(next(data for name, data in remote.items()
                             if name.endswith(f"/checkpoint-{stop_step}/peftopt-checkpoint.json")))
    assert set(marker["files"]) <= {name.split(f"checkpoint-{stop_step}/", 1)[1] for name in remote
                                    if f"/checkpoint-{stop_step}/" in name}
    assert hub.repos[SYNC["repo"]]["private"] is True

    shutil.rmtree(tmp_path / "runs" / "synced")  # the machine is gone
    rerun = run_cli("run", spec, env=env_for(hub), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = events(rerun.stdout)
    restored = [e for e in log if e["event"] == "checkpoint_restored"]
    assert restored and restored[0]["step"] == stop_step
    assert [e["step"] for e in log if e["event"] == "train_resumed"] == [stop_step]
    metrics = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert metrics["global_step"] == 12 and metrics["checkpoint_sync"]["restored_step"] == stop_step

    ours, theirs = adapter(run_dir), adapter(tmp_path / "runs" / "reference")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max().item() < 1e-6, key

    # The token went to the Hub in headers only: never to a file, a log line or the checkpoint.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in rerun.stdout + rerun.stderr + out + err
    assert all(TOKEN.encode() not in data for data in remote.values())


def test_checkpoints_of_another_spec_in_a_shared_folder_are_refused_unless_restart(tmp_path, make_spec, hub):
    shared = {**SYNC, "path_in_repo": "shared"}
    first = sync_spec(make_spec, "shared", max_steps=4, checkpoint_sync=shared)
    result = run_cli("run", first, env=env_for(hub), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.rmtree(tmp_path / "runs" / "shared")
    from job import stages
    from job.specfile import load_spec

    first_print = stages.fingerprints(load_spec(str(first)))["train"]  # the file is rewritten below

    changed = sync_spec(make_spec, "shared", max_steps=4, learning_rate=1e-3, checkpoint_sync=shared)
    result = run_cli("run", changed, env=env_for(hub), timeout=600)
    assert result.returncode == 2
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "checkpoint_sync" in message[0] and "--restart" in message[0]

    before = dict(hub.files[SYNC["repo"]])
    result = run_cli("run", changed, "--restart", env=env_for(hub), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = events(result.stdout)
    assert not [e for e in log if e["event"] in ("checkpoint_restored", "train_resumed")]
    # the first experiment's remote steps are never written over: the restarted one trains from scratch, warns
    assert [e for e in log if e["event"] == "checkpoint_sync_foreign"]
    remote = hub.files[SYNC["repo"]]
    assert all(remote.get(name) == data for name, data in before.items())
    marker = json.loads(remote["shared/checkpoint-4/peftopt-checkpoint.json"])
    assert marker["train_fingerprint"] == first_print


def test_missing_sync_token_fails_before_any_work(tmp_path, make_spec, hub):
    spec = sync_spec(make_spec, "notoken")
    env = {**env_for(hub), "PEFTOPT_TEST_TOKEN": ""}
    result = run_cli("run", spec, env=env, timeout=120)
    assert result.returncode == 2
    assert "train.checkpoint_sync.token_env" in result.stderr
    assert not (tmp_path / "runs" / "notoken").exists()
