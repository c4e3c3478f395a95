"""peft's LoRA linear layers computed as one autograd function each, on CUDA in the `hf` backend.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(x)) * scaling`: three GEMMs, then a scaling and an add over
the whole output, each a kernel of its own and a node of autograd's graph; in backward the scaling again, and the
add of the two input gradients. t1's step on the H200 spent 32 ms of its 204 ms of GPU time in those elementwise
kernels (555 of them), and the host, launching 3,000 kernels a step, could not keep the GPU fed
(docs/performance.md). Here the scaled LoRA product is added by the GEMM itself (`addmm`'s alpha and beta), and
the same sums in backward:

    forward   y  = x W^T + b;  a = x A^T;  y += s * a B^T
    backward  gb = g B;  dB = s * g^T a;  dA = s * gb^T x;  dx = g W + s * gb A

Eight GEMMs and no elementwise kernel per layer, one graph node instead of six. What is computed is peft's LoRA
(the same weights, gradients and adapter files); the sums round once instead of twice in bfloat16.

A layer takes this path when it is plain LoRA over an `nn.Linear` (or the 16-bit layer a 4-bit base is dequantized
into, dequantize.py), with one active adapter, no dropout, no DoRA or other variant, no LoRA bias and frozen base
weights; anything else, and any call where peft's forward would do something else (adapters disabled, as a DPO
reference does, merged, per-row adapters), runs peft's own forward.
"""
from __future__ import annotations

import functools


@functools.cache
def lora_linear():
    """The autograd function (made on first use: importing this module does not import torch)."""
    import torch

    class LoraLinear(torch.autograd.Function):
        """y = x W^T + b + s (x A^T) B^T with W and b frozen, computed in `dtype` and returned in `out_dtype`;
        gradients for x, A and B."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype, out_dtype):
            with torch.autocast(x.device.type, enabled=False):
                flat = x.reshape(-1, x.shape[-1]).to(dtype)
                a, b = lora_a.to(dtype), lora_b.to(dtype)
                down = flat @ a.t()
                y = torch.nn.functional.linear(flat, weight.to(dtype), None if bias is None else bias.to(dtype))
                y.addmm_(down, b.t(), alpha=scaling)
            ctx.save_for_backward(flat, down, weight, a, b)
            ctx.scaling, ctx.x_dtype, ctx.lora_dtypes = scaling, x.dtype, (lora_a.dtype, lora_b.dtype)
            ctx.x_shape = x.shape
            return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)

        @staticmethod
        def backward(ctx, grad):
            flat, down, weight, a, b = ctx.saved_tensors
            s = ctx.scaling
            with torch.autocast(grad.device.type, enabled=False):
                g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
                up = g @ b  # (tokens, r): the gradient reaching A's output, before the scaling
                grad_b = grad_a = grad_x = None
                if ctx.needs_input_grad[4]:
                    grad_b = torch.addmm(g.new_zeros(()), g.t(), down, beta=0, alpha=s).to(ctx.lora_dtypes[1])
                if ctx.needs_input_grad[3]:
                    grad_a = torch.addmm(g.new_zeros(()), up.t(), flat, beta=0, alpha=s).to(ctx.lora_dtypes[0])
                if ctx.needs_input_grad[0]:
                    grad_x = g @ weight.to(flat.dtype)
                    grad_x.addmm_(up, a, alpha=s)
                    grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
            return grad_x, None, None, grad_a, grad_b, None, None, None

    return LoraLinear


def _in_weight_dtype(base) -> bool:
    """A base layer that computes in its weight's dtype and returns the input's (dequantize.py's)."""
    return getattr(type(base), "computes_in_weight_dtype", False)


def eligible(layer) -> bool:
    """A peft LoRA layer this computes exactly: plain LoRA, one adapter, no dropout, over a frozen 16-bit Linear."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinearLayer

    if not isinstance(layer, LoraLinearLayer) or len(layer.lora_A) != 1:
        return False
    name = next(iter(layer.lora_A))
    base = layer.get_base_layer()
    dropout = layer.lora_dropout[name]
    return ((type(base) is torch.nn.Linear or _in_weight_dtype(base)) and base.weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and name not in getattr(layer, "lora_variant", {}) and not getattr(layer, "fan_in_fan_out", False)
            and not getattr(layer, "lora_bias", {}).get(name, False) and layer.lora_A[name].bias is None
            and layer.lora_B[name].bias is None
            and (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0)))


def _forward(layer, name: str, x, *args, **kwargs):
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [name]:
        return type(layer).forward(layer, x, *args, **kwargs)  # peft's own, for what it does differently
    base = layer.get_base_layer()
    # the dtypes peft's forward gives: the base layer's (autocast's, or its own rule) for the sum
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = base.weight.dtype if _in_weight_dtype(base) else x.dtype
    out_dtype = x.dtype if _in_weight_dtype(base) else dtype
    return lora_linear().apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            float(layer.scaling[name]), dtype, out_dtype)


def apply(model) -> tuple[int, int]:
    """Gives each eligible LoRA layer of `model` the fused forward: (how many, of how many LoRA layers)."""
    from peft.tuners.lora.layer import LoraLayer

    fused = total = 0
    for layer in model.modules():
        total += isinstance(layer, LoraLayer)
        if eligible(layer):
            layer.forward = functools.partial(_forward, layer, next(iter(layer.lora_A)))
            fused += 1
    return fused, total


def undo(model) -> None:
    for layer in model.modules():
        if isinstance(layer.__dict__.get("forward"), functools.partial) and layer.forward.func is _forward:
            del layer.forward
