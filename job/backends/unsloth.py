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


def wrapped(trainer, device: str, chosen: batch_plan.Plan, settings) -> dict:
    """After trl has built the trainer: a packed row's segment lengths read where the batch is made, on the CPU
    (`lengths_from_host`). Figures for the log (none)."""
    if device == "cuda":
        lengths_from_host(trainer)
    return {}


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
            prepared["packed_seq_lengths"] = host_lengths(lengths)
        return prepared

    trainer.data_collator = with_lengths
    trainer._prepare_inputs = _prepare_inputs


def host_lengths(lengths):
    """A packed row's segment lengths as unsloth takes them without reading anything back: int32, on the CPU (the
    object itself is its cache's key, so every layer of the forward finds the one staged copy)."""
    import torch

    return torch.tensor(lengths, dtype=torch.int32)


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
