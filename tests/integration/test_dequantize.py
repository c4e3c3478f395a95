"""A 4-bit base dequantized once (job/backends/dequantize.py): the same logits, loss and adapter gradients as
the 4-bit layers dequantizing at every step, on a real tiny model in bitsandbytes' NF4 on CPU; and when the
planner chooses it. The GPU runs of both backends are in tests/gpu/test_gpu.py."""
from __future__ import annotations

import pytest

from conftest import CONFIG_1B, CONFIG_8B
from job.backends import plan
from job.spec import JobSpec


def qlora_loss_and_grads(tiny_model, dequantized: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from job.backends import dequantize

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=quant, dtype=torch.float32)
    model.train()  # bitsandbytes must never see an eval-mode no-grad forward first on CPU (hf.py says why)
    figures = dequantize.dequantize_base(model) if dequantized else None
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" in kinds) != dequantized and ("DequantizedLinear" in kinds) == dequantized
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.item(), grads, figures


@pytest.mark.integration
def test_dequantized_once_gives_the_same_loss_and_adapter_gradients_as_4bit(tiny_model):
    logits4, loss4, grads4, _ = qlora_loss_and_grads(tiny_model, dequantized=False)
    logits16, loss16, grads16, figures = qlora_loss_and_grads(tiny_model, dequantized=True)
    assert figures["layers"] == 7 * 2 and figures["gb_after"] > figures["gb_before"]  # 2 layers x 7 linears
    assert set(grads16) == set(grads4) and len(grads4) == 7 * 2 * 2
    assert abs(loss16 - loss4) <= 1e-6 * abs(loss4)
    assert (logits16 - logits4).abs().max() <= 1e-5
    for name, grad in grads4.items():
        assert grad.abs().max() > 0, name
        assert (grads16[name] - grad).abs().max() <= 1e-5 * max(grad.abs().max().item(), 1.0), name


def t1_spec(**train) -> JobSpec:
    return JobSpec.model_validate({
        "name": "t", "model": {"base": "x", "max_seq_length": 2048, "load_in_4bit": True},
        "data": {"source": "d.jsonl"}, "lora": {},
        "train": {"max_steps": 10, "per_device_batch_size": 8, "gradient_accumulation_steps": 1, **train}})


def test_the_planner_dequantizes_only_with_memory_to_spare_and_never_for_a_slower_batch():
    roomy = plan.choose(t1_spec(), CONFIG_1B, 139.0)
    assert roomy.dequantize_base and (roomy.micro_batch, roomy.gradient_checkpointing) == (8, "off")
    assert roomy.estimated_gb == round(plan.estimate_gb(CONFIG_1B, 8, 2048, "off", False), 2)
    kept = plan.choose(t1_spec(), CONFIG_1B, 139.0, dequantize=False)
    assert not kept.dequantize_base and (kept.micro_batch, kept.gradient_checkpointing) == (8, "off")
    assert kept.estimated_gb < roomy.estimated_gb
    # A budget between the two estimates: the same batch, kept in 4-bit
    between = (plan.estimate_gb(CONFIG_1B, 8, 2048, "off", True) + plan.estimate_gb(CONFIG_1B, 8, 2048, "off", False)) / 2
    tight = plan.choose(t1_spec(max_memory_gb=between), CONFIG_1B, 139.0)
    assert not tight.dequantize_base and (tight.micro_batch, tight.gradient_checkpointing) == (8, "off")
    # The 8B shape: dequantized on an H200; on a 16 GB card it needs recomputation even in 4-bit, and stays 4-bit
    assert plan.choose(t1_spec(), CONFIG_8B, 139.0).dequantize_base
    small = plan.choose(t1_spec(max_memory_gb=14), CONFIG_8B, 139.0)
    assert small.gradient_checkpointing != "off" and not small.dequantize_base
    sixteen = JobSpec.model_validate({**t1_spec().model_dump(mode="json"),
                                      "model": {"base": "x", "max_seq_length": 2048, "load_in_4bit": False}})
    assert not plan.choose(sixteen, CONFIG_1B, 139.0).dequantize_base  # nothing to dequantize
