"""What both backends share around trl's SFTTrainer: its config from the spec, checkpoints that can be
trusted, resume, progress events, the stop-on-signal hook, and trl's CPU loss-head fallback.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from job import distributed, interrupt
from job.errors import ExternalError, Interrupted
from job.log import get_logger, json_stdout
from job.rundir import RunDir, atomic_dir, atomic_write_json
from job.spec import JobSpec

log = get_logger("peftopt.train")
MARKER = "peftopt-checkpoint.json"


# ------------------------------------------------------------------------------ trl on CPU


class TorchLogProb:
    """Plain-torch stand-in for trl's Triton-only chunked log-prob head (same signature and outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        sum_sq = torch.logsumexp(2 * logp, -1).detach() if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1).detach() if "mean_logits" in outputs else None
        is_top1 = (logits.argmax(-1) == targets) if "is_top1" in outputs else None
        return token_logp, entropy, sum_sq, mean_logits, is_top1


def install_cpu_loss_head() -> bool:
    """trl 1.15 always computes its loss through a Triton kernel, which a CPU torch lacks. Returns True
    when the fallback was installed. tests/test_trl_compat.py pins the private name this relies on."""
    import torch
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is None or not torch.cuda.is_available():
        trl_utils._ChunkedLogProbFunction = TorchLogProb
        return True
    return False


# ------------------------------------------------------------------------------ config


def sft_config(spec: JobSpec, run_dir: RunDir, device: str, *, micro_batch: int, accumulation: int,
               gradient_checkpointing: bool, dtype, optim: str, **extra):
    import torch
    from trl import SFTConfig

    train = spec.train
    return SFTConfig(
        output_dir=str(run_dir.checkpoints_dir), max_steps=train.max_steps,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay, optim=optim, seed=train.seed,
        data_seed=train.seed, logging_steps=train.logging_steps, save_strategy="steps",
        save_steps=train.save_steps, save_total_limit=train.save_total_limit, packing=train.packing,
        max_length=spec.model.max_seq_length, report_to="none", use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16 and device == "cuda", fp16=dtype == torch.float16 and device == "cuda",
        dataloader_num_workers=0, disable_tqdm=json_stdout(), gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        dataset_num_proc=None, ddp_find_unused_parameters=False, **extra,
    )


def load_train_dataset(run_dir: RunDir, part: str = "train"):
    import datasets

    path = run_dir.data_dir / f"{part}.jsonl"
    if not path.exists():
        return None
    # One cache per rank: ranks preparing the same file at once must not write the same cache files.
    cache = run_dir.root / ".cache" / f"datasets-rank{distributed.world().rank}"
    return datasets.Dataset.from_json(str(path), cache_dir=str(cache))


# ------------------------------------------------------------------------------ checkpoints


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def checkpoint_is_complete(path: Path) -> bool:
    marker = path / MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in listed.items())


def newest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint whose files are all there; half-written ones are removed with a warning."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if p.is_dir()), key=_checkpoint_step,
                        reverse=True)
    for path in candidates:
        if checkpoint_is_complete(path):
            return path
        log.warning("checkpoint_incomplete", path=str(path), action="removed; resuming from an older one")
        shutil.rmtree(path, ignore_errors=True)
    return None


def make_callbacks(spec: JobSpec, started_step_box: dict):
    """The callbacks every backend installs. `started_step_box` is filled with the step training started
    from and, with train.checkpoint_sync, the uploader ("sync") that run_trainer waits for."""
    from transformers import TrainerCallback

    uploader = None
    if spec.train.checkpoint_sync and distributed.world().is_main:
        from job import checkpoint_sync

        uploader = started_step_box["sync"] = checkpoint_sync.Uploader(spec)
        fingerprint = checkpoint_sync.train_fingerprint(spec)
    else:
        fingerprint = None

    class MarkCheckpoints(TrainerCallback):
        """Writes the marker that makes a checkpoint count as complete, once the Trainer has saved it."""

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if distributed.active():
                distributed.barrier()  # every rank has written its RNG state before the listing
                if not distributed.world().is_main:
                    return
            if path.is_dir():
                files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")
                         if p.is_file() and p.name != MARKER}
                atomic_write_json(path / MARKER, {"step": state.global_step, "files": files,
                                                   "train_fingerprint": fingerprint})
                log.info("checkpoint_saved", step=state.global_step, path=str(path))
                if uploader is not None:
                    uploader.submit(path, [_checkpoint_step(p) for p in Path(args.output_dir).glob("checkpoint-*")
                                           if checkpoint_is_complete(p)])

    class Progress(TrainerCallback):
        """Periodic `train_progress` events: step, max_steps, loss, tokens_per_s, eta_s."""

        def __init__(self):
            self.t0 = None
            self.tokens = 0.0  # this rank's
            self.all_tokens = 0.0  # every rank's, as of the last step end
            self.first_step = 0
            self.losses: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.first_step = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            elapsed = max(time.perf_counter() - (self.t0 or time.perf_counter()), 1e-9)
            done = max(state.global_step - self.first_step, 1)
            event = {"step": state.global_step, "max_steps": state.max_steps, "loss": round(logs["loss"], 6),
                     "learning_rate": logs.get("learning_rate"), "tokens": int(self.all_tokens), "tokens_per_s": round(self.all_tokens / elapsed, 1),
                     "eta_s": round(elapsed / done * (state.max_steps - state.global_step), 1)}
            self.losses.append({"step": state.global_step, "loss": logs["loss"]})
            log.info("train_progress", **event)

    progress = Progress()

    class StopOnSignal(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started_step_box["step"] = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            stop = interrupt.stop_requested()
            if distributed.active():
                stop, progress.all_tokens = distributed.vote(stop, progress.tokens)
            else:
                progress.all_tokens = progress.tokens
            if stop:
                control.should_save = True
                control.should_training_stop = True

    return MarkCheckpoints(), StopOnSignal(), progress


def count_tokens(trainer, progress) -> None:
    """Counts the tokens of every batch the trainer draws (real tokens: padding excluded). Neither trl's
    `num_tokens` (reset on resume) nor unsloth (which does not log it) can be relied on for this."""
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        progress.tokens += float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting


def run_trainer(trainer, spec: JobSpec, run_dir: RunDir, tokenizer, progress, started_step_box: dict,
                restart: bool = False) -> dict:
    """Trains from the newest complete checkpoint, saves the adapter, and returns the run's figures.

    Raises:
        Interrupted: a signal stopped training; a checkpoint of the last finished step was saved.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if json_stdout():  # the Trainer would print raw dicts and bars into the JSON stream
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    count_tokens(trainer, progress)
    resume = find_resume_point(spec, run_dir, restart, started_step_box)
    if distributed.active() and trainer.args.device.type == "cpu" and trainer.args.device.index is not None:
        # accelerate names CPU ranks "cpu:N", which torch.load rejects as a map_location when the Trainer
        # reloads the optimizer on resume (transformers 5.17); the same device under its plain name.
        import torch

        trainer.args.__dict__["_setup_devices"] = torch.device("cpu")
    started = time.perf_counter()
    try:
        if resume is not None and _checkpoint_step(resume) >= spec.train.max_steps:
            train_loss = finished_checkpoint(trainer, resume)
            started_step_box["step"] = trainer.state.global_step
        else:
            train_loss = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics.get("train_loss")
    except OSError as exc:
        raise ExternalError(f"training could not write to {run_dir.checkpoints_dir}: {exc.strerror or exc}") from exc
    finally:
        if "sync" in started_step_box:
            started_step_box["sync_figures"] = started_step_box["sync"].finish()
    runtime = time.perf_counter() - started
    step = trainer.state.global_step
    if interrupt.stop_requested() and step < spec.train.max_steps:
        raise Interrupted(f"stopped at step {step}/{spec.train.max_steps} by a signal; checkpoint saved, "
                          "rerun the same command to resume")
    if distributed.world().is_main:
        with atomic_dir(run_dir.adapter_dir) as out:
            trainer.model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "global_step": step, "resumed_from_step": started_step_box.get("step", 0) or None,
        "session_runtime_s": round(runtime, 3), "train_loss_mean": train_loss,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
        "session_tokens": int(progress.all_tokens),
        "tokens_per_s": round(progress.all_tokens / runtime, 1) if runtime > 0 else None,
        "world_size": distributed.world().size,
        **({"checkpoint_sync": {**started_step_box["sync_figures"], "restored_step": started_step_box.get("restored")}}
           if "sync_figures" in started_step_box else {}),
    }


def finished_checkpoint(trainer, checkpoint: Path) -> float | None:
    """Takes the adapter and history from a checkpoint saved at max_steps (a run stopped between the last
    checkpoint and saving the adapter). Resumed there, the Trainer would run one step past max_steps
    (transformers 5.17 checks the limit only after a step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    trainer.state.global_step = saved["global_step"]
    trainer.state.log_history = saved.get("log_history", [])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else None


def find_resume_point(spec: JobSpec, run_dir: RunDir, restart: bool = False, box: dict | None = None) -> Path | None:
    """The checkpoint to resume from. Rank 0 decides (it may remove a torn checkpoint, or restore one from
    the Hub when the local directory is empty) and tells the other ranks."""
    me = distributed.world()
    resume = None
    if me.is_main:
        resume = newest_complete_checkpoint(run_dir.checkpoints_dir)
        if resume is None and spec.train.checkpoint_sync:
            from job import checkpoint_sync

            resume = checkpoint_sync.restore(spec, run_dir, restart)
            if resume is not None and box is not None:
                box["restored"] = _checkpoint_step(resume)
        if resume is not None:
            log.info("train_resumed", checkpoint=str(resume), step=_checkpoint_step(resume))
    if me.size > 1:
        resume = distributed.send({"resume": str(resume) if resume else None})["resume"]
    return Path(resume) if resume else None
