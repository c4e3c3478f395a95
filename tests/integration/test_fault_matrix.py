"""Integration: every call peftopt makes outside the process, against each way it fails. The Hub calls (repo
creation and upload in push, checkpoint-sync upload, listing and restore, model download) run as peftopt
makes them, in a fresh process, against the Hub stand-in driven by the real huggingface_hub client; the
llama.cpp tools (converter, quantizer, generator) are replaced by ones that crash or answer garbage. Each cell
asserts the documented outcome: exit 4 with one line naming the Hugging Face Hub or the tool and what to do,
no traceback, nothing half-written, and the rerun (the fault gone) succeeds. README "Faults survived" lists
the matrix."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hub_cell
from conftest import run_cli, write_tiny_spec
from hub_standin import HubStandIn

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_CanaryFaultToken0123456789abcd"
OPS = ["create", "upload", "list", "commit", "restore", "model"]
# fault -> (exit code, words the one line must hold); None: the call recovers (exit 0)
FAULTS = {
    "refused": (4, "unreachable or failing"),
    "drop": (4, "unreachable or failing"),
    "reset": (4, "unreachable or failing"),
    "timeout then ok": None,
    "429 then ok": None,
    "503 then ok": None,
    "503 always": (4, "after 3 tries"),
    "401": (4, "rejected the token"),
    "403": (4, "rejected the token"),  # "refused access (HTTP 403): it rejected the token, or ..."
    "404": (4, "no such repo or file"),
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell(op: str, run_dir: Path, endpoint: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_TEST_TOKEN": TOKEN, "HF_TOKEN": "",
           "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home),
           "PEFTOPT_HUB_BACKOFF_S": "0.01", "PEFTOPT_HUB_RETRIES": "3",
           "HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_ETAG_TIMEOUT": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "hub_cell.py"), op, str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=180)


def result_of(proc) -> dict:
    return json.loads(proc.stdout.splitlines()[-1])["result"]


@pytest.fixture(scope="module")
def tiny_files(tiny_model):
    return tiny_model


def expected(op: str, fault: str):
    """(exit code, words) for a refusal; "recovers" (retried, then done); "nothing there" (a listing or restore
    that finds no repo: nothing was synced, training starts from scratch)."""
    if fault in ("429 then ok", "503 then ok", "timeout then ok"):
        return "recovers"
    if fault == "404" and op in ("list", "restore"):
        return "nothing there"
    if fault == "404" and op == "commit":
        return "recovers"  # the upload creates its repo
    return FAULTS[fault]


def skipped(op: str, fault: str) -> str | None:
    if fault == "timeout then ok" and op not in ("restore", "model"):
        return "client timeouts apply to downloads (HF_HUB_DOWNLOAD_TIMEOUT); API calls wait for an answer"
    if fault == "404" and op == "create":
        return "creating a repo has no 'not found'"
    return None


def run_cell(op: str, fault: str, tmp_path: Path, tiny_files) -> dict:
    """The call under the fault, then (unless it recovered by itself) again with the fault gone."""
    run_dir, home = tmp_path / "run", tmp_path / "hf"
    with HubStandIn(TOKEN) as hub:
        def publish():
            hub.add_repo("me/tiny", tiny_files)
            if op != "create":
                hub.repos["me/faults"] = {"private": True}
                hub.files.setdefault("me/faults", {})
            if op in ("list", "restore"):  # a checkpoint synced by an earlier attempt
                synced = hub_cell.checkpoint(tmp_path / "seed", 2)
                hub.files["me/faults"].update({f"{hub_cell.FOLDER}/checkpoint-2/{p.name}": p.read_bytes()
                                               for p in synced.iterdir()})

        publish()
        if fault == "404":
            hub.repos.pop("me/tiny" if op == "model" else "me/faults")
        plan = {"drop": ["drop"] * 9, "reset": ["reset"] * 9, "timeout then ok": ["slow:1.5"] * 2,
                "429 then ok": ["429:1"], "503 then ok": ["503"], "401": ["401"] * 9, "403": ["403"] * 9}
        hub.fail_next = list(plan.get(fault, []))
        hub.fail_always = "503" if fault == "503 always" else None
        endpoint = f"http://127.0.0.1:{closed_port()}" if fault == "refused" else hub.url
        started = time.monotonic()
        proc = cell(op, run_dir, endpoint, home)
        elapsed = time.monotonic() - started
        faults_served = hub.faults_served
        checkpoints = run_dir / "checkpoints"
        left_behind = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
        again = None
        if expected(op, fault) != "recovers":
            hub.fail_next, hub.fail_always = [], None
            if fault == "404":
                publish()
            again = cell(op, run_dir, hub.url, home)
    return {"proc": proc, "elapsed": elapsed, "faults_served": faults_served, "again": again, "hub": hub,
            "left_behind": left_behind}


@pytest.fixture(scope="module")
def hub_cells(tmp_path_factory, tiny_files):
    """Every cell, four at a time (each its own stand-in, directory and processes); a test reads its own."""
    base = tmp_path_factory.mktemp("hub-cells")
    cells = [(op, fault) for op in OPS for fault in FAULTS if not skipped(op, fault)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return {(op, fault): pool.submit(run_cell, op, fault, base / f"cell{i}", tiny_files)
                for i, (op, fault) in enumerate(cells)}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("op", OPS)
def test_hub_call_under_fault(op, fault, request):
    if skipped(op, fault):
        pytest.skip(skipped(op, fault))
    result = request.getfixturevalue("hub_cells")[(op, fault)].result()
    proc, elapsed, hub = result["proc"], result["elapsed"], result["hub"]
    outcome = expected(op, fault)
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"') and '"event"' in line]
    if outcome == "recovers":
        assert proc.returncode == 0, proc.stderr[-1500:]
        if fault == "timeout then ok":  # huggingface_hub resumes a timed-out download itself
            assert result["faults_served"] == 2
        elif fault != "404":
            retried = [e for e in events if e["event"] == "hub_retry"]
            assert retried and retried[0]["reason"].startswith("HTTP"), proc.stdout[-1500:]
            if fault == "429 then ok":
                assert retried[0]["wait_s"] == 1.0 and elapsed >= 1.0  # Retry-After honoured
        did_the_work(op, proc, hub)  # it recovered by itself
        return
    if outcome == "nothing there":
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert result_of(proc) in ({"steps": []}, {"restored": None})
    elif op == "commit":  # a failed checkpoint upload is a warning; training goes on
        assert proc.returncode == 0 and result_of(proc)["failures"] == 1, proc.stderr[-1500:]
        warned = [e for e in events if e["event"] == "checkpoint_sync_failed"]
        assert warned and outcome[1] in warned[0]["error"] and "Hugging Face Hub" in warned[0]["error"]
    else:
        code, words = outcome
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1, proc.stderr[-1500:]
        assert lines[0].startswith("error: ") and words in lines[0] and "Hugging Face Hub" in lines[0]
        if op == "restore":  # nothing half-written: no checkpoint, no scratch folder left over
            assert result["left_behind"] == []
    # the fault gone, the same call does the work
    again = result["again"]
    assert again.returncode == 0, again.stderr[-1500:]
    did_the_work(op, again, hub)


def did_the_work(op: str, proc, hub) -> None:
    if op == "restore":
        assert result_of(proc)["restored"].endswith("checkpoint-2")
    if op == "model":
        assert (Path(result_of(proc)["snapshot"]) / "config.json").is_file()
    if op == "commit":
        assert result_of(proc)["failures"] == 0
        assert f"{hub_cell.FOLDER}/checkpoint-4/peftopt-checkpoint.json" in hub.files["me/faults"]


# ------------------------------------------------------------------------------ llama.cpp

# Each answers --help as the real tool does (preflight asks it), then fails at the work itself.
BROKEN_TOOLS = {
    "killed": "kill -9 $$",
    "garbage": "echo 'this is not what a llama.cpp tool prints'",
    "exits 1": "echo 'error: out of memory' >&2; exit 1",
}


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_model, tiny_data):
    """A run with train and merge done, so that each cell runs only the gguf stage."""
    out = tmp_path_factory.mktemp("tools")
    path = write_tiny_spec(out, tiny_model, tiny_data, "tools", lora={"r": 4, "alpha": 8}, train={"max_steps": 2},
                           export={"merge": True, "gguf": ["f16", "q4_k_m"], "tokenizer_pre": "llama-bpe",
                                   "verify_tokens": 6})
    done = run_cli("run", path, "--stages", "prepare,train,merge", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return path, out / "runs" / "tools"


def broken_prefix(tmp_path: Path, tool: str, behaviour: str) -> Path:
    """A copy of the pinned llama.cpp build with one tool replaced by one that fails that way."""
    from job import llamacpp

    prefix = tmp_path / "llama.cpp"
    shutil.copytree(llamacpp.find().prefix, prefix)
    target = prefix / tool
    if tool.endswith(".py"):
        target.write_text({"killed": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
                           "garbage": "import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'wb')"
                                      ".write(b'GGUF garbage')\n",
                           "exits 1": "import sys\nsys.exit('error: out of memory')\n"}[behaviour])
    else:
        real = prefix / (tool + ".real")
        target.rename(real)
        target.write_text(f'#!/bin/sh\n[ "$1" = --help ] && exec "{real}" --help\n{BROKEN_TOOLS[behaviour]}\n')
        target.chmod(0o755)
    return prefix


# A killed llama-quantize is the whole job's cell below (exit 4 at the CLI, the rerun redoes only gguf).
TOOL_CELLS = [(tool, behaviour) for tool in ("convert_hf_to_gguf.py", "bin/llama-quantize", "bin/peftopt-generate")
              for behaviour in BROKEN_TOOLS if (tool, behaviour) != ("bin/llama-quantize", "killed")]


@pytest.mark.parametrize("tool,behaviour", TOOL_CELLS)
def test_llama_cpp_tool_failure(tool, behaviour, merged_run, tmp_path, monkeypatch):
    """The gguf stage with the tool failing: ExternalError (exit 4) naming the tool in one line, no gguf/."""
    from job import settings
    from job.errors import ExternalError
    from job.rundir import RunDir
    from job.specfile import load_spec
    from job.stages import gguf
    from job.stages.base import RunContext

    spec_path, run_dir = merged_run
    monkeypatch.setenv("LLAMA_CPP_DIR", str(broken_prefix(tmp_path, tool, behaviour)))
    with pytest.raises(ExternalError) as failure:
        gguf.run(RunContext(spec=load_spec(spec_path), run_dir=RunDir(run_dir), settings=settings.init()))
    message = failure.value.message
    assert failure.value.exit_code == 4 and "\n" not in message
    assert any(name in message for name in ("convert_hf_to_gguf", "llama-quantize", "llama.cpp", ".gguf")), message
    assert not (run_dir / "gguf").exists()  # nothing half-written


def test_a_killed_quantizer_exits_4_and_the_rerun_redoes_only_gguf(merged_run, tmp_path):
    from job import llamacpp

    spec_path, run_dir = merged_run
    failed = run_cli("run", spec_path, timeout=600,
                     env={"LLAMA_CPP_DIR": str(broken_prefix(tmp_path, "bin/llama-quantize", "killed"))})
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 4 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert lines[-1].startswith("error: gguf") or "llama-quantize" in lines[-1], lines[-1]
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert not (run_dir / "gguf").exists()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["merge"]["status"] == "done" and state["stages"]["gguf"]["status"] == "failed"
    rerun = run_cli("run", spec_path, timeout=600, env={"LLAMA_CPP_DIR": str(llamacpp.find().prefix)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    skipped = {json.loads(line)["stage"] for line in rerun.stdout.splitlines() if '"stage_skipped"' in line}
    assert {"prepare", "train", "merge"} <= skipped  # only the failed stage runs again
