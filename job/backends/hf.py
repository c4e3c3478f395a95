"""The `hf` backend: transformers + peft + trl. Runs on CPU and CUDA, and data-parallel under
`accelerate launch` / `torchrun` (the Trainer reads the launcher's environment).
"""
from __future__ import annotations

from job import distributed, modelsrc
from job.errors import SpecError
from job.backends import trainer as common
from job.log import get_logger, route_library_logs
from job.rundir import RunDir
from job.spec import JobSpec, LoraSpec

log = get_logger("peftopt.train")


def lora_config(lora: LoraSpec):
    from peft import LoraConfig

    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def choose_optimizer(requested: str, device: str) -> str:
    if device != "cuda" and "8bit" in requested:
        log.warning("optimizer_substituted", requested=requested, used="adamw_torch",
                    why="8-bit optimizers need CUDA")
        return "adamw_torch"
    return requested


def batch_plan(spec: JobSpec, device: str, ranks: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation) per rank, giving the spec's sequences per optimizer step in total:
    with more ranks each one accumulates less, so a run on 2 GPUs makes the same updates as on one.

    Raises:
        SpecError: the sequences per step cannot be shared evenly over the ranks.
    """
    train = spec.train
    total = train.per_device_batch_size * train.gradient_accumulation_steps
    if total % ranks:
        raise SpecError(f"train: per_device_batch_size x gradient_accumulation_steps = {total} sequences per "
                        f"step cannot be shared evenly over {ranks} ranks; make it a multiple of {ranks}")
    per_rank = total // ranks
    if isinstance(train.micro_batch_size, int):
        if per_rank % train.micro_batch_size:
            raise SpecError(f"train.micro_batch_size: {train.micro_batch_size} does not divide the {per_rank} "
                            f"sequences each of {ranks} ranks takes per step")
        return train.micro_batch_size, per_rank // train.micro_batch_size
    micro = min(train.per_device_batch_size, per_rank)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


def train(spec: JobSpec, run_dir: RunDir, device: str, restart: bool = False) -> dict:
    import torch
    from trl import SFTTrainer

    route_library_logs()
    loss_head_fallback = common.install_cpu_loss_head()
    location = modelsrc.model_location(spec, run_dir)
    tokenizer, _ = modelsrc.load_tokenizer(location, spec)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = modelsrc.load_model(location, spec, device)
    # bitsandbytes repacks 4-bit weights for good on the first no-grad eval-mode forward on some CPUs,
    # after which its gradients are wrong: the model must be in train mode before anything runs it.
    model.train()
    gradient_checkpointing = spec.train.gradient_checkpointing == "on" or (
        spec.train.gradient_checkpointing in ("auto", "unsloth") and device == "cuda" and spec.model.load_in_4bit)
    if spec.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    loaded_reserved = torch.cuda.memory_reserved() if device == "cuda" else 0
    micro, accumulation = batch_plan(spec, device, distributed.world().size)
    config = common.sft_config(spec, run_dir, device, micro_batch=micro, accumulation=accumulation,
                               gradient_checkpointing=gradient_checkpointing,
                               dtype=modelsrc.dtype_for(spec, device),
                               optim=choose_optimizer(spec.train.optim, device))
    started_box: dict = {}
    marker, stopper, progress = common.make_callbacks(spec, started_box)
    trainer = SFTTrainer(model=model, args=config, train_dataset=common.load_train_dataset(run_dir),
                         processing_class=tokenizer, peft_config=lora_config(spec.lora),
                         callbacks=[marker, stopper, progress])
    log.info("train_started", backend="hf", device=device, ranks=distributed.world().size, micro_batch=micro,
             accumulation=accumulation,
             gradient_checkpointing=gradient_checkpointing, loss_head_fallback=loss_head_fallback,
             trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    figures = common.run_trainer(trainer, spec, run_dir, tokenizer, progress, started_box, restart)
    figures.update(backend="hf", device=device, micro_batch=micro, accumulation=accumulation,
                   gradient_checkpointing=gradient_checkpointing)
    if device == "cuda":
        peak = torch.cuda.max_memory_reserved()
        figures.update(peak_gpu_gb=round(peak / 1024**3, 3),
                       lora_gpu_gb=round((peak - loaded_reserved) / 1024**3, 3))
    return figures
