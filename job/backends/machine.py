"""Which device the job runs on, decided once before any work: a GPU the host shows but CUDA cannot use is an
error (exit 4) naming the driver found and the one needed, never a silent CPU run; a spec sized for a GPU is
refused on a machine without one unless it says `"device": "cpu"`.

What is read: /proc/driver/nvidia/version (the host's loaded NVIDIA kernel module, visible in any container of a
GPU host), the /dev/nvidia* device nodes (present when the container was given GPUs), and torch's CUDA build.

    python -m job.backends.machine       # prints what this machine shows
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from job.errors import MachineError

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
DEVICE_NODES = "/dev/nvidia[0-9]*"
# The oldest Linux driver each CUDA major version of torch's wheels runs on (NVIDIA's CUDA compatibility table;
# 12.x runs on 525 and newer through minor-version compatibility).
DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
CPU_HOURS_LIMIT = 2.0  # training estimated to take longer than this on the CPU needs `"device": "cpu"` to start
# Effective training arithmetic per physical core (fp32/bf16 through torch on AVX2/AVX-512, measured runs reach
# a few times more; the estimate errs towards allowing a run) and the slowdown of bitsandbytes' 4-bit on a CPU.
CPU_FLOPS_PER_CORE = 25e9
FOUR_BIT_CPU_SLOWDOWN = 4.0
FIXES = ("install a driver of that series or newer on the host (AWS Batch: an ECS GPU-optimized AMI of that "
         "series; GKE: gpu-driver-version=latest; AKS: the GPU operator's driver), or build the image with "
         "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (driver 570 or newer); "
         "docs/batch-services.md lists each service's drivers")


def nvidia_driver() -> str | None:
    """The host's NVIDIA driver version (e.g. '550.54.15'), or None when none is loaded."""
    try:
        text = DRIVER_VERSION_FILE.read_text(errors="replace")[:4096]
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9]+(?:\.[0-9]+)+)", text)
    return match.group(1) if match else "unknown"


def nvidia_devices() -> list[str]:
    return sorted(glob.glob(DEVICE_NODES))


def cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


def needed_driver() -> tuple[str | None, int | None]:
    """(the CUDA version torch was built for, the oldest driver series it runs on)."""
    import torch

    cuda = torch.version.cuda
    if not cuda:
        return None, None
    return cuda, DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))


def check(spec) -> str:
    """'cuda' or 'cpu' for this job on this machine (preflight of `peftopt run`; backends.device answers after it).

    Raises:
        MachineError: the spec asks for a GPU this machine cannot give it, an NVIDIA GPU is here but CUDA cannot
            use it, or the spec's training is sized for a GPU and this machine has none (exit 4).
    """
    wanted = getattr(spec, "device", "auto")
    if wanted == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    driver, devices = nvidia_driver(), nvidia_devices()
    cuda, needed = needed_driver()
    if devices:
        why = (f"an NVIDIA GPU is here ({', '.join(devices[:4])}, driver {driver or 'not loaded'}) but CUDA cannot "
               f"use it: this image's torch is built for CUDA {cuda or '(none: a CPU build)'}")
        if needed and driver and driver != "unknown" and int(driver.split(".")[0]) < needed:
            raise MachineError(f"{why}, which needs NVIDIA driver {needed} or newer; {FIXES}")
        raise MachineError(f"{why}; check that the driver is of series {needed or 'matching'} or newer and that "
                           "nvidia-smi works in the container; or set \"device\": \"cpu\" to run on the CPU")
    if driver:
        raise MachineError(f"this host has an NVIDIA driver ({driver}) but the container was given no GPU: start "
                           "it with --gpus all (Docker) or request nvidia.com/gpu (Kubernetes, AWS Batch "
                           "resourceRequirements GPU); or set \"device\": \"cpu\" to run on the CPU")
    if wanted == "cuda":
        raise MachineError("device: 'cuda' but this machine has no NVIDIA GPU; run on a GPU machine, or set "
                           "\"device\": \"auto\" or \"cpu\"")
    hours = cpu_training_hours(spec)
    if hours is not None and hours > CPU_HOURS_LIMIT:
        raise MachineError(f"this machine has no GPU, and training this spec on its {physical_cores()} CPU cores "
                           f"is estimated at about {hours:.0f} h (> {CPU_HOURS_LIMIT:g} h); run it on a GPU machine, "
                           "or set \"device\": \"cpu\" to train on the CPU anyway")
    return "cpu"


def physical_cores() -> int:
    from job.llamacpp import physical_cores as cores

    return cores()


def cpu_training_hours(spec) -> float | None:
    """Hours the spec's training would take on this machine's CPU cores (an estimate from the base's size and the
    tokens of max_steps full rows), or None without a train section or a readable config."""
    if spec.train is None or spec.train.max_steps is None:  # train.epochs: the steps are counted once prepared
        return None
    config = base_config(spec)
    if config is None:
        return None
    from job import methods
    from job.backends.plan import param_count

    try:
        params = param_count(config)
    except (AttributeError, TypeError, ZeroDivisionError):
        return None
    train = spec.train
    tokens = train.max_steps * train.per_device_batch_size * train.gradient_accumulation_steps \
        * spec.model.max_seq_length * methods.get(train.method).sequences_per_example
    seconds = 6 * params * tokens / (CPU_FLOPS_PER_CORE * physical_cores())
    return seconds * (FOUR_BIT_CPU_SLOWDOWN if spec.model.load_in_4bit else 1.0) / 3600


def base_config(spec):
    """The base model's config without loading it: a local directory's (or an earlier run's merged model's) own
    config.json, or a Hub model's fetched alone; None when neither can be read."""
    from job import modelsrc

    kind = modelsrc.source_kind(spec.model.base)
    if kind == "dir":
        directory = spec.model.base
    elif kind == "run":
        directory = str(modelsrc.earlier_run(spec) / "merged")
    elif kind == "hub":
        directory = _hub_config_dir(spec.model.base)
    else:
        return None
    path = modelsrc.source_file(directory, "config.json") if directory else None
    if path is None or path.stat().st_size > 1024 * 1024:
        return None
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.from_json_file(str(path))
    except (OSError, ValueError):
        return None


def _hub_config_dir(repo: str) -> str | None:
    from job import hub
    from job.errors import ExternalError

    try:
        from huggingface_hub import hf_hub_download

        path = hub.retrying(f"download the config of {repo}", lambda: hf_hub_download(repo, "config.json"))
    except (ExternalError, OSError, ValueError):  # offline, or no such repo: downloading the model says so later
        return None
    return os.path.dirname(path)


if __name__ == "__main__":
    print({"driver": nvidia_driver(), "devices": nvidia_devices(), "cuda_usable": cuda_usable(),
           "torch_cuda_and_needed_driver": needed_driver()})
