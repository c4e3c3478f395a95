"""Unit and integration (CPU): the packed-row attention path. Which path runs and why, the cumulative lengths
the varlen kernel gets, the sdpa fallback computing exactly what transformers' own sdpa computes (packed rows
and left-padded batches), and the unsloth adapter's detect-and-do-not-double-patch rule. The kernel itself runs
in tests/gpu/test_gpu.py.
"""
import types

import pytest
import torch

from job.backends import attention


def test_cumulative_lengths_come_from_where_positions_restart():
    cu, longest = attention.cumulative_lengths(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    cu, longest = attention.cumulative_lengths(torch.arange(6)[None])  # one conversation
    assert cu.tolist() == [0, 6] and longest == 6
    cu, _ = attention.cumulative_lengths(torch.tensor([[3, 4, 0, 1]]))  # a row cut mid-conversation
    assert cu.tolist() == [0, 2, 4]


def test_segment_lengths_of_trls_padding_free_row_padded_to_a_multiple_of_16():
    """What unsloth.lengths_from_host gives unsloth: the segments trl's own padding-free collator makes (padding
    tokens at position 0, each a segment of its own, as unsloth's inference from the positions counts them)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16,
                                              return_tensors="pt")
    batch = collate([{"input_ids": list(range(1, 6))}, {"input_ids": list(range(1, 4))}])
    assert batch["position_ids"].shape == (1, 16)
    assert attention.segment_lengths(batch["position_ids"]) == (5, 3) + (1,) * 8
    cu, _ = attention.cumulative_lengths(batch["position_ids"])
    assert cu.tolist() == [0, 5, 8, *range(9, 17)]  # the same segments the hf path finds on the device
    assert attention.segment_lengths(torch.arange(7)[None]) is None  # one segment: not a packed row for unsloth
    assert attention.segment_lengths(torch.tensor([[2, 3, 0, 1]])) is None  # starts mid-segment: unsloth declines it
    assert attention.segment_lengths(torch.zeros(2, 4, dtype=torch.long)) is None  # not one row


def test_kept_count_is_the_labels_unsloths_fused_loss_keeps_of_trls_padding_free_row():
    """unsloth.kept_count: of the row's labels shifted by one, those not -100 and not at a segment's start."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.backends import unsloth

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16,
                                              return_tensors="pt")
    batch = collate([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7, 8]}])
    batch["labels"][0, 1] = -100  # a prompt's token
    labels = batch["labels"][0]
    shifted = torch.cat([labels[1:], torch.tensor([-100])])  # unsloth's targets: the next token's label
    assert unsloth.kept_count(batch) == (int((shifted != -100).sum()), 16) == (5, 16)  # 3 + 2: no segment's start
    assert unsloth.kept_count({"labels": torch.zeros(2, 4, dtype=torch.long)}) is None  # not one packed row


def test_cpu_runs_sdpa_and_says_why():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    path, why = attention.hf_path("cpu", torch.float32, config)
    assert path == "sdpa" and "no CUDA" in why
    if not torch.cuda.is_available():
        assert attention.varlen_kernel() is None


@pytest.fixture(scope="module")
def models(tiny_model):
    from transformers import AutoModelForCausalLM

    attention.register()
    load = lambda impl: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(tiny_model), dtype=torch.float32, attn_implementation=impl).eval()
    return load("sdpa"), load(attention.NAME)


def test_packed_row_equals_sdpa_with_transformers_block_mask(models):
    sdpa, varlen = models
    ids = torch.randint(10, 200, (1, 19), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([list(range(7)) + list(range(5)) + list(range(7))])
    with torch.no_grad():
        # use_cache=False, as in training: with a cache transformers builds no block mask for packed rows
        want = sdpa(input_ids=ids, position_ids=positions, use_cache=False).logits
        got = varlen(input_ids=ids, position_ids=positions, use_cache=False).logits
        whole = sdpa(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[0, 7:], whole[0, 7:], atol=1e-3)  # documents really are kept apart


def test_left_padded_batch_equals_sdpa(models):
    sdpa, varlen = models
    ids = torch.randint(10, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=mask).logits
        got = varlen(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_generation_through_the_registered_function_matches_sdpa(models, tiny_model):
    from transformers import AutoTokenizer

    from job.evaluation import generate
    from job.spec import EvaluateSpec

    sdpa, varlen = models
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    suite = [{"id": f"p{i}", "prompt": text, "checks": {}} for i, text in
             enumerate(["Tell me one thing about coffee.", "Say hello.", "And why is the moon so bright tonight?"])]
    settings = EvaluateSpec(max_new_tokens=12)
    assert [a["token_ids"] for a in generate.generate_hf(varlen, tokenizer, suite, settings)] == \
        [a["token_ids"] for a in generate.generate_hf(sdpa, tokenizer, suite, settings)]


def test_unsloth_adapter_leaves_a_torch_that_has_enable_gqa_alone():
    own = object()
    dispatch = types.SimpleNamespace(_TORCH_VARLEN_ATTN=own, _LEAN_VARLEN=True, _varlen_can_use_cudnn=None)
    said = attention.adapt_unsloth(dispatch)
    assert dispatch._TORCH_VARLEN_ATTN is own and "unsloth's own" in said  # not patched twice


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel exists (tests/gpu/test_gpu.py)")
def test_unsloth_adapter_says_when_no_kernel_can_be_set(monkeypatch):
    dispatch = types.SimpleNamespace(_TORCH_VARLEN_ATTN=None, _LEAN_VARLEN=False, _varlen_can_use_cudnn=None)
    assert attention.adapt_unsloth(dispatch).startswith("per-segment sdpa")
    assert dispatch._TORCH_VARLEN_ATTN is None
    from job import settings

    assert "UNSLOTH_TORCH_VARLEN is off" in attention.adapt_unsloth(dispatch, settings.load({"UNSLOTH_TORCH_VARLEN": "0"}))


def test_decoding_on_cuda_keeps_cudnn_attention_out_and_restores_the_flags():
    from job.evaluation.generate import attention_backends

    before = [torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]
    with attention_backends(torch.device("cuda")):  # only sets the backend flags: runs without a GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    with attention_backends(torch.device("cpu")):  # CPU decoding is left alone
        assert torch.backends.cuda.cudnn_sdp_enabled() == before[0]
    assert [torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == before


def test_decoding_freezes_the_collector_and_thaws_it_even_on_failure():
    import gc

    from job.evaluation.generate import quiet_collector

    def collected(obj) -> bool:  # the frozen (permanent) generation is not among gc.get_objects()'s
        return any(o is obj for o in gc.get_objects())

    alive_before = [[] for _ in range(3)]
    assert collected(alive_before)
    with quiet_collector():
        assert not collected(alive_before)
        made_while_decoding = []
        assert collected(made_while_decoding)
    assert collected(alive_before) and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), quiet_collector():
        raise RuntimeError("generation failed")
    assert collected(alive_before) and gc.get_freeze_count() == 0
