"""Integration (CPU, the tiny model): a packed micro-batch padded to a multiple of TOKEN_MULTIPLE tokens (what the job
does on a GPU, job/backends/trainer.py) computes the same loss and the same logits for the real tokens as the batch
without padding, and the padding is not counted as trained tokens."""
import types

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from job import methods
from job.backends import trainer as shared


def _rows(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (37, 21, 50):  # 108 tokens: not a multiple of 16
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # the prompt's tokens masked, as prepare does
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_padding_a_packed_batch_changes_nothing_that_is_computed(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = _rows(model.config.vocab_size)
    plain = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                             pad_to_multiple_of=shared.TOKEN_MULTIPLE)(rows)
    real = plain["input_ids"].shape[1]
    assert real % shared.TOKEN_MULTIPLE and padded["input_ids"].shape[1] % shared.TOKEN_MULTIPLE == 0
    assert padded["input_ids"].shape[1] > real
    with torch.no_grad():
        a, b = model(**plain), model(**padded)
    assert torch.allclose(a.logits[0], b.logits[0, :real], atol=1e-5)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


def test_only_a_supervised_batch_on_a_gpu_is_padded():
    assert shared.token_multiple(methods.get("sft"), "cuda") == shared.TOKEN_MULTIPLE
    assert shared.token_multiple(methods.get("sft"), "cpu") is None
    assert shared.token_multiple(methods.get("dpo"), "cuda") is None


def test_the_padding_is_not_counted_as_trained_tokens():
    rows = _rows(1000)
    progress = types.SimpleNamespace(tokens=0)
    trainer = types.SimpleNamespace(
        data_collator=DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                                      pad_to_multiple_of=shared.TOKEN_MULTIPLE),
        get_batch_samples=lambda batches, num_batches, device: [next(batches) for _ in range(num_batches)])
    shared.count_tokens(trainer, progress)
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].numel() == 112
    drawn = trainer.get_batch_samples(iter([batch]), 1, "cpu")
    assert progress.tokens == sum(len(r["input_ids"]) for r in rows) == 108
    assert shared.TOKENS_KEY not in drawn[0]
