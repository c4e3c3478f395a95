"""Training backends behind one seam. A backend is a module of this package with:

    NAME: str
    plan(spec, config, device, settings) -> plan.Plan            # micro-batch, accumulation, checkpointing
    setup(spec, location, device, plan, settings) -> (model, peft_config | None, figures for the log)
    train(spec, run_dir, device, *, fingerprint, settings, restart) -> figures for metrics.json

`train` runs the shared trainer (`trainer.train`) with the backend's `plan` and `setup`; `peftopt bench` calls
`plan` and `setup` directly. `hf` is transformers + peft + trl (CPU and CUDA, and data-parallel under
accelerate/torchrun); `unsloth` is the fast single-GPU path. `auto` takes unsloth when CUDA is present and it
imports.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

from job.errors import MachineError, SpecError

NAMES = ("hf", "unsloth")


class Backend(Protocol):
    NAME: str

    def plan(self, spec, config, device: str, settings) -> Any: ...

    def setup(self, spec, location: str, device: str, plan, settings) -> tuple[Any, Any, dict]: ...

    def train(self, spec, run_dir, device: str, *, fingerprint: str, settings, restart: bool = False) -> dict: ...


def device(spec) -> str:
    """'cuda' or 'cpu' for this job: the spec's `device`, or the GPU when CUDA works (preflight refused a GPU it
    cannot use: job/backends/machine.py)."""
    if spec.device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose(requested: str, device_name: str, lora=None, method: str = "sft", *,
           load_library: bool = True) -> tuple[str, str]:
    """Returns (backend, why) for train.backend `requested`, here, for the spec's `lora` section and method.
    Choosing unsloth imports it; with `load_library` False (preflight, before the job imports it in turn) what
    only the import can tell is left out, and unsloth is assumed to import.

    Raises:
        SpecError: unsloth was asked for what it does not train, or under several ranks.
        MachineError: unsloth was asked for on a machine where it cannot run (no CUDA, does not import).
    """
    if requested == "hf":
        return "hf", "asked for in train.backend"
    from job import methods

    if "unsloth" not in methods.get(method).backends:  # e.g. unsloth's PatchDPOTrainer: not verified with this trl
        if requested == "unsloth":
            raise SpecError(f"train.backend: unsloth is not verified for train.method {method!r} with the pinned trl; "
                            "use 'hf' or 'auto'")
        return "hf", f"train.method {method!r} trains on the hf backend (trl's trainer with the peft reference)"
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
    if device_name == "cuda" and load_library:
        try:
            load("unsloth").import_library()
        except Exception as exc:  # unsloth raises more than ImportError when its kernels cannot load
            unsloth_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if requested == "unsloth":
        if device_name != "cuda":
            raise MachineError("train.backend: unsloth needs a CUDA GPU and this machine has none; use 'hf' or "
                               "'auto' here, or run on a GPU machine")
        if unsloth_error:
            raise MachineError(f"train.backend: unsloth does not import here ({unsloth_error})")
        return "unsloth", "asked for in train.backend"
    if device_name != "cuda":
        return "hf", "no CUDA device"
    if unsloth_error:
        return "hf", f"unsloth does not import here ({unsloth_error})"
    return "unsloth", "CUDA device and unsloth imports"


def load(name: str) -> Backend:
    return importlib.import_module(f"job.backends.{name}")  # type: ignore[return-value]
