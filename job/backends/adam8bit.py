"""bitsandbytes' 8-bit blockwise Adam step (`adamw_8bit`, `adam8bit`: not paged) with the Python around each
parameter's kernel cut down.

bitsandbytes 0.50 spends about 40 µs of host time on each parameter around its one kernel launch (a config dict
per parameter, `p.data`/`p.grad` re-assigned contiguous, a device check of eight tensors, the op dispatcher, a
device guard, a ctypes pointer made for each tensor): t1's 224 LoRA tensors take about 10 ms a step with the GPU,
done with the backward, running 4 µs kernels between launches (bench/gpu_step_profile.py: the GPU busy 1.0 ms of
an 11-13 ms `Optimizer.step`). `DirectStep` calls the same kernel with the same arguments, the pointers of each
parameter and its state made once; a parameter it cannot take (a 32-bit state below `min_8bit_size`, a
non-contiguous gradient, a moved tensor) goes through bitsandbytes' own `update_step`. Same updates, bit for bit
(tests/gpu/test_gpu.py).
"""
from __future__ import annotations

import ctypes
import functools

ADAM = "adam"  # bitsandbytes' optimizer_name of Adam8bit, AdamW8bit (decoupled weight decay in the kernel)


def _kernels():
    """bitsandbytes' CUDA kernels of the 8-bit blockwise Adam update by gradient dtype, or None without them."""
    try:
        import torch
        from bitsandbytes.backends.cuda import ops
    except Exception:  # no CUDA build of bitsandbytes here
        return None
    table = getattr(ops, "str2optimizer8bit_blockwise", {}).get(ADAM)
    if not table or len(table) != 3:
        return None
    return dict(zip((torch.float32, torch.float16, torch.bfloat16), table))


def eligible(inner) -> bool:
    """Whether `inner` is a bitsandbytes 8-bit Adam whose every parameter update DirectStep can make as it does."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer2State
    except ImportError:
        return False
    if not isinstance(inner, Optimizer2State) or getattr(inner, "optimizer_name", None) != ADAM:
        return False
    args = getattr(inner, "args", None)
    if inner.is_paged or args is None or args.optim_bits != 8 or args.max_unorm > 0.0:
        return False
    if inner.mng.index2config or inner.mng.pid2config:  # per-parameter overrides (GlobalOptimManager)
        return False
    params = [p for group in inner.param_groups for p in group["params"]]
    return bool(params) and all(p.is_cuda for p in params) and _kernels() is not None


class DirectStep:
    """Installed as the optimizer's `step`. The first call (and any call before bitsandbytes has set its state up)
    is bitsandbytes' own step, with `step` being what it was (the per-parameter syncs already taken off)."""

    def __init__(self, inner, step):
        import torch

        self.inner, self.fallback = inner, step
        self.kernels = _kernels()
        self.device = torch.cuda.current_device()
        self.pointers: dict = {}  # id(param) -> (data pointers it was made for, the call's fixed arguments)
        self.direct = self.own = 0  # parameter updates made here, and by bitsandbytes' update_step

    def __call__(self, closure=None):
        import torch

        inner = self.inner
        if not inner.initialized:
            return self.fallback(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        c_float, c_int32 = ctypes.c_float, ctypes.c_int32
        with torch.no_grad():
            for gindex, group in enumerate(inner.param_groups):
                betas = group["betas"]
                scalars = (c_float(betas[0]), c_float(betas[1]), c_float(betas[2] if len(betas) >= 3 else 0.0),
                           c_float(group.get("alpha", 0.0)), c_float(group["eps"]))
                lr, decay = c_float(group["lr"]), c_float(group["weight_decay"])
                for pindex, p in enumerate(group["params"]):
                    grad = p.grad
                    if grad is None:
                        continue
                    state = inner.state[p]
                    call = self._fixed(p, grad, state) if state else None
                    if call is None:
                        if not state:
                            inner.init_state(group, p, gindex, pindex)
                        inner.update_step(group, p, gindex, pindex)
                        self.own += 1
                        continue
                    kernel, fixed = call
                    state["step"] += 1
                    kernel(fixed[0], ctypes.c_void_p(grad.data_ptr()), fixed[1], fixed[2], *scalars,
                           c_int32(state["step"]), lr, *fixed[3:7], decay, fixed[7], fixed[8], fixed[9])
                    self.direct += 1
        return loss

    def _fixed(self, p, grad, state):
        """The kernel and the call's arguments that do not change from step to step, made again when a tensor
        moved; None where bitsandbytes' own update must run."""
        state1 = state.get("state1")
        if state1 is None or state1.dtype.itemsize != 1 or "unorm_vec" in state:
            return None
        if not (grad.is_contiguous() and p.is_contiguous()) or grad.dtype != p.dtype \
                or grad.device != p.device or p.device.index != self.device:
            return None
        tensors = (p, state1, state["state2"], state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"])
        key = tuple(t.data_ptr() for t in tensors)
        made = self.pointers.get(id(p))
        if made is not None and made[0] == key:
            return made[1]
        kernel = self.kernels.get(grad.dtype)
        if kernel is None:
            return None
        fixed = (*(ctypes.c_void_p(ptr) for ptr in key), ctypes.c_float(1.0),  # gnorm_scale, as update_step passes
                 ctypes.c_bool(bool(self.inner.args.skip_zeros)), ctypes.c_int32(grad.numel()))
        self.pointers[id(p)] = (key, (kernel, fixed))
        return kernel, fixed


def install(inner) -> DirectStep | None:
    """Puts DirectStep in place of the bitsandbytes optimizer's step where `eligible`; returns it (None if not)."""
    if not eligible(inner):
        return None
    direct = DirectStep(inner, inner.step)
    functools.update_wrapper(direct, inner.step)
    inner.step = direct
    return direct
