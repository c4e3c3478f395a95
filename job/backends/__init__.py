"""Training backends behind one seam: `train(spec, run_dir, device) -> dict of metrics`.

`hf` is transformers + peft + trl (CPU and CUDA, and data-parallel under accelerate/torchrun);
`unsloth` is the fast single-GPU path. `auto` takes unsloth when CUDA is present and it imports.
"""
from __future__ import annotations

import importlib

from job.errors import SpecError


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose(requested: str, device_name: str, lora=None) -> tuple[str, str]:
    """Returns (backend, why) for train.backend `requested`, here, for the spec's `lora` section.

    Raises:
        SpecError: unsloth was asked for where it cannot run, or for what it does not train.
    """
    if requested == "hf":
        return "hf", "asked for in train.backend"
    if lora is not None and lora.use_dora:  # unsloth's fused LoRA kernels have no DoRA path
        if requested == "unsloth":
            raise SpecError("lora.use_dora: the unsloth backend does not train DoRA; use train.backend 'hf' "
                            "(or 'auto', which then picks hf)")
        return "hf", "lora.use_dora: DoRA trains on the hf backend"
    from job import distributed

    if distributed.active():
        if requested == "unsloth":
            raise SpecError(f"train.backend: unsloth trains on one GPU; this launch has "
                            f"{distributed.world().size} ranks: use 'hf' or 'auto' for data-parallel training")
        return "hf", f"data-parallel launch over {distributed.world().size} ranks (unsloth runs on one GPU)"
    unsloth_error = None
    if device_name == "cuda":
        try:
            importlib.import_module("unsloth")
        except Exception as exc:  # unsloth raises more than ImportError when its kernels cannot load
            unsloth_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if requested == "unsloth":
        if device_name != "cuda":
            raise SpecError("train.backend: unsloth needs a CUDA GPU; use 'hf' or 'auto' on this machine")
        if unsloth_error:
            raise SpecError(f"train.backend: unsloth does not import here ({unsloth_error})")
        return "unsloth", "asked for in train.backend"
    if device_name != "cuda":
        return "hf", "no CUDA device"
    if unsloth_error:
        return "hf", f"unsloth does not import ({unsloth_error})"
    return "unsloth", "CUDA device and unsloth imports"


def load(name: str):
    return importlib.import_module(f"job.backends.{name}")
