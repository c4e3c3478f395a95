"""Liger's kernels in the hf backend: when they run and why not (CPU, switched off, unknown model), and how
the planner counts them. The kernels themselves are checked on the GPU (tests/test_gpu.py)."""
from __future__ import annotations

from job.backends import liger, plan


def test_not_on_cpu():
    used, why = liger.availability("llama", "cpu")
    assert not used and "CUDA" in why


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("PEFTOPT_LIGER", "0")
    assert liger.availability("llama", "cuda") == (False, "PEFTOPT_LIGER=0")


def test_reason_when_liger_is_missing_or_the_model_unknown(monkeypatch):
    monkeypatch.delenv("PEFTOPT_LIGER", raising=False)
    used, why = liger.availability("no-such-model-type", "cuda")
    assert not used
    assert "not importable" in why or "no kernels for model type 'no-such-model-type'" in why


def test_planner_counts_fewer_activations_with_liger():
    class Config:
        hidden_size, num_hidden_layers, intermediate_size = 2048, 16, 8192
        num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings = 32, 8, 128256, True

    plain = plan.estimate_gb(Config, 8, 2048, "off", True, backend="hf")
    fused = plan.estimate_gb(Config, 8, 2048, "off", True, backend="hf+liger")
    assert fused < plain
