"""trainer.without_per_parameter_syncs on bitsandbytes' real 8-bit AdamW (its CPU kernels): the step no longer
calls bitsandbytes' device sync after each parameter, and updates the weights exactly as before; paged optimizers
and other optimizers are left alone."""
import torch

import bitsandbytes as bnb
from bitsandbytes.optim import optimizer as bnb_optimizer

from job.backends.trainer import without_per_parameter_syncs


class Wrapped:  # as accelerate's AcceleratedOptimizer holds the optimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


def params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4096, generator=generator)) for _ in range(3)]


def test_an_8bit_step_without_syncs_updates_the_weights_as_before(monkeypatch):
    synced = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda tensor: synced.append(tensor.shape))
    plain, quiet = params(0), params(0)
    plain_opt = bnb.optim.AdamW8bit(plain, lr=1e-2, min_8bit_size=0)
    quiet_opt = bnb.optim.AdamW8bit(quiet, lr=1e-2, min_8bit_size=0)
    assert without_per_parameter_syncs(Wrapped(quiet_opt))
    for step in range(3):
        grads = params(100 + step)
        for a, b, g in zip(plain, quiet, grads):
            a.grad, b.grad = g.detach().clone(), g.detach().clone()
        plain_opt.step()
        assert len(synced) == 3 * (step + 1)  # bitsandbytes' own step: one sync per parameter
        quiet_opt.step()
        assert len(synced) == 3 * (step + 1)  # none from the unsynchronized step
    assert all(torch.equal(a, b) for a, b in zip(plain, quiet))
    assert bnb_optimizer.sync_gpu is not None and bnb_optimizer.sync_gpu.__name__ == "<lambda>"  # put back


def test_paged_and_other_optimizers_are_left_alone():
    paged = bnb.optim.PagedAdamW8bit(params(0), lr=1e-2)
    step = paged.step
    assert not without_per_parameter_syncs(paged) and paged.step == step
    assert not without_per_parameter_syncs(torch.optim.AdamW(params(0)))
