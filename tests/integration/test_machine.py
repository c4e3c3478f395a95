"""Which device a job runs on (job/backends/machine.py), tested on CPU by faking what the check reads: the host's
NVIDIA driver file, the GPU device nodes and torch's CUDA build. A GPU the host shows but CUDA cannot use is exit 4
naming the driver; a spec sized for a GPU is refused on a machine without one; `"device": "cpu"` runs anyway."""
import json
import logging

import pytest

from job.backends import machine
from job.errors import MachineError

OLD_DRIVER = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version:\n"


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """A host with NVIDIA driver 550 whose GPU the container sees (device nodes), torch built for CUDA 13.0,
    and CUDA not usable (as on this CPU machine)."""
    import torch

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "version").write_text(OLD_DRIVER)
    (tmp_path / "dev").mkdir()
    for name in ("nvidia0", "nvidiactl"):
        (tmp_path / "dev" / name).write_text("")
    monkeypatch.setattr(machine, "DRIVER_VERSION_FILE", tmp_path / "proc" / "version")
    monkeypatch.setattr(machine, "DEVICE_NODES", str(tmp_path / "dev" / "nvidia[0-9]*"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert not torch.cuda.is_available()
    return tmp_path


@pytest.fixture
def no_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "DRIVER_VERSION_FILE", tmp_path / "no-driver")
    monkeypatch.setattr(machine, "DEVICE_NODES", str(tmp_path / "no-dev" / "nvidia[0-9]*"))


def spec_of(path, **changes):
    from job.specfile import load_spec

    return load_spec(str(path), [f"{key}={json.dumps(value)}" for key, value in changes.items()])


def run_in_process(argv, capsys):
    """`peftopt ARGV` in this process (the fakes are monkeypatches): (exit code, stderr)."""
    from job import settings
    from job.cli import invoke
    from job.log import configure

    configure(json_output=True, settings=settings.init())
    try:
        code = invoke(argv)
    finally:  # the handler writes to this test's captured stdout, which ends with it
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_peftopt", False)]:
            root.removeHandler(handler)
    return code, capsys.readouterr().err


def test_driver_reading(gpu_host):
    assert machine.nvidia_driver() == "550.54.15"
    assert [p.rsplit("/", 1)[1] for p in machine.nvidia_devices()] == ["nvidia0"]
    assert machine.needed_driver() == ("13.0", 580)


def test_a_gpu_cuda_cannot_use_is_exit_4_naming_the_driver(gpu_host, make_spec, capsys):
    code, err = run_in_process(["run", str(make_spec("old-driver"))], capsys)
    assert code == 4, err
    first = err.splitlines()[0]
    assert first.startswith("error: ") and "550.54.15" in first and "580" in first and "cu128" in first, err
    assert "Traceback" not in err
    assert not (gpu_host / "runs").exists()  # refused before any work


def test_a_container_without_gpus_on_a_gpu_host_is_exit_4(gpu_host, make_spec, capsys):
    for node in (gpu_host / "dev").iterdir():
        node.unlink()
    code, err = run_in_process(["run", str(make_spec("no-gpus-given"))], capsys)
    assert code == 4 and "--gpus all" in err.splitlines()[0] and "550.54.15" in err, err


def test_a_gpu_sized_training_is_refused_without_a_gpu(no_gpu, tmp_path, tiny_model, make_spec, capsys):
    """t1's shape (a 1B base in 4-bit, 600 steps of 8 x 2048 tokens): days on a CPU."""
    import shutil

    big = tmp_path / "one-b"
    shutil.copytree(tiny_model, big)
    config = json.loads((big / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256)
    (big / "config.json").write_text(json.dumps(config))
    path = make_spec("t1-shaped", model={"base": str(big), "max_seq_length": 2048, "load_in_4bit": True},
                     train={"max_steps": 600, "per_device_batch_size": 2, "gradient_accumulation_steps": 4})
    hours = machine.cpu_training_hours(spec_of(path))
    assert hours > 100
    with pytest.raises(MachineError, match=r"no GPU.*estimated at about \d+ h"):
        machine.check(spec_of(path))
    code, err = run_in_process(["run", str(path)], capsys)
    assert code == 4 and '"device": "cpu"' in err.splitlines()[0], err
    assert machine.check(spec_of(path, device="cpu")) == "cpu"  # the spec may insist
    with pytest.raises(MachineError, match="device: 'cuda'"):
        machine.check(spec_of(path, device="cuda"))


@pytest.mark.integration
def test_a_cpu_spec_runs_on_the_cpu_beside_a_gpu(gpu_host, make_spec, capsys):
    path = make_spec("cpu-beside-gpu", device="cpu", train={"max_steps": 2, "save_steps": 2})
    code, err = run_in_process(["run", str(path)], capsys)
    assert code == 0, err
    metrics = json.loads((gpu_host / "runs" / "cpu-beside-gpu" / "metrics.json").read_text())
    assert metrics["train"]["device"] == "cpu" and metrics["train"]["global_step"] == 2


def test_small_trainings_run_on_a_cpu(no_gpu, make_spec):
    assert machine.check(spec_of(make_spec("small"))) == "cpu"
