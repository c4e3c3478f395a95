"""Liger's Triton kernels in the `hf` backend on CUDA: fused RMSNorm, RoPE and SwiGLU/GeGLU. They keep
fewer activations than transformers' eager modules (RMSNorm keeps its input and one scale per row instead of
fp32 copies; SwiGLU recomputes the activation in backward), so the batch planner may choose a larger
micro-batch without recomputation, and they launch fewer kernels. The loss stays trl's fused LM head.

Liger replaces RoPE for the whole modeling module (a module attribute) and the norms and MLPs of the model
instance; `undo()` puts the module attributes back once training is done, so later stages in the same
process (evaluation, the merged model's reference answers) run transformers' own code.
"""
from __future__ import annotations

import inspect
import sys

# What the apply functions may replace; the loss is left to trl (its fused LM head never materialises logits).
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True,
           "cross_entropy": False, "fused_linear_cross_entropy": False}
_patched: list[tuple[object, dict]] = []  # (module, its attributes before Liger) for undo()


def availability(model_type: str, device: str, settings) -> tuple[bool, str]:
    """(whether Liger's kernels will run for this model on this device, why or why not)."""
    if device != "cuda":
        return False, "Liger's kernels are Triton kernels for CUDA"
    if not settings.liger:
        return False, "PEFTOPT_LIGER=0"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        return False, f"liger-kernel is not importable ({exc})"
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False, f"Liger has no kernels for model type {model_type!r}"
    return True, "Liger's fused " + ", ".join(k for k in ("rms_norm", "rope", "swiglu", "geglu")
                                             if k in _parameters(model_type))


def _parameters(model_type: str) -> dict:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return dict(inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters)


def apply(model) -> list[str]:
    """Applies the kernels to `model` (call `availability` first). Returns the kernels applied."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    accepted = _parameters(model_type)
    kwargs = {k: v for k, v in KERNELS.items() if k in accepted}
    module = sys.modules[type(model).__module__]
    _patched.append((module, dict(vars(module))))
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=model, **kwargs)
    return [k for k, v in kwargs.items() if v]


def undo() -> None:
    """Restores the modeling modules' attributes Liger replaced (the patched model instance keeps its own)."""
    while _patched:
        module, before = _patched.pop()
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
