"""Packed rows on the flash kernel, for both backends.

With packing, trl hands the model one flattened row per micro-batch (padding-free), `position_ids` restarting
at 0 at each conversation. transformers' sdpa turns that into a dense block mask over the whole row: no
flash kernel, K/V repeated for every query head, memory quadratic in the row. Instead:

- `hf`: `peftopt_varlen`, an attention function registered in transformers' AttentionInterface, gives the
  row to torch's variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`) with cumulative
  lengths taken from where `position_ids` is 0, K/V heads as they are. Its mask function is FA2's (no mask
  for a packed row, the 2D padding mask otherwise); a padded batch (the preference trainers' pairs) is
  unpadded onto the same kernel; anything the kernel cannot take (decoding, CPU) goes to sdpa with the
  equivalent mask.
- `unsloth` on torch < 2.12: unsloth takes torch's varlen kernel only when `varlen_attn` has `enable_gqa`
  (2.12). The 2.11 function takes fewer K/V heads natively, so a wrapper without that argument is set into
  unsloth's dispatch; from 2.12 on unsloth does it itself and nothing is changed.

`hf_path()` and `adapt_unsloth()` say which path runs and why; the backends log it and keep it in metrics.
"""
from __future__ import annotations

import inspect
from typing import Any

NAME = "peftopt_varlen"
_registered = False
_cache: dict[str, Any] = {"position_ids": None}


def varlen_kernel():
    """torch's variable-length attention when this torch build can run causal packed rows, else None."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return None
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)():
        return None
    return varlen_attn


def hf_path(device: str, dtype, config) -> tuple[str, str]:
    """("varlen", why) when packed rows can run on the flash kernel here, else ("sdpa", why)."""
    import torch

    if device != "cuda":
        return "sdpa", "no CUDA device: packed rows use sdpa with a block mask"
    if varlen_kernel() is None:
        return "sdpa", f"torch {torch.__version__} has no usable varlen flash kernel: sdpa with a block mask"
    if torch.cuda.get_device_capability()[0] < 8:
        return "sdpa", "the flash kernel needs compute capability 8.0 or newer: sdpa with a block mask"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", f"the flash kernel takes bf16/fp16, not {dtype}: sdpa with a block mask"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > 256 or head_dim % 8:
        return "sdpa", f"head_dim {head_dim} is outside the flash kernel's range: sdpa with a block mask"
    return "varlen", "packed rows on torch's varlen flash kernel (no block mask, K/V heads not repeated)"


def cumulative_lengths(position_ids) -> tuple[Any, int]:
    """(cu_seqlens as int32 [N+1], longest segment) of one flattened row whose positions restart at 0."""
    import torch

    positions = position_ids.reshape(-1)
    starts = torch.nonzero(positions == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = starts.new_full((1,), positions.numel())
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def segment_lengths(position_ids) -> tuple[int, ...] | None:
    """The lengths of a packed row's segments, read on the host from its (CPU) `position_ids` [1, T], as unsloth
    infers them on the device (`unsloth.utils.packing._varlen_from_position_ids`): a segment starts where the
    position is 0 (each padding token is one of its own); None for anything else, or a row of one segment,
    which unsloth does not treat as packed."""
    import torch

    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[0] != 1 \
            or position_ids.device.type != "cpu":
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if len(starts) <= 1 or starts[0] != 0:
        return None
    bounds = starts + [position_ids.shape[1]]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _lengths_once(position_ids) -> tuple[Any, int]:
    # Every layer of one forward pass gets the same position_ids object: compute (and sync) once. The cache
    # holds that tensor, so its memory cannot be reused by a later batch while the entry lives.
    if _cache["position_ids"] is not position_ids:
        _cache.update(position_ids=position_ids, lengths=cumulative_lengths(position_ids))
    return _cache["lengths"]


def _segment_mask(position_ids, q_len: int, kv_len: int, padding_mask):
    """The boolean [B, 1, q, kv] mask sdpa needs: causal, within one packed segment, not on padding."""
    import torch

    device = position_ids.device if position_ids is not None else padding_mask.device
    kv_index = torch.arange(kv_len, device=device)
    q_index = kv_index[kv_len - q_len:]
    mask = (kv_index[None, :] <= q_index[:, None])[None, None]
    if position_ids is not None and q_len == kv_len:
        segment = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, -kv_len:].to(torch.bool)
    return mask


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                             **kwargs):
    """transformers' attention-function contract: q [B, Hq, S, D], k/v [B, Hkv, S, D] in, ([B, S, Hq, D], None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    kernel = varlen_kernel() if query.is_cuda else None
    packed_row = (kernel is not None and query.shape[0] == 1 and attention_mask is None and position_ids is not None
                  and query.shape[2] == key.shape[2] and not dropout)
    padded_batch = (kernel is not None and attention_mask is not None and attention_mask.dim() == 2
                    and query.shape[2] == key.shape[2] == attention_mask.shape[1] and not dropout)
    if padded_batch:
        return _padded_on_varlen(kernel, query, key, value, attention_mask, scaling)
    if not packed_row:
        mask = _segment_mask(position_ids if attention_mask is None else None, query.shape[2], key.shape[2],
                             attention_mask)
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=False, **kwargs)
    cu, longest = _lengths_once(position_ids)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D] views of the projections
    params = inspect.signature(kernel).parameters
    extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        extra["enable_gqa"] = True  # torch >= 2.12 asks; 2.11's kernel takes fewer K/V heads as they are
    out = kernel(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    return out.unsqueeze(0), None


def _unpadding_once(attention_mask):
    """(indices of the real tokens in the flattened batch, cu_seqlens, longest) of a 2D padding mask, once per
    forward pass (every layer gets the same mask object)."""
    import torch

    if _cache.get("padding_mask") is not attention_mask:
        valid = attention_mask.bool()
        lengths = valid.sum(-1, dtype=torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        _cache.update(padding_mask=attention_mask, unpadding=(torch.nonzero(valid.flatten()).flatten(), cu,
                                                              int(lengths.max())))
    return _cache["unpadding"]


def _padded_on_varlen(kernel, query, key, value, attention_mask, scaling):
    """A padded batch (a preference trainer's chosen and rejected answers, right-padded) on the varlen kernel: the
    real tokens of every row are gathered into one packed sequence, attended causally within their row, and
    scattered back (padding positions get zeros: their outputs are never used), instead of sdpa over a dense
    [B, 1, S, S] mask. Valid for right and left padding: a row's real tokens are contiguous either way."""
    batch, heads, seq, dim = query.shape
    indices, cu, longest = _unpadding_once(attention_mask)

    def flat(t):
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)[indices]

    params = inspect.signature(kernel).parameters
    extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params and query.shape[1] != key.shape[1]:
        extra["enable_gqa"] = True
    out = kernel(flat(query), flat(key), flat(value), cu, cu, longest, longest, scale=scaling, **extra)
    full = out.new_zeros(batch * seq, heads, dim)
    full[indices] = out
    return full.view(batch, seq, heads, dim), None


def register() -> str:
    """Registers `peftopt_varlen` with transformers (idempotent) and returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

        AttentionInterface.register(NAME, varlen_attention_forward)
        AttentionMaskInterface.register(NAME, flash_attention_mask)
        _registered = True
    return NAME


def adapt_unsloth(dispatch=None, settings=None) -> str:
    """Lets unsloth's packed attention use torch's varlen kernel on torch < 2.12; says which path runs.

    `dispatch` is `unsloth.utils.attention_dispatch` (imported here when not given).
    """
    if settings is None:
        from job import settings as settings_module

        settings = settings_module.get()
    if dispatch is None:
        from unsloth.utils import attention_dispatch as dispatch
    ours = "varlen flash (torch's kernel set into unsloth's dispatch; this torch's varlen_attn lacks enable_gqa)"
    if getattr(dispatch._TORCH_VARLEN_ATTN, "set_by_peftopt", False):
        return ours
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "varlen flash (unsloth's own: this torch's varlen_attn takes enable_gqa)"
    if not settings.unsloth_torch_varlen:
        return "per-segment sdpa (UNSLOTH_TORCH_VARLEN is off)"
    kernel = varlen_kernel()
    if kernel is None or "window_size" not in inspect.signature(kernel).parameters:
        return "per-segment sdpa (this torch has no varlen flash kernel unsloth can call)"

    def varlen_without_gqa_flag(*args, enable_gqa: bool = False, **kwargs):
        return kernel(*args, **kwargs)  # the kernel reads the K/V head count from the tensors

    varlen_without_gqa_flag.set_by_peftopt = True
    dispatch._TORCH_VARLEN_ATTN = varlen_without_gqa_flag
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    dispatch._LEAN_VARLEN = True
    return ours
