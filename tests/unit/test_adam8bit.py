"""adam8bit.eligible/install on the CPU: only bitsandbytes' 8-bit Adam, not paged, without per-parameter
overrides, with every parameter on CUDA, gets the direct step; anything else keeps its own step (the direct step's
updates are checked against bitsandbytes' own on CUDA: tests/gpu/test_gpu.py)."""
import bitsandbytes as bnb
import torch

from job.backends import adam8bit


def params():
    return [torch.nn.Parameter(torch.randn(4096)) for _ in range(2)]


def test_optimizers_it_does_not_take_keep_their_own_step():
    for optimizer in (bnb.optim.AdamW8bit(params()),  # on the CPU
                      bnb.optim.PagedAdamW8bit(params()), bnb.optim.AdamW(params(), optim_bits=32),
                      bnb.optim.Lion8bit(params()), torch.optim.AdamW(params())):
        step = optimizer.step
        assert not adam8bit.eligible(optimizer)
        assert adam8bit.install(optimizer) is None and optimizer.step == step

