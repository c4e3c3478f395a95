"""The `unsloth` backend: FastLanguageModel (4-bit or 16-bit), its LoRA wrapping and kernels, trl's
SFTTrainer with packing, on one CUDA GPU. The batch comes from `plan.choose`; packed rows use torch's
varlen flash kernel (`attention.adapt_unsloth` sets it in on torch < 2.12).
"""
from __future__ import annotations

from job.backends import attention, dequantize
from job.backends import plan as batch_plan
from job.spec import JobSpec

NAME = "unsloth"
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The trl trainers this backend trains with (job/backends/__init__.py sends every other method to hf).
TRL_TRAINERS = ("sft_trainer",)


def import_library() -> None:
    """Imports unsloth (before transformers, trl and peft, which it patches), rewriting only the trl trainers this
    backend uses. unsloth rewrites every trl trainer at import (21 of them with trl 1.15, each regenerated from its
    source): 8.4 of the 25 s between process start and the first stage on the H200, for trainers a job never
    builds here. The rest of unsloth's import is untouched.

    Raises:
        Exception: whatever unsloth raises when it cannot load here (the caller reports it).
    """
    import importlib
    import sys

    if "unsloth" in sys.modules:
        return
    finder = _AfterImport("unsloth.models.rl", _only_our_trainers)
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module("unsloth")
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def _only_our_trainers(rl_module) -> None:
    """unsloth.models.rl, as soon as it is executed: its walk over trl's trainers takes ours alone."""
    rewrite_one = rl_module._patch_trl_rl_trainers

    def patch_trl_rl_trainers():
        for trainer_file in TRL_TRAINERS:
            rewrite_one(trainer_file)

    rl_module.patch_trl_rl_trainers = patch_trl_rl_trainers


class _AfterImport:
    """A meta-path finder that runs `then(module)` right after module `name` executes, before anything imports
    from it (a post-import hook, as wrapt's)."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        from importlib.machinery import PathFinder

        if fullname != self.name:
            return None
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute, then = spec.loader.exec_module, self.then

        def exec_module(module):
            execute(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec


def plan(spec: JobSpec, config, device: str, settings) -> batch_plan.Plan:
    import torch

    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3
    return batch_plan.choose(spec, config, gpu_gb, backend=NAME, dequantize=settings.dequantize_base)


def _checkpointing(mode: str):
    return {"off": False, "on": True, "unsloth": "unsloth"}[mode]


def setup(spec: JobSpec, location: str, device: str, chosen: batch_plan.Plan, settings, config=None):
    """(model wrapped with LoRA, None, figures for the log); `config`: the model's own, changed (kernels_ahead's
    model of fewer layers: the checkpoint's other layers are not loaded)."""
    import os

    import torch
    from unsloth import FastLanguageModel

    # unsloth 2026.10 compiles every decoder layer as one torch.compile region. For t1's packed rows on the
    # H100 that cost 8.6 s of compiling per process (train stage of 60 steps: 39.0 s with it, 30.4 s without)
    # and bought nothing once warm (64.0k against 64.5k tokens/s, the same loss). unsloth reads this when the
    # model is patched and at every forward: a write for unsloth (UNSLOTH_BLOCK_COMPILE=1 turns it back on).
    os.environ["UNSLOTH_BLOCK_COMPILE"] = "1" if settings.unsloth_block_compile else "0"
    path = attention.adapt_unsloth(settings=settings)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=location, max_seq_length=spec.model.max_seq_length,
        dtype=None if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype),
        load_in_4bit=spec.model.load_in_4bit, load_in_16bit=not spec.model.load_in_4bit,
        use_gradient_checkpointing=_checkpointing(chosen.gradient_checkpointing),
        random_state=spec.train.seed, fix_tokenizer=False, **({"config": config} if config is not None else {}))
    lora = spec.lora
    targets = list(lora.target_modules) if lora.target_modules != "all-linear" else list(LINEAR)
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        use_gradient_checkpointing=_checkpointing(chosen.gradient_checkpointing), random_state=spec.train.seed,
        use_rslora=lora.use_rslora, init_lora_weights=True if lora.init == "default" else lora.init,
        modules_to_save=list(lora.modules_to_save) or None)
    if chosen.dequantize_base:  # after wrapping: unsloth's LoRA kernels take a base weight without a quant state as 16-bit
        dequantize.dequantize_base(model)
    return model, None, {"attention": path, "base_weights": dequantize.base_weights(spec, chosen.dequantize_base)}


LENGTHS_KEY = "peftopt_segment_lengths"


KEPT_KEY = "peftopt_kept_labels"


def wrapped(trainer, device: str, chosen: batch_plan.Plan, settings) -> dict:
    """After trl has built the trainer: a packed row's segment lengths and its count of labels the loss keeps, read
    where the batch is made, on the CPU (`lengths_from_host`, `kept_labels_from_host`). Figures for the log."""
    if device != "cuda":
        return {}
    lengths_from_host(trainer)
    return {"kept_labels": "counted on the host" if kept_labels_from_host(trainer) else "counted on the GPU"}


class _KeptCount:
    """The count of labels the fused loss keeps in the micro-batch the trainer prepared last, and the length of its
    row, for the loss's index of them (one forward's loss takes it once)."""
    count: int | None = None
    length: int | None = None


def kept_labels_from_host(trainer) -> bool:
    """unsloth's fused cross-entropy gathers the rows whose label it keeps with `nonzero` on the GPU
    (`unsloth_zoo.fused_losses.fused_linear._keep_index`), and reads their count back to size its chunks: the host
    waits there, at the end of every forward, for the GPU to finish the forward, and the lead it had built is gone
    when the backward starts, whose many short kernels (unsloth's LoRA autograd functions) then leave the GPU
    waiting for the host. The collator here counts the labels the loss keeps on the CPU (the row's labels shifted
    by one, none at a segment's start, as unsloth masks them), and the loss's index is then made with
    `torch.nonzero_static` of that size, which reads nothing back; the device checks the count
    (`torch._assert_async`: a count that is not the GPU's stops the job with a CUDA error, never a different loss).
    False, and nothing changed, when this unsloth_zoo has no such function."""
    if not index_from_host_count():
        return False
    collate = trainer.data_collator

    def with_count(features):
        batch = collate(features)
        batch[KEPT_KEY] = kept_count(batch)
        return batch

    prepare = trainer._prepare_inputs

    def _prepare_inputs(inputs):
        kept = inputs.pop(KEPT_KEY, None)
        _KeptCount.count, _KeptCount.length = kept if kept else (None, None)
        return prepare(inputs)

    trainer.data_collator = with_count
    trainer._prepare_inputs = _prepare_inputs
    return True


def kept_count(batch) -> tuple[int, int] | None:
    """(labels the fused loss keeps, the row's length) of a packed row [1, T] on the CPU: its labels shifted by one
    (the last position has no next token) that are not -100 and are not a segment's start (unsloth's boundary mask);
    None for anything else."""
    import torch

    labels, positions = batch.get("labels"), batch.get("position_ids")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != 1 \
            or labels.device.type != "cpu":
        return None
    keep = labels[0, 1:] != -100
    if isinstance(positions, torch.Tensor) and positions.shape == labels.shape:
        keep &= positions[0, 1:] != 0
    return int(keep.sum()), labels.shape[1]


def index_from_host_count() -> bool:
    """Sets the loss's index of kept labels to come from the host's count (`_KeptCount`) when one is given; False when
    this unsloth_zoo has no `_keep_index` of the shape this knows."""
    import inspect

    try:
        from unsloth_zoo.fused_losses import fused_linear
    except ImportError:
        return False
    own = getattr(fused_linear, "_keep_index", None)
    if own is None or list(inspect.signature(own).parameters) != ["targets", "mask", "vocab_size", "ignore_index"]:
        return False
    if not getattr(own, "peftopt_host_count", False):
        fused_linear._keep_index = _host_counted(own)
    return True


def _host_counted(own):
    def _keep_index(targets, mask, vocab_size, ignore_index):
        import torch

        count, length = _KeptCount.count, _KeptCount.length
        _KeptCount.count = _KeptCount.length = None
        if count is None or mask is not None or ignore_index is None or not targets.is_cuda \
                or targets.numel() != length:
            return own(targets, mask, vocab_size, ignore_index)
        keep = (targets >= 0) & (targets < vocab_size) & (targets != ignore_index)
        index = torch.nonzero_static(keep, size=count).squeeze(-1)
        torch._assert_async(keep.sum() == count, "peftopt: the host's count of kept labels is not the GPU's")
        return index, count

    _keep_index.peftopt_host_count = True
    return _keep_index


def lengths_from_host(trainer) -> None:
    """unsloth finds a packed row's segments from its `position_ids` on the GPU and reads them back (a `nonzero`
    and a `.tolist()`), which makes the host wait, early in every forward, for the GPU to finish everything queued
    before. It takes them from `packed_seq_lengths` instead when they are given on the CPU (as its own packing
    collator makes them): one copy from page-locked memory without a wait, the host's lengths kept for every layer
    (`unsloth.utils.packing.get_packed_info_from_kwargs`). The collator here reads them from the row's positions on
    the CPU (in the batch worker); the batch carries them as plain numbers, which the copy of the batch to the GPU
    leaves alone, and they are handed to the model as a CPU tensor. The same segments, so the same attention and
    loss."""
    collate = trainer.data_collator

    def with_lengths(features):
        batch = collate(features)
        if "attention_mask" not in batch:
            lengths = attention.segment_lengths(batch.get("position_ids"))
            if lengths is not None:
                batch[LENGTHS_KEY] = lengths
        return batch

    prepare = trainer._prepare_inputs

    def _prepare_inputs(inputs):
        lengths = inputs.pop(LENGTHS_KEY, None)
        prepared = prepare(inputs)
        if lengths is not None:
            prepared["packed_seq_lengths"] = host_lengths(lengths, prepared["input_ids"].device)
        return prepared

    trainer.data_collator = with_lengths
    trainer._prepare_inputs = _prepare_inputs
    _boundary_mask_takes_staged_lengths()


def host_lengths(lengths, device=None):
    """A packed row's segment lengths as unsloth takes them without reading anything back: int32, on the CPU (the
    object itself is its cache's key, so every layer of the forward finds the one staged copy). With a CUDA
    `device`, an int64 copy there too, made from page-locked memory without a wait, for the loss's boundary mask
    (`_boundary_mask_takes_staged_lengths`)."""
    import torch

    host = torch.tensor(lengths, dtype=torch.int32)
    if device is not None and torch.device(device).type == "cuda":
        host.peftopt_on_device = torch.tensor(lengths, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    return host


def _boundary_mask_takes_staged_lengths() -> None:
    """unsloth's fused-loss path masks the label after each segment (`mask_packed_boundary_labels`) with the lengths
    moved to the GPU by a blocking copy (`_normalize_packed_lengths`), which makes the host wait there: the lengths
    `host_lengths` gives carry their device copy already, and it is taken as it is (the same values: the same mask)."""
    import torch

    try:
        from unsloth.utils import packing
    except ImportError:  # no unsloth here (a CPU machine): nothing to set
        return
    own = getattr(packing, "_normalize_packed_lengths", None)
    if own is None or getattr(own, "peftopt_staged", False):
        return

    def _normalize_packed_lengths(seq_lengths, *, device):
        staged = getattr(seq_lengths, "peftopt_on_device", None)
        if staged is not None and staged.device == torch.device(device) and staged.numel():
            return staged
        return own(seq_lengths, device=device)

    _normalize_packed_lengths.peftopt_staged = True
    packing._normalize_packed_lengths = _normalize_packed_lengths


def train(spec: JobSpec, run_dir, device: str, *, fingerprint: str, settings, restart: bool = False) -> dict:
    import os
    import sys

    from job.backends import trainer

    try:
        return trainer.train(sys.modules[__name__], spec, run_dir, device, fingerprint=fingerprint,
                             settings=settings, restart=restart)
    finally:
        # unsloth's trainer sets this for training and reads it at every forward; later stages of the same
        # process generate text (a write for unsloth)
        os.environ.pop("UNSLOTH_RETURN_LOGITS", None)
