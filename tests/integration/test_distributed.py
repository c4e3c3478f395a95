"""Integration: data-parallel training on CPU (gloo), two real processes on the tiny model.

The same code runs NCCL on GPUs (`make test-gpu`, bench/gpu_multi.sh on the 2-GPU machine). Covered:
`peftopt run --nproc 2`, an external `torchrun`, rank 0 alone speaking and writing, SIGTERM to the
launcher (exit 75, both ranks stop at one step, resume lands on the uninterrupted adapter), a rank killed
mid-training (exit 75, the rerun resumes to the same adapter), and exit codes carried back from rank 0.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job import settings
from safetensors.torch import load_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
TRAIN = {"max_steps": 8, "per_device_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 2}


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run(args: list[str], timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=timeout)


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_model, tiny_data):
    """An uninterrupted `peftopt run --nproc 2`, its spec and its output."""
    out = tmp_path_factory.mktemp("dp")
    spec = {"name": "dp", "output_dir": str(out / "runs"),
            "model": {"base": str(tiny_model), "max_seq_length": 128, "chat_template": "llama-3"},
            "data": {"source": str(tiny_data)}, "lora": {"r": 8, "alpha": 16},
            "train": {"backend": "hf", **TRAIN, "learning_rate": 5e-3, "lr_scheduler": "constant",
                      "warmup_steps": 0, "optim": "adamw_torch", "seed": 0},
            "evaluate": {"prompts": ["Tell me one thing about rain."], "max_new_tokens": 8, "targets": ["adapter"]}}
    path = out / "dp.json"
    path.write_text(json.dumps(spec))
    result = run([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, spec, result


def write(out: Path, spec: dict, name: str, **changes) -> Path:
    data = json.loads(json.dumps(spec))
    data["name"] = name
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    path = out / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_two_ranks_train_together_and_rank0_alone_writes(two_rank_run):
    out, spec, result = two_rank_run
    log = events(result.stdout)
    run_dir = out / "runs" / "dp"
    assert {e.get("rank") for e in log} == {None}  # only rank 0 speaks (others log warnings, with rank)
    assert sum(e["event"] == "job_started" for e in log) == 1
    progress = [e for e in log if e["event"] == "train_progress"]
    assert [e["step"] for e in progress] == list(range(1, 9))
    assert all({"step", "max_steps", "loss", "tokens_per_s", "eta_s"} <= set(e) for e in progress)
    started = next(e for e in log if e["event"] == "train_started")
    assert (started["ranks"], started["micro_batch"], started["accumulation"]) == (2, 2, 1)  # 4 sequences/step
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["global_step"] == 8
    assert metrics["train"]["final_loss"] < progress[0]["loss"]
    # Both ranks' tokens are counted: compare with one process taking the same 4 sequences per step.
    single = run([sys.executable, "-m", "job", "run", str(write(out, spec, "single")), "--stages", "prepare,train"])
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((out / "runs" / "single" / "metrics.json").read_text())["train"]
    assert 0.8 < metrics["train"]["tokens"] / one["tokens"] < 1.25
    for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):
        marker = json.loads((checkpoint / "peftopt-checkpoint.json").read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])  # listed after both wrote
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "done" and state["stages"]["evaluate"]["status"] == "done"
    assert (run_dir / "eval" / "adapter.jsonl").exists()
    csv = (out / "runs" / "experiments_log.csv").read_text().splitlines()
    assert sum(line.startswith("dp,") for line in csv) == 1  # one row, written by rank 0


def started_until_first_checkpoint(path: Path, run_dir: Path) -> subprocess.Popen:
    """`peftopt run PATH --nproc 2`, returned once its step-2 checkpoint is complete (or it ended)."""
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((run_dir / "checkpoints").glob("checkpoint-2/peftopt-checkpoint.json")):
            break
        time.sleep(0.05)
    return proc


def test_sigterm_stops_every_rank_at_one_step_and_resume_matches(two_rank_run, tmp_path):
    out, spec, _ = two_rank_run
    path = write(tmp_path, {**spec, "output_dir": str(tmp_path / "runs")}, "dp")
    run_dir = tmp_path / "runs" / "dp"
    proc = started_until_first_checkpoint(path, run_dir)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr[-3000:]
    assert time.monotonic() - signalled < 20
    log = events(stdout)
    stopped = max(e["step"] for e in log if e["event"] == "checkpoint_saved")
    assert 2 <= stopped < 8
    marker = json.loads((run_dir / "checkpoints" / f"checkpoint-{stopped}" / "peftopt-checkpoint.json").read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])
    assert json.loads((run_dir / "state.json").read_text())["status"] == "interrupted"

    # The rerun goes through an external launcher: torchrun sets RANK/WORLD_SIZE, peftopt follows them.
    rerun = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "job", "run", str(path)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = events(rerun.stdout)
    assert [e["step"] for e in log if e["event"] == "train_resumed"] == [stopped]
    assert_same(adapter(run_dir), adapter(out / "runs" / "dp"))


def ranks_of(launcher: int) -> dict[int, int]:
    """RANK -> pid of the launcher's children, from /proc."""
    found = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        env = dict(line.split("=", 1) for line in Path(f"/proc/{child}/environ").read_bytes().decode().split("\0")
                   if "=" in line)
        if "RANK" in env:
            found[int(env["RANK"])] = int(child)
    return found


def test_a_rank_killed_mid_training_exits_75_and_the_rerun_resumes_to_the_same_adapter(two_rank_run, tmp_path):
    """The OOM killer or a lost machine takes rank 1 (SIGKILL): rank 0's collective fails, the job ends with the
    retryable 75 and one line saying so, and the same command resumes to the uninterrupted run's adapter."""
    out, spec, _ = two_rank_run
    path = write(tmp_path, {**spec, "output_dir": str(tmp_path / "runs")}, "dp")
    run_dir = tmp_path / "runs" / "dp"
    proc = started_until_first_checkpoint(path, run_dir)
    os.kill(ranks_of(proc.pid)[1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: another rank of this 2-rank run was lost at step ") and "rerun the same" in line
    assert json.loads((run_dir / "state.json").read_text())["status"] == "interrupted"
    rerun = run([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [e["step"] for e in events(rerun.stdout) if e["event"] == "train_resumed"]
    assert len(resumed) == 1 and 2 <= resumed[0] < 8
    assert_same(adapter(run_dir), adapter(out / "runs" / "dp"))


def test_rank0_failure_code_reaches_the_launcher(two_rank_run, tmp_path):
    out, spec, _ = two_rank_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n{not json\n')
    path = write(tmp_path, {**spec, "output_dir": str(tmp_path / "runs")}, "broken", data={"source": str(bad)})
    # A waiting rank that missed rank 0's exit would sit out PEFTOPT_RANK_WAIT_S: the timeout catches that.
    result = run([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"], timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: data row 0: no assistant turn to learn from (in {bad}; set data.bad_rows='skip' to drop such rows)"]


def test_batch_is_shared_over_ranks(monkeypatch, make_spec):
    from transformers import LlamaConfig

    from job import backends
    from job.backends import plan
    from job.errors import SpecError
    from job.specfile import load_spec

    spec = load_spec(str(make_spec("plan", train={"per_device_batch_size": 2, "gradient_accumulation_steps": 4})))
    shape = lambda p: (p.micro_batch, p.accumulation)  # noqa: E731
    assert shape(plan.on_cpu(spec, 1)) == (2, 4)
    assert shape(plan.on_cpu(spec, 2)) == (2, 2)
    assert shape(plan.on_cpu(spec, 8)) == (1, 1)
    with pytest.raises(SpecError, match="cannot be shared evenly over 3 ranks"):
        plan.on_cpu(spec, 3)
    forced = load_spec(str(make_spec("forced", train={"per_device_batch_size": 2, "gradient_accumulation_steps": 4,
                                                      "micro_batch_size": 4})))
    assert shape(plan.on_cpu(forced, 2)) == (4, 1)
    with pytest.raises(SpecError, match="micro_batch_size"):
        plan.on_cpu(forced, 4)
    # On a GPU every rank plans its own share: 8 sequences over 2 ranks fit one micro-batch of 4 each.
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=512)
    for ranks, want in ((1, (8, 1)), (2, (4, 1))):
        chosen = plan.choose(spec, config, 80.0, backend="hf", ranks=ranks)
        assert shape(chosen) == want and chosen.gradient_checkpointing == "off"
    with pytest.raises(SpecError, match="over 3 ranks"):
        plan.choose(spec, config, 80.0, backend="hf", ranks=3)

    monkeypatch.setenv("WORLD_SIZE", "2")
    settings.init()
    assert backends.choose("auto", "cuda")[0] == "hf"
    with pytest.raises(SpecError, match="unsloth trains on one GPU"):
        backends.choose("unsloth", "cuda")


def test_nproc_is_checked():
    result = run([sys.executable, "-m", "job", "run", "jobspecs/smoke.json", "--nproc", "two"], timeout=60)
    assert result.returncode == 2
    assert "--nproc" in result.stderr


def test_a_single_process_uses_one_of_several_gpus(monkeypatch):
    from job import distributed

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    settings.init()
    assert distributed.visible_gpus() == 2
    assert distributed.pin_single_gpu() == ("3,5", "3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    settings.init()  # a process started now sees one GPU
    assert distributed.pin_single_gpu() is None  # one left: nothing to hide


def test_sigterm_while_rank0_evaluates_exits_75_and_the_rerun_redoes_only_that_stage(two_rank_run, tmp_path):
    out, spec, _ = two_rank_run
    prompts = [f"Tell me one thing about item {i}." for i in range(40)]
    path = write(tmp_path, {**spec, "output_dir": str(tmp_path / "runs")}, "later",
                 train={"max_steps": 2}, evaluate={"prompts": prompts, "max_new_tokens": 48, "targets": ["base", "adapter"]})
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    signalled = None
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "stage_started" and event["stage"] == "evaluate" and signalled is None:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
    code = proc.wait(timeout=60)
    assert code == 75 and time.monotonic() - signalled < 25, proc.stderr.read()[-3000:]
    state = json.loads((tmp_path / "runs" / "later" / "state.json").read_text())
    assert state["stages"]["train"]["status"] == "done" and state["stages"]["evaluate"]["status"] == "interrupted"
    rerun = run([sys.executable, "-m", "job", "run", str(path), "--nproc", "2"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = events(rerun.stdout)
    assert [e["stage"] for e in log if e["event"] == "stage_started"] == ["evaluate"]
    assert [e["stage"] for e in log if e["event"] == "stage_skipped"] == ["prepare", "train"]
