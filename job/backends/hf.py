"""The `hf` backend: transformers + peft + trl. Runs on CPU and CUDA, and data-parallel under
`accelerate launch` / `torchrun` (the Trainer reads the launcher's environment). On CUDA, packed rows run
on torch's varlen flash kernel (`attention.py`), norms, RoPE and the gated MLP on Liger's fused kernels
(`liger.py`), each LoRA layer as one autograd function with its sums inside the GEMMs (`fused_lora.py`),
and the batch is planned from a memory estimate as for unsloth; trl computes the loss through its fused LM
head (no full logits).
"""
from __future__ import annotations

from job import distributed, modelsrc
from job.backends import attention, dequantize, fused_lora, liger
from job.backends import plan as batch_plan
from job.spec import JobSpec, LoraSpec
NAME = "hf"


def lora_config(lora: LoraSpec):
    from peft import LoraConfig

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                      init_lora_weights=True if lora.init == "default" else lora.init,
                      modules_to_save=list(lora.modules_to_save) or None)


def plan(spec: JobSpec, config, device: str, settings) -> batch_plan.Plan:
    """Raises SpecError when the spec's sequences per step cannot be shared evenly over the ranks."""
    import dataclasses

    ranks = distributed.world(settings).size
    parallel = "none" if ranks == 1 else ("fsdp" if spec.train.parallel == "fsdp" else "ddp")
    if device != "cuda":
        return dataclasses.replace(batch_plan.on_cpu(spec, ranks), parallel=parallel)
    import torch

    gpu_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3
    fused, _ = liger.availability(config.model_type, device, settings)
    def planned(how: str) -> batch_plan.Plan:
        chosen = batch_plan.choose(spec, config, gpu_gb, backend="hf+liger" if fused else NAME, ranks=ranks,
                                   dequantize=settings.dequantize_base and how != "fsdp", sharded=how == "fsdp")
        return dataclasses.replace(chosen, parallel=how)

    chosen = planned(parallel)
    if spec.train.parallel == "auto" and parallel == "ddp" and chosen.reason == batch_plan.NOTHING_FITS:
        sharded = planned("fsdp")  # the model does not fit one GPU whole: shard it when that fits
        if sharded.reason != batch_plan.NOTHING_FITS:
            return dataclasses.replace(sharded, reason=f"{sharded.reason}, sharded over {ranks} ranks: a whole "
                                       f"model per GPU is estimated at {chosen.estimated_gb} GiB")
    return chosen


def setup(spec: JobSpec, location: str, device: str, chosen: batch_plan.Plan, settings, config=None):
    """(model, peft config, figures for the log): trl wraps the model with LoRA, in bf16 adapters for QLoRA.
    `config`: the model's own, changed (kernels_ahead's model of fewer layers)."""
    from transformers import AutoConfig

    path, why = attention.hf_path(device, modelsrc.dtype_for(spec, device),
                                  config or AutoConfig.from_pretrained(location))
    if not spec.train.packing and path == "varlen":
        path, why = "sdpa", "packing is off: padded batches use sdpa"
    implementation = attention.register() if path == "varlen" else "sdpa"
    sharded = chosen.parallel == "fsdp"
    # Sharded, only rank 0 reads the weights (the others' shards come from it: distributed.shard); a 4-bit base
    # is quantized as it loads, so every rank loads it.
    model = modelsrc.load_model(location, spec, device, attn_implementation=implementation, shardable=sharded,
                                weightless=sharded and not spec.model.load_in_4bit and not distributed.world().is_main,
                                config=config)
    if chosen.dequantize_base:  # before trl wraps it: peft then gives the 16-bit layers plain LoRA layers
        dequantize.dequantize_base(model)
    # bitsandbytes repacks 4-bit weights for good on the first no-grad eval-mode forward on some CPUs,
    # after which its gradients are wrong: the model must be in train mode before anything runs it.
    # (No prepare_model_for_kbit_training: it upcasts every non-quantized weight, the LM head included,
    # to fp32, which costs memory and time; trl enables input gradients for checkpointing itself.)
    model.train()
    fused, fused_why = liger.availability(model.config.model_type, device, settings)
    kernels = liger.apply(model) if fused else []
    return model, lora_config(spec.lora), {"attention": path, "attention_why": why,
                                           "base_weights": dequantize.base_weights(spec, chosen.dequantize_base),
                                           "kernels": ", ".join(kernels) or "transformers' own",
                                           "kernels_why": fused_why}


def wrapped(trainer, device: str, chosen: batch_plan.Plan, settings) -> dict:
    """After trl has wrapped the model with LoRA: the fused LoRA layers on CUDA (not under FSDP, whose sharded
    weights are gathered around each module's own forward and backward). Figures for the log."""
    if device != "cuda":
        return {}
    if not settings.fused_lora:
        return {"lora_layers": "peft's own (PEFTOPT_FUSED_LORA=0)"}
    if chosen.parallel == "fsdp":
        return {"lora_layers": "peft's own (sharded weights)"}
    fused, total = fused_lora.apply(trainer.model)
    rest = ", the rest peft's own" if fused < total else ""
    return {"lora_layers": f"{fused} of {total} fused (fused_lora.py){rest}"}


def train(spec: JobSpec, run_dir, device: str, *, fingerprint: str, settings, restart: bool = False) -> dict:
    import sys

    from job.backends import trainer

    try:
        return trainer.train(sys.modules[__name__], spec, run_dir, device, fingerprint=fingerprint,
                             settings=settings, restart=restart)
    finally:
        liger.undo()  # later stages in this process run transformers' own modules
