"""Integration: checkpoints written by a process of their own (PEFTOPT_CHECKPOINT_WRITER=process, the default on
CUDA; job/checkpoints.py WriterProcess) hold what the writer thread's hold, tensor for tensor, whatever their dtype,
shape or layout; its write errors come back as OSErrors (the job's exit 4); the process dies with the job."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, events, run_cli


def _snapshot(root: Path, step: int, tensors: dict, optimizer: dict) -> dict:
    from peft import LoraConfig

    partial = root / f".checkpoint-{step}.partial"
    partial.mkdir(parents=True)
    return {"step": step, "adapter": tensors, "adapter_config": {"default": LoraConfig(r=4, target_modules=["q"])},
            "optimizer": optimizer, "scheduler": {"last_epoch": step, "lr": [1e-3]},
            "rng": {"python": __import__("random").getstate(), "cpu": __import__("torch").random.get_rng_state()},
            "trainer_state": json.dumps({"global_step": step}) + "\n", "dir": root, "partial": partial, "keep": 2}


def test_every_kind_of_tensor_comes_back_as_it_was(tmp_path):
    import torch
    from safetensors.torch import load_file

    from job.checkpoints import WriterProcess, complete_steps

    generator = torch.Generator().manual_seed(0)
    adapter = {"a.lora_A.weight": torch.randn(4, 8, generator=generator, dtype=torch.float32),
               "a.lora_B.weight": torch.randn(8, 4, generator=generator).to(torch.bfloat16)}
    wide = torch.randn(6, 10, generator=generator)
    optimizer = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": wide[:, ::2],  # not contiguous
                               "state1": torch.randint(0, 255, (33,), dtype=torch.uint8, generator=generator),
                               "absmax": torch.randn(3, generator=generator).half(),
                               "mask": torch.tensor([True, False, True]), "count": torch.tensor(2**40),
                               "empty": torch.empty(0, 5)},
                           1: {"exp_avg": torch.randn(2, 3, 4, generator=generator).double()}},
                 "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999)}]}
    writer = WriterProcess()
    try:
        for step in (1, 2, 3):  # the buffer reused, and the limit of 2 kept
            taken = writer.buffer.take((adapter, optimizer))
            writer.send(_snapshot(tmp_path, step, *taken), "print")
            final, seconds = writer.answer()
            assert final == tmp_path / f"checkpoint-{step}" and seconds > 0
    finally:
        writer.close()
    assert complete_steps(tmp_path) == [2, 3] and not list(tmp_path.glob(".checkpoint-*"))
    got = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    assert all(got[k].dtype == v.dtype and got[k].equal(v) for k, v in adapter.items())
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    for index, state in optimizer["state"].items():
        for name, tensor in state.items():
            back = saved["state"][index][name]
            assert back.dtype == tensor.dtype and back.shape == tensor.shape and back.equal(tensor), name
            assert back.is_contiguous() and back.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert saved["param_groups"] == [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999)}]
    assert json.loads((tmp_path / "checkpoint-3" / "adapter_config.json").read_text())["r"] == 4


def test_a_write_error_comes_back_from_the_writer_as_an_os_error(tmp_path):
    import errno

    import torch

    from job.checkpoints import WriterProcess

    writer = WriterProcess()
    try:
        snapshot = _snapshot(tmp_path, 1, *writer.buffer.take(({"w": torch.ones(3)}, {"state": {}})))
        (snapshot["partial"] / "trainer_state.json").mkdir()  # a directory where a file goes
        writer.send(snapshot, None)
        with pytest.raises(OSError) as raised:
            writer.answer()
        assert raised.value.errno == errno.EISDIR and not snapshot["partial"].exists()
        writer.send(_snapshot(tmp_path, 2, *writer.buffer.take(({"w": torch.ones(3)}, {"state": {}}))), None)
        assert writer.answer()[0] == tmp_path / "checkpoint-2"  # the writer goes on after an error
    finally:
        writer.close()


def test_a_file_size_limit_falls_back_to_the_thread_and_is_exit_4(tmp_path, make_spec):
    """RLIMIT_FSIZE also caps the memory shared with the writer process: the job writes with its thread instead,
    whose optimizer.pt then hits the limit: exit 4, one line, and the rerun without the limit finishes."""
    spec = make_spec("full", train={"max_steps": 6, "save_steps": 2})
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))  # optimizer.pt of r=8 is about 550 kB

    env = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_CHECKPOINT_WRITER": "process"}
    failed = subprocess.run([sys.executable, "-m", "job", "run", str(spec)], capture_output=True, text=True,
                            cwd=ROOT, env=env, preexec_fn=limit, timeout=600)
    assert failed.returncode == 4, failed.stderr[-2000:]
    assert "writing a checkpoint failed" in failed.stderr and "Traceback" not in failed.stderr
    assert [e for e in events(failed.stdout) if e["event"] == "checkpoint_writer_thread"]
    run_dir = tmp_path / "runs" / "full"
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))
    again = run_cli("run", spec, env={"PEFTOPT_CHECKPOINT_WRITER": "process"})
    assert again.returncode == 0, again.stderr[-2000:]


def _checkpoints(run_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    out = {}
    for path in sorted((run_dir / "checkpoints").glob("checkpoint-*")):
        out[path.name] = (load_file(str(path / "adapter_model.safetensors")),
                          torch.load(path / "optimizer.pt", weights_only=True),
                          json.loads((path / "trainer_state.json").read_text()))
    return out


def test_a_job_checkpoints_the_same_with_the_process_as_with_the_thread(tmp_path, make_spec):
    import torch

    runs = {}
    for writer in ("process", "thread"):
        spec = make_spec(writer, train={"max_steps": 4, "save_steps": 2})
        result = run_cli("run", spec, "--stages", "prepare,train", env={"PEFTOPT_CHECKPOINT_WRITER": writer})
        assert result.returncode == 0, result.stderr[-2000:]
        assert len([e for e in events(result.stdout) if e["event"] == "checkpoint_saved"]) == 2
        runs[writer] = _checkpoints(tmp_path / "runs" / writer)
    assert runs["process"].keys() == runs["thread"].keys() == {"checkpoint-2", "checkpoint-4"}
    for name, (adapter, optimizer, state) in runs["process"].items():
        other_adapter, other_optimizer, other_state = runs["thread"][name]
        assert all(adapter[k].equal(other_adapter[k]) for k in other_adapter)
        for index, entries in other_optimizer["state"].items():
            assert all(torch.equal(optimizer["state"][index][k], v) for k, v in entries.items())
        assert optimizer["param_groups"] == other_optimizer["param_groups"]
        assert {k: v for k, v in state.items() if k != "log_history"} == \
            {k: v for k, v in other_state.items() if k != "log_history"}


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_the_writer_process_dies_with_the_job(tmp_path, make_spec):
    spec = make_spec("orphan", train={"max_steps": 400, "save_steps": 2})
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_CHECKPOINT_WRITER": "process"})
    for line in proc.stdout:
        if json.loads(line)["event"] == "checkpoint_saved":
            break
    writers = [pid for pid in map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
               if "job.checkpoints" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(writers) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(writers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(writers[0])
