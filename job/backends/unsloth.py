"""The `unsloth` backend: FastLanguageModel (4-bit or 16-bit), its LoRA wrapping and kernels, trl's
SFTTrainer with packing, on one CUDA GPU. How the batch runs comes from `plan.choose`.
"""
from __future__ import annotations

import os

from job import modelsrc
from job.backends import plan as batch_plan
from job.backends import trainer as common
from job.backends.hf import choose_optimizer
from job.log import get_logger, route_library_logs
from job.rundir import RunDir
from job.spec import JobSpec

log = get_logger("peftopt.train")


def load(location: str, spec: JobSpec, checkpointing: str):
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=location, max_seq_length=spec.model.max_seq_length,
        dtype=None if spec.model.dtype == "auto" else getattr(__import__("torch"), spec.model.dtype),
        load_in_4bit=spec.model.load_in_4bit, load_in_16bit=not spec.model.load_in_4bit,
        use_gradient_checkpointing={"off": False, "on": True, "unsloth": "unsloth"}[checkpointing],
        random_state=spec.train.seed if spec.train else 3407, fix_tokenizer=False)
    return model, tokenizer


def wrap(model, spec: JobSpec, checkpointing: str):
    from unsloth import FastLanguageModel

    lora = spec.lora
    targets = list(lora.target_modules) if lora.target_modules != "all-linear" else list(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        use_gradient_checkpointing={"off": False, "on": True, "unsloth": "unsloth"}[checkpointing],
        random_state=spec.train.seed)


def train(spec: JobSpec, run_dir: RunDir, device: str, restart: bool = False) -> dict:
    import torch
    from transformers import AutoConfig
    from trl import SFTTrainer

    route_library_logs()
    location = modelsrc.model_location(spec, run_dir)
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1024**3
    chosen = batch_plan.choose(spec, AutoConfig.from_pretrained(location), gpu_gb)
    log.info("batch_plan", **chosen.__dict__)
    torch.cuda.reset_peak_memory_stats()
    model, _ = load(location, spec, chosen.gradient_checkpointing)
    tokenizer, _ = modelsrc.load_tokenizer(location, spec)  # the spec's template, not unsloth's
    loaded_reserved = torch.cuda.memory_reserved()
    model = wrap(model, spec, chosen.gradient_checkpointing)
    config = common.sft_config(spec, run_dir, device, micro_batch=chosen.micro_batch,
                               accumulation=chosen.accumulation, gradient_checkpointing=False,
                               dtype=modelsrc.dtype_for(spec, device), optim=choose_optimizer(spec.train.optim, device))
    started_box: dict = {}
    marker, stopper, progress = common.make_callbacks(spec, started_box)
    trainer = SFTTrainer(model=model, args=config, train_dataset=common.load_train_dataset(run_dir),
                         processing_class=tokenizer, callbacks=[marker, stopper, progress])
    log.info("train_started", backend="unsloth", device=device, micro_batch=chosen.micro_batch,
             accumulation=chosen.accumulation, gradient_checkpointing=chosen.gradient_checkpointing)
    figures = common.run_trainer(trainer, spec, run_dir, tokenizer, progress, started_box, restart)
    peak = torch.cuda.max_memory_reserved()
    figures.update(backend="unsloth", device=device, micro_batch=chosen.micro_batch,
                   accumulation=chosen.accumulation, gradient_checkpointing=chosen.gradient_checkpointing,
                   plan_estimated_gb=chosen.estimated_gb, plan_budget_gb=chosen.budget_gb,
                   peak_gpu_gb=round(peak / 1024**3, 3), lora_gpu_gb=round((peak - loaded_reserved) / 1024**3, 3))
    os.environ.pop("UNSLOTH_RETURN_LOGITS", None)
    return figures
