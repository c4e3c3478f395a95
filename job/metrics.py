"""metrics.json per run, the shared experiments_log.csv, and what the machine is (versions, hardware).

Nothing here imports torch at module level: `peftopt env` and the CLI stay fast.
"""
from __future__ import annotations

import csv
import fcntl
import importlib.metadata
import io
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from job.rundir import RunDir, atomic_write_json, read_json

EXPERIMENT_COLUMNS = (
    "run_name", "model", "dataset_slice", "r", "alpha", "max_steps", "final_loss", "runtime_s",
    "peak_gpu_gb", "lora_gpu_gb", "tokens_per_s", "finished_at",
)
PACKAGES = ("peftopt", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "unsloth", "unsloth_zoo", "huggingface_hub", "tokenizers", "safetensors", "pydantic",
            "structlog", "click", "sentencepiece", "gguf", "xformers", "triton", "liger_kernel")


def update_metrics(run_dir: RunDir, section: str, values: dict[str, Any]) -> dict:
    """Merges `values` into metrics.json under `section` (read, update, atomic rewrite)."""
    metrics = read_json(run_dir.metrics_path) or {}
    merged = dict(metrics.get(section) or {})
    merged.update(values)
    metrics[section] = merged
    atomic_write_json(run_dir.metrics_path, metrics)
    return metrics


def append_experiment_row(csv_path: Path, row: dict[str, Any]) -> None:
    """Appends one whole row under an exclusive lock, so concurrent jobs never interleave lines; a line left
    unfinished by a failed write (a full disk) is ended first, so the new row never joins it. The file is
    opened without following a link (it sits in an output directory other jobs share).

    Raises:
        ExternalError: the disk refused the write (the run itself is done and kept).
        RunConflict: a link stands in the file's place.
    """
    from job.errors import ExternalError
    from job.rundir import open_nofollow

    csv_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c) for c in EXPERIMENT_COLUMNS])
    fd = open_nofollow(csv_path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            size = os.fstat(fh.fileno()).st_size
            payload = buf.getvalue().encode()
            if size == 0:
                payload = (",".join(EXPERIMENT_COLUMNS) + "\n").encode() + payload
            elif os.pread(fh.fileno(), 1, size - 1) != b"\n":
                payload = b"\n" + payload  # the last write was cut short
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise ExternalError(f"cannot append to {csv_path}: {exc.strerror or exc}; the run is done and kept") from exc
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware(with_torch: bool = True) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError):
        pass
    if with_torch:
        import torch

        info["torch_cuda_build"] = torch.version.cuda  # None for a CPU build of torch
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                        gpu_memory_gb=round(props.total_memory / 1024**3, 3), cuda=torch.version.cuda)
    return info
