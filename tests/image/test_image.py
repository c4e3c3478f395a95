"""Image: the image users run, built from the Dockerfile by `make test-image` (docker/test-image.sh) and run
here in a real Docker engine on CPU. The CLI answers without torch; `peftopt env` shows the locked versions,
torch's CUDA build and the llama.cpp build; the demo job runs end to end as the image's non-root user with
its run directory on a mounted volume; `docker stop` and `docker kill` mid-training are followed by the same
command, which resumes and ends with the adapter of an uninterrupted run; a token passed with -e appears in no
log line and no file. Skipped (and counted) unless PEFTOPT_IMAGE names a built image.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

import tiny

IMAGE = os.environ.get("PEFTOPT_IMAGE")
ROOT = Path(__file__).resolve().parents[2]
CANARY = "hf_imagecanary" + "Q7xZ" * 6
pytestmark = [pytest.mark.image,
              pytest.mark.skipif(not IMAGE, reason="needs a built image: `make test-image` (PEFTOPT_IMAGE)")]


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def volume(path: Path) -> Path:
    """A host directory the image's user (uid 1000) may write to."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def run_args(runs: Path, inputs: Path | None = None, name: str | None = None) -> list[str]:
    args = ["-v", f"{runs}:/runs", "-e", f"HF_TOKEN={CANARY}"]
    if inputs is not None:
        args += ["-v", f"{inputs}:/work/in:ro"]
    return args + (["--name", name] if name else [])


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


NOTED_EVENTS = ("stop_requested", "checkpoint_saved", "checkpoint_incomplete", "checkpoint_refused",
                "job_interrupted", "grace_expired", "stage_skipped", "train_resumed", "train_finished")


def assert_same_adapter(want_dir: Path, got_dir: Path, logs: list[str]) -> None:
    """The rerun ends with the uninterrupted run's adapter, tensor for tensor. On a mismatch the message says
    where the two loss curves (metrics.json, full precision) part, and what the containers logged about stopping,
    checkpoints and resuming: curves that part at or before the resumed step mean the stopped run itself trained
    differently; curves that part after it mean the resume restored the wrong state or data position."""
    import torch

    want, got = adapter(want_dir), adapter(got_dir)
    assert want.keys() == got.keys()
    differing = [key for key in want if not torch.allclose(want[key], got[key], atol=1e-6)]
    if not differing:
        return
    curves = [{p["step"]: p["loss"] for p in json.loads((d / "metrics.json").read_text())["train"]["loss_curve"]}
              for d in (want_dir, got_dir)]
    parted = next((step for step in sorted(curves[0]) if curves[1].get(step) != curves[0][step]), None)
    resumed = json.loads((got_dir / "metrics.json").read_text())["train"].get("resumed_from_step")
    noted = [{k: v for k, v in e.items() if k in ("event", "step", "checkpoint", "error", "why", "stage")}
             for text in logs for e in events(text) if e["event"] in NOTED_EVENTS]
    worst = max((want[k] - got[k]).abs().max().item() for k in differing)
    pytest.fail(f"{len(differing)} of {len(want)} adapter tensors differ (first {differing[0]}, max |diff| "
                f"{worst:.2e}); resumed from step {resumed}; loss curves part at step {parted} (uninterrupted "
                f"{curves[0].get(parted)}, this run {curves[1].get(parted)}; {len(curves[0])} and {len(curves[1])} "
                f"steps); events: {json.dumps(noted)}")


def wait_for_event(container: str, event: str, at_least: int = 1, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = docker("logs", container).stdout
        if sum(e.get("event") == event for e in events(logs)) >= at_least:
            return
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        assert state == "true", f"{container} stopped before {event}: {docker('logs', container).stderr[-2000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {event} from {container} in {timeout} s")


def canary_free(*roots: Path, logs: list[str]) -> None:
    for text in logs:
        assert CANARY not in text
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes(), path


def test_help_answers_without_importing_torch():
    result = docker("run", "--rm", IMAGE, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr
    probe = ("import sys; sys.argv = ['peftopt', '--help']\n"
             "from job.cli import cli\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe)
    assert result.returncode == 0, result.stderr


def test_the_harness_is_installed_apart_and_reached_by_its_child_process_only():
    probe = "import importlib.util as u; print(u.find_spec('sklearn') is None, u.find_spec('lm_eval') is None)"
    result = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", probe)
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr
    listing = ("from job import harness, settings\n"
               "print(harness._child('tasks', {'tasks': ['arc_easy', 'no_such_task']}, settings.get(), 'listing'))")
    result = docker("run", "--rm", "--entrypoint", "python", IMAGE, "-c", listing)
    assert result.returncode == 0 and "'unknown': ['no_such_task']" in result.stdout, result.stderr[-2000:]


def test_env_shows_the_locked_versions_torch_cuda_build_and_llama_cpp():
    result = docker("run", "--rm", IMAGE, "env", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    locked = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M))
    for name, version in info["versions"].items():
        if name != "peftopt":
            assert version == locked[name.replace("_", "-")], name
    assert info["versions"]["unsloth"] and info["versions"]["torch"] == locked["torch"]
    assert info["hardware"]["torch_cuda_build"].startswith("13.")
    build = (ROOT / "docker" / "build-llama-cpp.sh").read_text()
    sdist = re.search(r"LLAMA_CPP_PYTHON_VERSION:-([\d.]+)", build).group(1)
    digest = re.search(r"LLAMA_CPP_SDIST_SHA256:-([0-9a-f]{64})", build).group(1)
    assert info["llama_cpp"]["prefix"] == "/opt/llama.cpp"
    assert info["llama_cpp"]["version"].startswith(f"llama-cpp-python=={sdist} sha256={digest}")


def test_code_checks_are_sandboxed_in_the_image():
    """As the image's user under Docker's default seccomp profile (no user namespaces there): every attack of
    tests/security/test_model_output.py fails inside the sandbox, the honest answer passes, and the token is out of reach."""
    from security.test_model_output import ATTACKS

    probe = (
        "import json, os, sys\n"
        "from job.evaluation import checks, sandbox\n"
        "from job import settings\n"
        "print(json.dumps({'uid': os.getuid(), 'available': sandbox.available(settings.get().tool_env())}))\n"
        "for name, code in json.loads(sys.argv[1]).items():\n"
        "    code = code.format(leak='/tmp/leak.txt', parent=os.getpid())\n"
        "    result = checks.python_function('```python\\n' + code + '```', cases=[['ab', 'ba']], timeout_s=3)\n"
        "    print(json.dumps({'attack': name, **result, 'leaked': os.path.exists('/tmp/leak.txt')}))\n"
        "good = checks.python_function('```python\\ndef f(s):\\n    return s[::-1]\\n```', cases=[['ab', 'ba']])\n"
        "print(json.dumps({'attack': 'none', **good}))\n"
    )
    result = docker("run", "--rm", "-e", f"HF_TOKEN={CANARY}", "--entrypoint", "python", IMAGE, "-c", probe,
                    json.dumps(ATTACKS), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["uid"] == 1000 and lines[0]["available"] == [True, "isolated"], lines[0]
    outcomes = {line["attack"]: line for line in lines[1:]}
    for attack in ATTACKS:
        assert outcomes[attack]["passed"] is False and outcomes[attack]["isolated"] is True, outcomes[attack]
        assert not outcomes[attack]["leaked"]
    assert outcomes["none"]["passed"] is True and outcomes["none"]["isolated"] is True
    assert CANARY not in result.stdout + result.stderr


def test_demo_job_end_to_end_as_the_image_user_on_a_volume(tmp_path):
    runs = volume(tmp_path / "runs")
    started = time.monotonic()
    result = docker("run", "--rm", *run_args(runs), IMAGE, "jobspecs/smoke.json", timeout=3600)
    print(f"demo in the image: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = runs / "smoke_gemma3_270m"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "done"
    assert all(state["stages"][s]["status"] == "done" for s in ("prepare", "train", "evaluate", "merge", "gguf"))
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_uid == 1000  # the image's user wrote it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 24 and metrics["train"]["backend"] == "hf"
    q8 = metrics["gguf"]["files"]["q8_0"]
    assert (run_dir / "gguf" / q8["file"]).stat().st_size == q8["size_bytes"] > 100_000_000
    assert q8["verify"]["tokenizer_match"] and q8["verify"]["prompts"]  # llama.cpp loaded and answered it
    assert metrics["run"]["hardware"]["torch_cuda_build"].startswith("13.")
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert {"base", "adapter", "merged", "gguf-q8_0"} <= set(summary["targets"])
    canary_free(runs, logs=[result.stdout, result.stderr])
    from conftest import assert_documented_events

    assert_documented_events((run_dir / "events.jsonl").read_text().splitlines() + result.stdout.splitlines())


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> Path:
    """A tiny model, its data and a jobspec that trains for a while, in a directory mounted read-only."""
    inputs = tmp_path_factory.mktemp("image-inputs")
    tiny.make_model(inputs / "model")
    tiny.write_data(inputs / "data.jsonl", n=96)
    spec = {
        "name": "tiny", "output_dir": "/runs",
        "model": {"base": "/work/in/model", "max_seq_length": 128, "chat_template": "llama-3"},
        "data": {"source": "/work/in/data.jsonl"},
        "lora": {"r": 8, "alpha": 16},
        "train": {"backend": "hf", "max_steps": 80, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                  "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0, "optim": "adamw_torch",
                  "save_steps": 5, "seed": 0},
        "push": {"adapter_repo": "someone/peftopt-image-test", "token_env": "HF_TOKEN"},
    }
    (inputs / "tiny.json").write_text(json.dumps(spec))
    for path in [inputs, *inputs.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return inputs


def tiny_command(inputs: Path, runs: Path, name: str | None = None) -> list[str]:
    # --dry-run: the push stage reads the token and plans its uploads, and nothing leaves the machine.
    return [*run_args(runs, inputs, name), IMAGE, "/work/in/tiny.json", "--dry-run"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_inputs, tmp_path_factory) -> tuple[Path, list[str]]:
    runs = volume(tmp_path_factory.mktemp("uninterrupted"))
    result = docker("run", "--rm", *tiny_command(tiny_inputs, runs), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(e["event"] == "push_planned" for e in events(result.stdout))
    return runs / "tiny", [result.stdout, result.stderr]


@contextmanager
def training_container(inputs: Path, runs: Path, checkpoints: int):
    """A detached container of the tiny job, yielded once it has saved `checkpoints` checkpoints; removed after."""
    name = f"peftopt-test-{uuid.uuid4().hex[:8]}"
    try:
        started = docker("run", "-d", *tiny_command(inputs, runs, name))
        assert started.returncode == 0, started.stderr
        wait_for_event(name, "checkpoint_saved", at_least=checkpoints)
        yield name
    finally:
        docker("rm", "-f", name)


def test_docker_stop_exits_75_within_the_grace_and_the_same_command_resumes(tiny_inputs, uninterrupted, tmp_path):
    runs = volume(tmp_path / "runs")
    with training_container(tiny_inputs, runs, checkpoints=2) as name:
        began = time.monotonic()
        docker("stop", "-t", "120", name, timeout=180)  # SIGTERM; SIGKILL only after 120 s
        stopped_after = time.monotonic() - began
        code = int(docker("wait", name).stdout.strip())
        logs = docker("logs", name)
    assert code == 75, logs.stderr[-2000:]
    assert stopped_after < 20, f"took {stopped_after:.1f} s, longer than train.grace_period_s"
    stop_events = events(logs.stdout)
    assert any(e["event"] == "job_interrupted" or e.get("exit_code") == 75 for e in stop_events)
    state = json.loads((runs / "tiny" / "state.json").read_text())
    assert state["status"] == "interrupted" and state["stages"]["train"]["status"] == "interrupted"

    again = docker("run", "--rm", *tiny_command(tiny_inputs, runs), timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(e["event"] == "train_resumed" for e in events(again.stdout))
    assert_same_adapter(uninterrupted[0], runs / "tiny", [logs.stdout, again.stdout])
    canary_free(runs, uninterrupted[0].parent, logs=[logs.stdout, logs.stderr, again.stdout, again.stderr,
                                                      *uninterrupted[1]])


def test_docker_kill_mid_run_then_the_same_command_finishes(tiny_inputs, uninterrupted, tmp_path):
    runs = volume(tmp_path / "runs")
    with training_container(tiny_inputs, runs, checkpoints=3) as name:
        docker("kill", name)  # SIGKILL: nothing is saved on the way out
        code = int(docker("wait", name).stdout.strip())
        logs = docker("logs", name)
    assert code == 137
    again = docker("run", "--rm", *tiny_command(tiny_inputs, runs), timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(e["event"] == "train_resumed" for e in events(again.stdout))
    assert_same_adapter(uninterrupted[0], runs / "tiny", [logs.stdout, again.stdout])
    canary_free(runs, logs=[logs.stdout, logs.stderr, again.stdout, again.stderr])
