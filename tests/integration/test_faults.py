"""Reliability under faults: SIGKILL anywhere, a full disk, two runs at once. Each fault is real (a killed
subprocess, a file-size limit the kernel enforces, two concurrent processes), never a mock.

Figures in README ("Faults survived") come from this file: `pytest tests/integration/test_faults.py -v`.
"""
import csv
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KILL_POINTS = int(os.environ.get("PEFTOPT_KILL_POINTS", "20"))
STAGE_CYCLE = ("prepare", "train", "evaluate", "merge", "gguf", "push")
TOKEN = "hf_CanaryKillToken0123456789abcdefg"
HUB_ENV: dict = {}  # set while a Hub stand-in serves the test


def start(spec: Path, **popen):
    return subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json", **HUB_ENV}, **popen)


def finish(spec: Path, **popen) -> subprocess.CompletedProcess:
    proc = start(spec, **popen)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_state_claims(run_dir: Path) -> None:
    """state.json parses, and every artifact a finished stage claims is there and whole."""
    state = json.loads((run_dir / "state.json").read_text())
    for name, info in state["stages"].items():
        if info.get("status") == "done":
            for artifact in info.get("artifacts", []):
                path = run_dir / artifact
                assert path.exists(), f"{name} claims {artifact}, which is missing"
                assert ".tmp-" not in str(path)
    if (run_dir / "adapter").exists():  # a directory artifact appears only complete
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def spec_for(make_spec, name, hub: bool = False):
    extra = {"push": {"adapter_repo": f"me/{name}-lora", "gguf_repo": f"me/{name}-gguf",
                      "token_env": "PEFTOPT_TEST_TOKEN"}} if hub else {}
    sync = {"checkpoint_sync": {"repo": f"me/{name}-checkpoints", "token_env": "PEFTOPT_TEST_TOKEN"}} if hub else {}
    return make_spec(name, train={"max_steps": 8, "save_steps": 2, **sync},
                     evaluate={"prompts": ["Tell me one thing about rain.", "Say hello."], "max_new_tokens": 8,
                               "targets": ["adapter"]},
                     export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpe", "verify_tokens": 4},
                     **extra)


@pytest.fixture
def hub_standin(tmp_path):
    from hub_standin import HubStandIn

    with HubStandIn(TOKEN) as hub:
        HUB_ENV.update({"PEFTOPT_TEST_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                        "HF_HUB_DISABLE_TELEMETRY": "1", "PEFTOPT_HUB_BACKOFF_S": "0.01",
                        "HF_HOME": str(tmp_path / "hf-home")})
        yield hub
    HUB_ENV.clear()


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_ends_as_an_uninterrupted_run(tmp_path, make_spec, hub_standin):
    """20 kill points spread over every stage, push and checkpoint sync included."""
    import torch
    from safetensors.torch import load_file

    reference = spec_for(make_spec, "reference", hub=True)
    assert finish(reference).returncode == 0
    ref_dir = tmp_path / "runs" / "reference"
    ref_events = [json.loads(line) for line in (ref_dir / "events.jsonl").read_text().splitlines()]
    durations = {e["stage"]: e["runtime_s"] for e in ref_events if e["event"] == "stage_finished"}

    victim = spec_for(make_spec, "victim", hub=True)
    run_dir = tmp_path / "runs" / "victim"
    rng = random.Random(20261122)
    kills, stages_hit = 0, set()
    for _ in range(KILL_POINTS * 3):
        if kills == KILL_POINTS:
            break
        state_path = run_dir / "state.json"
        done = {n for n, i in json.loads(state_path.read_text())["stages"].items() if i.get("status") == "done"} \
            if state_path.exists() else set()
        # spread the kills over every stage, in turn, a stage no kill has landed in yet first: a stage that is short
        # on this machine (evaluate's two 8-token answers) can end before its random kill point more than once
        unhit = [s for s in STAGE_CYCLE if s not in stages_hit]
        again = bool(unhit) and kills >= len(STAGE_CYCLE)
        wanted = unhit[0] if again else STAGE_CYCLE[kills % len(STAGE_CYCLE)]
        share = 0.3 if again else 0.8  # a second try at a stage kills it earlier on
        if wanted in done:  # a chain of kills got past it: start a new chain from scratch
            shutil.rmtree(run_dir)
        proc = start(victim)
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "stage_started" and event["stage"] == wanted:
                time.sleep(rng.random() * share * durations[wanted])  # somewhere inside the stage
                proc.kill()
                break
        code = proc.wait(timeout=600)
        if code == 0:  # finished before its kill point
            shutil.rmtree(run_dir)
            continue
        assert code == -signal.SIGKILL
        kills += 1
        state = json.loads(state_path.read_text())
        stages_hit |= {n for n, i in state["stages"].items() if i.get("status") == "running"}  # where it died
        check_state_claims(run_dir)
    final = finish(victim)
    assert final.returncode == 0, final.stderr[-2000:]
    check_state_claims(run_dir)
    warnings = sum('"checkpoint_incomplete"' in line for line in (run_dir / "events.jsonl").read_text().splitlines())
    want, got = load_file(str(ref_dir / "adapter" / "adapter_model.safetensors")), \
        load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ref_gguf = (ref_dir / "gguf" / "reference-q8_0.gguf").read_bytes()
    got_gguf = (run_dir / "gguf" / "victim-q8_0.gguf").read_bytes()
    assert ref_gguf == got_gguf  # the converter is deterministic and names the model after merged/, not the run
    # the Hub holds exactly what an uninterrupted run pushes, and the adapter pushed is the one on disk
    names = lambda run: {repo.split("/")[1].replace(run, ""): {f.replace(run, "") for f in files}  # noqa: E731
                         for repo, files in hub_standin.files.items() if repo.startswith(f"me/{run}-")
                         and not repo.endswith("-checkpoints")}
    assert names("victim") == names("reference")
    assert hub_standin.files["me/victim-lora"]["adapter_model.safetensors"] == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert {"train", "push"} <= stages_hit  # kills landed while checkpoints synced and while pushing
    assert TOKEN not in (run_dir / "events.jsonl").read_text()
    print(f"\nkill points survived: {kills}, stages hit: {sorted(s for s in stages_hit if s)}, "
          f"incomplete checkpoints skipped: {warnings}")
    assert kills == KILL_POINTS and set(STAGE_CYCLE) <= stages_hit  # every stage, push included, was hit


def test_half_written_checkpoint_is_skipped_with_a_warning(tmp_path, make_spec):
    spec = make_spec("torn", train={"max_steps": 6, "save_steps": 2})
    assert finish(spec).returncode == 0
    run_dir = tmp_path / "runs" / "torn"
    # Make it look killed mid-save of checkpoint-6: its optimizer file cut short, adapter not finished.
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["train"] = {"status": "running", "fingerprint": state["stages"]["train"]["fingerprint"]}
    (run_dir / "state.json").write_text(json.dumps(state))
    import shutil

    shutil.rmtree(run_dir / "adapter")
    optimizer = run_dir / "checkpoints" / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = finish(spec)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    warning = next(e for e in events if e["event"] == "checkpoint_incomplete")
    assert warning["path"].endswith("checkpoint-6") and warning["level"] == "warning"
    resumed = next(e for e in events if e["event"] == "train_resumed")
    assert resumed["step"] == 4


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("export,limit,failing", [
    ({"merge": True}, 2_000_000, "merge"),  # the merged bf16 safetensors is about 2.6 MB
    ({"merge": True, "gguf": ["f32"], "tokenizer_pre": "llama-bpe", "verify_tokens": 4}, 4_000_000, "gguf"),
])
def test_disk_full_in_a_late_stage_keeps_the_previous_state(tmp_path, make_spec, export, limit, failing):
    spec = make_spec("full", train={"max_steps": 2, "save_steps": 100}, export=export)
    run_dir = tmp_path / "runs" / "full"
    result = finish(spec, preexec_fn=_limit_file_size(limit))
    assert result.returncode == 4, (result.returncode, result.stderr[-2000:])
    # merge writes in-process (peftopt names the disk error); the converter is a child that reports its own
    assert ("disk error" in result.stderr or "requested and" in result.stderr) and "Traceback" not in result.stderr
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["train"]["status"] == "done" and state["stages"][failing]["status"] == "failed"
    assert not (run_dir / failing).exists() and not list(run_dir.glob(f"{failing}.tmp-*"))
    check_state_claims(run_dir)
    again = finish(spec)
    assert again.returncode == 0, again.stderr[-2000:]
    started = [json.loads(line)["stage"] for line in again.stdout.splitlines() if '"stage_started"' in line]
    assert started[0] == failing


def test_disk_full_while_saving_a_checkpoint_exits_4_and_resume_works(tmp_path, make_spec):
    spec = make_spec("ckfull", train={"max_steps": 6, "save_steps": 2})
    run_dir = tmp_path / "runs" / "ckfull"
    result = finish(spec, preexec_fn=_limit_file_size(400_000))  # optimizer.pt of r=8 is about 550 kB
    assert result.returncode == 4, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    check_state_claims(run_dir)
    again = finish(spec)
    assert again.returncode == 0, again.stderr[-2000:]


def test_second_run_of_the_same_spec_is_refused_while_the_first_holds_it(tmp_path, make_spec):
    spec = make_spec("busy", train={"max_steps": 30})
    first = start(spec)
    for line in first.stdout:
        if '"stage_started"' in line:
            break
    second = finish(spec)
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert second.returncode == 2 and "run already in progress" in second.stderr
    # a dead holder does not keep the lock: a killed run's directory can be rerun at once
    third = start(spec)
    for line in third.stdout:
        if '"stage_started"' in line:
            break
    third.kill()
    third.wait()
    assert finish(spec).returncode == 0


def test_two_runs_append_whole_rows_to_one_experiments_log(tmp_path, make_spec):
    specs = [make_spec(f"pair{i}", train={"max_steps": 2}) for i in range(2)]
    procs = [start(s) for s in specs]
    for proc in procs:
        proc.communicate(timeout=600)
        assert proc.returncode == 0
    with open(tmp_path / "runs" / "experiments_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run_name"] for r in rows) == ["pair0", "pair1"]
    assert all(r["final_loss"] and r["finished_at"] for r in rows)


def test_killed_after_the_last_checkpoint_ends_with_exactly_that_adapter(tmp_path, make_spec):
    """A kill between the max_steps checkpoint and the adapter save: the rerun must not train on (the
    Trainer, resumed at max_steps, would take one step more) and must give the same adapter."""
    from safetensors.torch import load_file

    spec = make_spec("last", train={"max_steps": 4, "save_steps": 2})
    first = run_cli("run", spec, "--stages", "prepare,train")
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "last"
    want = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    # What the kill leaves behind: checkpoint-4 complete, no adapter, the train stage still running.
    import shutil

    shutil.rmtree(run_dir / "adapter")
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["train"] = {"status": "running"}
    (run_dir / "state.json").write_text(json.dumps(state))

    rerun = finish(spec)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert train["global_step"] == 4 and not (run_dir / "checkpoints" / "checkpoint-5").exists()
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    assert train["loss_curve"] and train["loss_curve"][-1]["step"] == 4


def test_a_checkpoint_of_an_earlier_version_resumes_to_the_uninterrupted_adapter(tmp_path, make_spec):
    """A run directory kept from before the optimizer state was packed (job/statefile.py): its checkpoint's
    optimizer.pt is the plain state dict torch.save wrote. The rerun resumes from it (the Adam moments with it: the
    adapter is the uninterrupted run's, bit for bit)."""
    import torch
    from safetensors.torch import load_file

    from job import statefile
    from job.checkpoints import marker_fingerprint, write_marker

    spec = make_spec("earlier", train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3})
    first = run_cli("run", spec, "--stages", "prepare,train")
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "earlier"
    want = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    packed = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert packed["format"] == statefile.FORMAT
    torch.save(statefile.load(checkpoint / "optimizer.pt"), checkpoint / "optimizer.pt")
    write_marker(checkpoint, 4, marker_fingerprint(checkpoint))
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "adapter")
    state = json.loads((run_dir / "state.json").read_text())
    state["stages"]["train"]["status"] = "interrupted"
    (run_dir / "state.json").write_text(json.dumps(state))

    rerun = finish(spec)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = [json.loads(line) for line in rerun.stdout.splitlines() if '"train_resumed"' in line]
    assert [e["step"] for e in resumed] == [4]
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
