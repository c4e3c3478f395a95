"""Unit: the private trl name that the CPU loss-head fallback replaces still exists in the pinned trl."""
import trl
import trl.trainer.utils as trl_utils


def test_trl_version_and_private_name():
    assert trl.__version__ == "1.15.0", "re-check job/backends/trainer.py:install_cpu_loss_head for this trl"
    assert hasattr(trl_utils, "_ChunkedLogProbFunction")


def test_fallback_matches_plain_cross_entropy():
    import torch

    from job.backends.trainer import TorchLogProb

    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 16), torch.randn(32, 16)
    targets = torch.randint(0, 32, (5,))
    logp, *_ = TorchLogProb.apply(hidden, weight, None, targets, 1.0, 1024)
    want = -torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    assert torch.allclose(logp, want, atol=1e-5)
