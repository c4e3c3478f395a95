"""Integration: the prepare stage in a child process of its own (PEFTOPT_PREPARE_AHEAD=1, job/stages/process.py),
as the job runs it on a GPU while unsloth imports: the same files and figures as in turn, its events in the job's
stream and events.jsonl, its errors the job's exit codes, and a child that is killed, stopped or orphaned leaves
nothing behind."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, assert_documented_events, events, run_cli


def _prepare_only(make_spec, name, **sections):
    return make_spec(name, evaluate=None, export={"merge": False, "gguf": []}, push=None, **sections)


def _scratch(run: Path) -> list[str]:
    return [p.name for p in [*run.iterdir(), *(run / "data").glob("*")] if ".tmp-" in p.name or ".old-" in p.name] \
        if run.is_dir() else []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_prepared_in_a_child_process_the_same_as_in_turn(tmp_path, make_spec):
    runs = {}
    for ahead in ("1", "0"):
        spec = _prepare_only(make_spec, f"ahead{ahead}")
        result = run_cli("run", spec, "--stages", "prepare", env={"PEFTOPT_PREPARE_AHEAD": ahead})
        assert result.returncode == 0, result.stderr[-3000:]
        runs[ahead] = (tmp_path / "runs" / f"ahead{ahead}", events(result.stdout))
    (child, child_events), (own, own_events) = runs["1"], runs["0"]
    assert (child / "data" / "train.jsonl").read_bytes() == (own / "data" / "train.jsonl").read_bytes()
    figures = [json.loads((run / "metrics.json").read_text())["prepare"] for run in (child, own)]
    assert figures[0] == figures[1]
    started = [e for e in child_events if e["event"] == "stage_ahead_started"]
    assert len(started) == 1 and started[0]["stage"] == "prepare" and started[0]["pid"] != os.getpid()
    assert not [e for e in own_events if e["event"] == "stage_ahead_started"]
    # the child's own event reaches the job's stdout and the run's events.jsonl, with the run and stage it belongs to
    prepared = [e for e in child_events if e["event"] == "data_prepared"]
    assert len(prepared) == 1 and prepared[0]["run"] == "ahead1" and prepared[0]["stage"] == "prepare"
    logged = [json.loads(line) for line in (child / "events.jsonl").read_text().splitlines()]
    assert [e["train"] for e in logged if e["event"] == "data_prepared"] == [prepared[0]["train"]]
    assert_documented_events(json.dumps(e) for e in child_events)
    assert not _scratch(child)


def test_a_bad_row_the_child_finds_is_the_same_one_line_exit_3(tmp_path, make_spec, tiny_data):
    """Row 250 is past the rows preflight reads: the child finds it, and the job fails as it would in turn."""
    rows = tiny_data.read_text().splitlines()
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([*(rows * 6)[:250], json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}),
                               *rows]) + "\n")
    outcomes = {}
    for ahead in ("1", "0"):
        spec = _prepare_only(make_spec, f"bad{ahead}", data={"source": str(data)})
        result = run_cli("run", spec, env={"PEFTOPT_PREPARE_AHEAD": ahead})
        failed = [e for e in events(result.stdout) if e["event"] == "job_failed"]
        assert result.returncode == 3 and len(failed) == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        outcomes[ahead] = failed[0]["error"]
        run = tmp_path / "runs" / f"bad{ahead}"
        assert not (run / "data").exists() and not _scratch(run)
    assert "row 250" in outcomes["1"]
    assert outcomes["1"] == outcomes["0"]


def _start(spec: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_PREPARE_AHEAD": "1", **env})


def _child_pid(proc: subprocess.Popen, seen: list[dict]) -> int:
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if event["event"] == "stage_ahead_started":
            return event["pid"]
    raise AssertionError(f"no stage_ahead_started: {proc.stderr.read()[-3000:]}")


def test_a_child_that_dies_leaves_the_stage_to_the_job(tmp_path, make_spec):
    """The child is killed (the kernel's OOM killer, say) before its result: the job logs it, prepares the data in
    its own process, and finishes with the same data."""
    spec = _prepare_only(make_spec, "killed")
    proc = _start(spec)
    seen: list[dict] = []
    os.kill(_child_pid(proc, seen), signal.SIGKILL)
    seen += events(proc.stdout.read())
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    failed = [e for e in seen if e["event"] == "stage_ahead_failed"]
    assert len(failed) == 1 and "-9" in failed[0]["error"], [e["event"] for e in seen]
    reference = _prepare_only(make_spec, "reference")
    assert run_cli("run", reference, "--stages", "prepare", env={"PEFTOPT_PREPARE_AHEAD": "0"}).returncode == 0
    runs = tmp_path / "runs"
    assert (runs / "killed" / "data" / "train.jsonl").read_bytes() == \
        (runs / "reference" / "data" / "train.jsonl").read_bytes()
    assert not _scratch(runs / "killed")


def test_a_stop_request_ends_the_child_and_the_rerun_prepares_again(tmp_path, make_spec):
    """SIGTERM to the job's process group while the child prepares: the child has a session of its own, the job
    ends it, exits 75 with state.json saying interrupted, and leaves no half-written data."""
    spec = _prepare_only(make_spec, "stopped")
    proc = _start(spec)
    child = _child_pid(proc, [])
    os.killpg(proc.pid, signal.SIGTERM)
    after = events(proc.stdout.read())
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    assert after[-1]["event"] == "job_interrupted"
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    run = tmp_path / "runs" / "stopped"
    assert json.loads((run / "state.json").read_text())["status"] == "interrupted"
    assert not (run / "data").exists() and not _scratch(run)
    rerun = run_cli("run", spec, env={"PEFTOPT_PREPARE_AHEAD": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_the_child_dies_with_the_job(tmp_path, make_spec):
    """The job's process killed outright (SIGKILL: no handler runs): the child does not live on writing into a run
    directory that a retry may already hold."""
    spec = _prepare_only(make_spec, "orphan")
    proc = _start(spec)
    child = _child_pid(proc, [])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
