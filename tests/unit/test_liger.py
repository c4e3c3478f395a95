"""Liger's kernels in the hf backend: when they run and why not (CPU, switched off, unknown model), and how
the planner counts them. The kernels themselves are checked on the GPU (tests/gpu/test_gpu.py)."""
from __future__ import annotations

import sys
import types

import pytest

from conftest import CONFIG_1B
from job import settings
from job.backends import liger, plan

ON = settings.load({})


def test_not_on_cpu():
    used, why = liger.availability("llama", "cpu", ON)
    assert not used and "CUDA" in why


def test_switched_off_by_environment():
    assert liger.availability("llama", "cuda", settings.load({"PEFTOPT_LIGER": "0"})) == (False, "PEFTOPT_LIGER=0")


def test_reason_when_liger_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # import raises
    used, why = liger.availability("llama", "cuda", ON)
    assert not used and why.startswith("liger-kernel is not importable")


@pytest.fixture
def liger_registry(monkeypatch):
    """Liger's registry of apply functions, as a stand-in: its kernels are Triton, which a CPU torch lacks.
    The one entry replaces a module attribute, as Liger's RoPE patch does, and records its keywords."""
    calls = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):
        calls.append({"rope": rope, "cross_entropy": cross_entropy, "rms_norm": rms_norm, "swiglu": swiglu,
                      "fused_linear_cross_entropy": fused_linear_cross_entropy, "model": model})
        sys.modules[type(model).__module__].apply_rotary_pos_emb = "liger's rope"

    registry = types.ModuleType("liger_kernel.transformers.monkey_patch")
    registry.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", registry)
    return calls


def test_unknown_model_type_says_so(liger_registry):
    assert liger.availability("mystery", "cuda", ON) == (False, "Liger has no kernels for model type 'mystery'")


def test_apply_keeps_trls_loss_and_undo_restores_the_module(liger_registry):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    used, why = liger.availability("llama", "cuda", ON)
    assert used and why == "Liger's fused rms_norm, rope, swiglu"
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    original = modeling_llama.apply_rotary_pos_emb
    assert liger.apply(model) == ["rope", "rms_norm", "swiglu"]
    (call,) = liger_registry
    assert call["model"] is model and not call["cross_entropy"] and not call["fused_linear_cross_entropy"]
    assert modeling_llama.apply_rotary_pos_emb == "liger's rope"
    liger.undo()
    assert modeling_llama.apply_rotary_pos_emb is original


def test_planner_counts_fewer_activations_with_liger():
    plain = plan.estimate_gb(CONFIG_1B, 8, 2048, "off", True, backend="hf")
    fused = plan.estimate_gb(CONFIG_1B, 8, 2048, "off", True, backend="hf+liger")
    assert fused < plain
