"""job/backends/fused_lora.py on a tiny real Llama wrapped by peft: the fused LoRA layers give peft's outputs and
gradients (float32 on the CPU: the same sums in another order), fall back to peft's forward where it does
something else (adapters disabled, as a DPO reference runs), and leave DoRA and dropout layers to peft."""
import copy

import pytest
import torch

from job.backends import fused_lora


def dequantized_like(model, dtype):
    """The model's decoder linear layers as dequantize.py's 16-bit layers (what a 4-bit base becomes)."""
    from job.backends.dequantize import _dequantized_linear_class

    linear_class = _dequantized_linear_class()
    for parent in list(model.model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                layer = linear_class(child.in_features, child.out_features, bias=child.bias is not None, dtype=dtype)
                layer.weight = torch.nn.Parameter(child.weight.detach().to(dtype), requires_grad=False)
                setattr(parent, name, layer)
    return model


def lora_model(tiny_model, dequantized=None, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    if dequantized is not None:
        model = dequantized_like(model, dequantized)
    config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero: give it values, so the LoRA product counts in the comparison
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dequantized", [None, torch.float32], ids=["linear", "dequantized-4bit-base"])
def test_fused_layers_give_pefts_loss_and_gradients(tiny_model, dequantized):
    peft_model = lora_model(tiny_model, dequantized)
    fused = copy.deepcopy(peft_model)
    count, total = fused_lora.apply(fused)
    assert count == total > 0
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(peft_model, ids)
    fused_loss, fused_grads = loss_and_grads(fused, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # adapters disabled (a DPO reference, peft's disable_adapter()): peft's own forward, the base model's output
    with fused.disable_adapter(), peft_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    fused_lora.undo(fused)
    assert not any("forward" in layer.__dict__ for layer in fused.modules())


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_dropout": 0.1}])
def test_layers_peft_computes_otherwise_are_left_to_peft(tiny_model, lora):
    model = lora_model(tiny_model, **lora)
    count, total = fused_lora.apply(model)
    assert count == 0 and total > 0
