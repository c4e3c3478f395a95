"""The trainer set-up both backends share, built in one place for the job and for `peftopt bench`: the trl
trainer of the spec's method (job/methods/) configured from the spec and the batch plan, token counting, progress events with a steady-state
figure, the stop-on-signal hook, checkpoints written off the training thread, resume, and trl's CPU loss-head
fallback. A backend only loads and wraps the model (`setup`) and plans the batch (`plan`).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, MutableMapping
from typing import Any

from job import distributed, interrupt, modelsrc, tracking
from job import settings as settings_module
from job.backends.plan import Plan
from job.checkpoints import (AsyncCheckpointWriter, Expected, adapter_shapes, checkpoint_step, complete_steps,
                             newest_complete_checkpoint, set_aside)
from job.errors import CheckpointRefused, ExternalError, Interrupted, PeftoptError, RankLost
from job.log import get_logger, training_bar
from job.rundir import RunDir, atomic_dir, refuse_links
from job.spec import JobSpec

log = get_logger("peftopt.train")
STEADY_SKIP = 3  # steps left out of the steady-state figure: compilation, allocator warm-up


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
    """trl 1.15 always computes its loss through a Triton kernel (its fused LM head, which on CUDA never
    materialises the full logits), which a CPU torch lacks. Returns True when the fallback was installed.
    tests/unit/test_trl_compat.py pins the private name this relies on."""
    import torch
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is None or not torch.cuda.is_available():
        trl_utils._ChunkedLogProbFunction = TorchLogProb
        return True
    return False


# ------------------------------------------------------------------------------ config and data


def choose_optimizer(requested: str, device: str) -> str:
    if requested == "auto":
        return "adamw_8bit" if device == "cuda" else "adamw_torch"
    if device != "cuda" and "8bit" in requested:
        log.warning("optimizer_substituted", requested=requested, used="adamw_torch",
                    why="8-bit optimizers need CUDA")
        return "adamw_torch"
    return requested


# A packed micro-batch's token count padded up to a multiple of this on a GPU. The count is the inner dimension of
# the LoRA weights' gradients (dA, dB: 14 per decoder layer), and for one that is not a multiple of 8 cuBLAS has
# only its unaligned fallback kernels: 15 ms of each t1 step on the H200, 7% of the step (docs/performance.md). The padding tokens are segments of their
# own (position 0, label -100): nothing else attends to them and the loss leaves them out.
TOKEN_MULTIPLE = 16


def token_multiple(method, device: str) -> int | None:
    """pad_to_multiple_of for the trl config: supervised (packed or padded) batches on a GPU."""
    return TOKEN_MULTIPLE if device == "cuda" and method.family == "chat" else None


def trainer_config(spec: JobSpec, output_dir: Path, device: str, plan: Plan, dtype, *, saving: bool = True,
                   trainer_checkpointing: bool = True, tracking: dict | None = None, batch_workers: int = 0,
                   **extra):
    """The trl config of the spec's method (job/methods/), from the spec and the batch plan.
    `batch_workers` processes collate batches ahead of the step (settings.batch_workers_on)."""
    import torch

    from job import methods

    train = spec.train
    method = methods.get(train.method)
    config_class, _ = method.classes()
    lengths = {method.length_field: spec.model.max_seq_length} if method.length_field else {}
    multiple = token_multiple(method, device)
    return config_class(
        # with train.epochs, counted once the trainer has prepared (packed) its data: `with_steps_of_epochs`
        output_dir=str(output_dir), max_steps=train.max_steps or -1,
        per_device_train_batch_size=plan.micro_batch, gradient_accumulation_steps=plan.accumulation,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        optim=choose_optimizer(train.optim, device), seed=train.seed, data_seed=train.seed,
        logging_steps=train.logging_steps, save_strategy="steps" if saving else "no",
        save_steps=train.save_steps, save_total_limit=train.save_total_limit,
        use_cpu=device == "cpu", **lengths, **(tracking or {"report_to": "none"}),
        bf16=dtype == torch.bfloat16 and device == "cuda", fp16=dtype == torch.float16 and device == "cuda",
        dataloader_num_workers=batch_workers, dataloader_persistent_workers=batch_workers > 0,
        dataloader_prefetch_factor=4 if batch_workers else None, disable_tqdm=True,  # our own bar (job/log.py)
        # A batch copied to the GPU from page-locked memory without waiting: a blocking copy synchronizes the stream,
        # and the loop could not queue the next step's work while the GPU finishes the last (with the held-back loss
        # copied without waiting and unsloth's segment lengths made on the host, nothing else stops it there).
        **({"accelerator_config": {"non_blocking": True}, "dataloader_pin_memory": True} if device == "cuda" else {}),
        # The filter swaps a NaN or infinite loss for the mean of earlier ones in the log, hiding a diverged run,
        # and reads the loss back from the GPU after every micro-batch to do it, which stalls the queue.
        logging_nan_inf_filter=False,
        # unsloth checkpoints (and offloads) inside its own layers; the Trainer's must stay off there
        gradient_checkpointing=plan.gradient_checkpointing == "on" and trainer_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}
        if plan.gradient_checkpointing == "on" and trainer_checkpointing else None,
        ddp_find_unused_parameters=False, **method.config(train),
        **({"pad_to_multiple_of": multiple} if multiple else {}), **extra,
    )


def load_train_dataset(run_dir: RunDir, part: str = "train"):
    import datasets

    path = run_dir.data_dir / f"{part}.jsonl"
    if not os.path.lexists(path):
        return None
    run_dir.own(path)
    # A cache of this attempt and rank's own, made here (so no other writer of the volume can have put a link in
    # its place, which datasets would write through); the next attempt's scratch cleaning removes it.
    caches = run_dir.root / ".cache"
    caches.mkdir(exist_ok=True)
    refuse_links(run_dir.root, caches)
    cache = tempfile.mkdtemp(prefix=f"datasets-{distributed.world().rank}-", dir=caches)
    return datasets.Dataset.from_json(str(path), cache_dir=cache)


# ------------------------------------------------------------------------------ the optimizer


def _no_sync(tensor) -> None:
    return None


def without_per_parameter_syncs(optimizer) -> bool:
    """bitsandbytes (0.50) synchronizes the device after each parameter's update in its 8-bit optimizers' step
    (`sync_gpu`, 224 times in a t1 step): its paged state needs that, state kept on the device does not (each
    update is a kernel queued behind the gradients it reads, ahead of the forward that reads the weights). For a
    bitsandbytes optimizer that is not paged, its step runs without those syncs; the updates are the same.
    Returns True when the optimizer (or the one an accelerate wrapper holds) was one."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner is not inner.optimizer:  # accelerate's AcceleratedOptimizer
        inner = inner.optimizer
    try:
        from bitsandbytes.optim import optimizer as bnb_optimizer
    except ImportError:
        return False
    if not isinstance(inner, bnb_optimizer.Optimizer8bit) or getattr(inner, "is_paged", True) \
            or not callable(getattr(bnb_optimizer, "sync_gpu", None)):
        return False
    step = inner.step

    @functools.wraps(step)
    def unsynchronized_step(*args, **kwargs):
        synchronizing = bnb_optimizer.sync_gpu
        bnb_optimizer.sync_gpu = _no_sync
        try:
            return step(*args, **kwargs)
        finally:
            bnb_optimizer.sync_gpu = synchronizing

    inner.step = unsynchronized_step
    return True


def flops_counted_once(trainer) -> None:
    """The Trainer adds 6 x tokens x parameters to its FLOP count (`total_flos` of its state) after every
    micro-batch, counting the model's parameters anew each time: a walk of every module and parameter (t1's model
    with LoRA: 1,337 modules and 370 parameters, about 2 ms of host time a step, with the GPU waiting on the host
    at the step's end). The count does not change while the model trains: made once per model, the same figure."""
    from transformers import Trainer

    if type(trainer).floating_point_ops is not Trainer.floating_point_ops:  # a trainer that counts its own way
        return
    counted: dict[int, int] = {}

    def floating_point_ops(inputs) -> int:
        model = trainer.model
        main_input = getattr(model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(model, "num_parameters"):
            return 0
        if id(model) not in counted:
            counted[id(model)] = model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * counted[id(model)]

    trainer.floating_point_ops = floating_point_ops


class LossReadAStepLate:
    """The logged loss and gradient norm of step N read back from the device at the end of step N + 1.

    With a loss logged at every step (the spec's `logging_steps`: 1 by default, as the seed logs), the Trainer reads
    the loss and the gradient norm with `.item()` as each step ends: the host waits for the GPU to finish the step,
    and the GPU then waits while the host logs, draws the next batch and starts launching its forward. Here the
    step's values are copied aside on the device (the accumulated loss is zeroed in place right after) and read one
    step later, when the GPU is past them; the log entry is made then, with the step, epoch and method metrics
    (trl's `_metrics`) of its own step, so the log history, the events and the train loss are the same. A step that
    saves, evaluates or ends training is logged at once, so a checkpoint's log history is whole. Installed over
    the Trainer's `_maybe_log_save_evaluate`, which it then calls as it is."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.own = trainer._maybe_log_save_evaluate
        self.pending: dict | None = None
        self.host: dict = {}  # page-locked copies of the held values, one per name, reused at every step
        trainer._maybe_log_save_evaluate = self

    def __call__(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                 learning_rate=None):
        import torch

        trainer, control, state = self.trainer, self.trainer.control, self.trainer.state
        logging = control.should_log
        self.flush(start_time)
        control = trainer.control
        control.should_log = logging  # the flushed entry's on_log cleared it
        if (control.should_log and state.global_step > trainer._globalstep_last_logged
                and not (control.should_save or control.should_evaluate or control.should_training_stop)
                and isinstance(tr_loss, torch.Tensor)):
            metrics = getattr(trainer, "_metrics", None)
            taken = None
            if isinstance(metrics, dict) and "train" in metrics:  # trl's per-step method metrics, averaged at log
                held = metrics["train"]
                taken, metrics["train"] = held, (collections.defaultdict(held.default_factory)
                                                 if isinstance(held, collections.defaultdict) else type(held)())
            self.pending = {"loss": self.held("loss", tr_loss), "grad_norm": self.held("grad_norm", grad_norm),
                            "steps": state.global_step - trainer._globalstep_last_logged,
                            "step": state.global_step, "epoch": state.epoch, "learning_rate": learning_rate,
                            "metrics": taken}
            tr_loss -= tr_loss
            trainer._globalstep_last_logged = state.global_step
            trainer.store_flos()
            control.should_log = False
        return self.own(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                        learning_rate=learning_rate)

    def held(self, name: str, value):
        """`value` kept for the next step's flush: a CUDA tensor copied into page-locked host memory without waiting
        (reading it back with `.item()` would wait for every kernel queued after it, the next step's whole work,
        not just for the copy), with an event recorded after the copy; anything else copied as it is."""
        import torch
        from transformers.training_args import ParallelMode

        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach()
        if not value.is_cuda or self.trainer.args.parallel_mode == ParallelMode.DISTRIBUTED:
            return value.clone()  # several ranks: gathered on the device at flush, as the Trainer does
        host = self.host.get(name)
        if host is None or host.shape != value.shape or host.dtype != value.dtype:
            host = self.host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    @staticmethod
    def read(held):
        """A held value as a tensor the host can read: after its copy's event, on the host."""
        if isinstance(held, tuple):
            host, copied = held
            copied.synchronize()  # that step's kernels are done by now: no wait for the ones queued since
            return host
        return held

    def flush(self, start_time: float | None = None) -> None:
        """Logs the step held back, if any."""
        from transformers.trainer_pt_utils import nested_gather

        pending, self.pending = self.pending, None
        if pending is None:
            return
        trainer, state = self.trainer, self.trainer.state
        held_loss = self.read(pending["loss"])
        if not isinstance(pending["loss"], tuple):  # kept as a tensor: gathered from the ranks, as the Trainer does
            held_loss = nested_gather(held_loss, trainer.args.parallel_mode)
        loss = held_loss.mean().item()
        logs = {"loss": loss / pending["steps"]}
        norm = self.read(pending["grad_norm"])
        if norm is not None:
            logs["grad_norm"] = norm.item() if hasattr(norm, "item") else norm
        logs["learning_rate"] = pending["learning_rate"] if pending["learning_rate"] is not None \
            else trainer._get_learning_rate()
        trainer._total_loss_scalar += loss
        now = state.global_step, state.epoch
        metrics = getattr(trainer, "_metrics", None)
        later = None
        if pending["metrics"] is not None:
            later, metrics["train"] = metrics["train"], pending["metrics"]
        state.global_step, state.epoch = pending["step"], pending["epoch"]
        try:
            trainer.log(logs, start_time)
        finally:
            state.global_step, state.epoch = now
            if pending["metrics"] is not None:
                metrics["train"] = later


# ------------------------------------------------------------------------------ the collector


class CollectorPauses:
    """Python's cycle collector held off the objects that exist when training starts, and its pauses timed.

    By then the process holds millions of objects (torch, transformers, trl, unsloth's generated code, the
    model's modules); a full collection walks them all and held a step up for most of a second (t1 on the H200:
    0.77 s at step 361). `gc.freeze()` moves them out of the collector's view for the session (what
    CPython offers for this: the objects made during training are still collected), and `gc.unfreeze()` gives
    them back afterwards, so the trainer and model are collected once the job lets go of them."""

    def __init__(self):
        self.collections = 0
        self.seconds = 0.0
        self._started = 0.0

    def _timed(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections += 1
            self.seconds += time.perf_counter() - self._started

    @contextlib.contextmanager
    def frozen(self):
        gc.freeze()
        gc.callbacks.append(self._timed)
        try:
            yield self
        finally:
            gc.callbacks.remove(self._timed)
            gc.unfreeze()

    def figures(self) -> dict:
        return {"full_collections": self.collections, "seconds": round(self.seconds, 3)}


# ------------------------------------------------------------------------------ callbacks


def _callbacks():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """`train_progress` events (step, max_steps, loss, tokens_per_s, eta_s) and the step clock."""

        def __init__(self):
            self.t0 = None
            self.tokens = 0.0  # this rank's, counted as batches are drawn
            self.all_tokens = 0.0  # every rank's, as of the last step end
            self.first_step = 0
            self.clock: list[tuple[float, float]] = []  # (time, all tokens) at each step end

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.first_step = time.perf_counter(), state.global_step
            self.bar = training_bar(state.max_steps, state.global_step) if distributed.world().is_main else None

        def on_train_end(self, args, state, control, **kwargs):
            if getattr(self, "bar", None) is not None:
                self.bar.close()
                self.bar = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            # the logged step's own clock entry: its log can come a step late (LossReadAStepLate)
            done = max(state.global_step - self.first_step, 1)
            at, tokens = self.clock[done - 1] if done <= len(self.clock) else (time.perf_counter(), self.all_tokens)
            elapsed = max(at - (self.t0 or at), 1e-9)
            log.info("train_progress", step=state.global_step, max_steps=state.max_steps,
                     loss=round(logs["loss"], 6), learning_rate=logs.get("learning_rate"),
                     tokens=int(tokens), tokens_per_s=round(tokens / elapsed, 1),
                     eta_s=round(self.recent_step_s(elapsed / done) * (state.max_steps - state.global_step), 1),
                     **reward_figures(logs))
            if getattr(self, "bar", None) is not None:
                self.bar.update(state.global_step, logs["loss"], logs.get("learning_rate"), tokens / elapsed)

        def recent_step_s(self, fallback: float) -> float:
            """Seconds per step over the last 20 steps: the first steps (compiling, warming up) would make the time
            left too long for the rest of the run."""
            recent = self.clock[-21:]
            return (recent[-1][0] - recent[0][0]) / (len(recent) - 1) if len(recent) > 2 else fallback

        def steady_tokens_per_s(self) -> float | None:
            """Tokens/s over this session's steps after the first STEADY_SKIP: what `peftopt bench` times."""
            if len(self.clock) <= STEADY_SKIP + 1:
                return None
            (t0, n0), (t1, n1) = self.clock[STEADY_SKIP], self.clock[-1]
            return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None

    class OptimizerSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                without_per_parameter_syncs(optimizer)

    class StopOnSignal(TrainerCallback):
        def __init__(self, progress, session: "TrainingSession"):
            self.progress, self.session = progress, session

        def on_train_begin(self, args, state, control, **kwargs):
            self.session.start_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            stop = interrupt.stop_requested()
            if distributed.active():
                stop, self.progress.all_tokens = distributed.vote(stop, self.progress.tokens)
            else:
                self.progress.all_tokens = self.progress.tokens
            self.progress.clock.append((time.perf_counter(), self.progress.all_tokens))
            if stop:
                if not interrupt.stop_requested():  # another rank was signalled (a node the service stops alone)
                    interrupt.request_stop(by="another rank")
                control.should_save = True
                control.should_training_stop = True

    return Progress, StopOnSignal, OptimizerSteps


def reward_figures(logs: dict) -> dict:
    """A rewarded method's figures of a logged step, from trl's GRPOTrainer logs: the mean reward (weighted over
    the reward functions) and its spread within groups, each function's mean, each check type's pass rate, the
    answers' mean length in tokens, and the KL to the base (when train.beta > 0). Empty for other methods."""
    if "reward" not in logs:
        return {}

    def rounded(value):
        return round(value, 5) if isinstance(value, (int, float)) else value

    figures = {"reward": rounded(logs["reward"]), "reward_std": rounded(logs.get("reward_std")),
               "rewards": {k.split("/")[1]: rounded(v) for k, v in logs.items()
                           if k.startswith("rewards/") and k.endswith("/mean")},
               "pass_rates": {k.split("/", 1)[1]: rounded(v) for k, v in logs.items() if k.startswith("checks/")},
               "completion_length": rounded(logs.get("completions/mean_length"))}
    if "kl" in logs:
        figures["kl"] = rounded(logs["kl"])
    return figures


TOKENS_KEY = "peftopt_tokens"


def count_tokens(trainer, progress) -> None:
    """Counts the tokens of every batch the trainer draws (real tokens: padding excluded; both sequences of a
    preference pair). Neither trl's `num_tokens` (reset on resume) nor unsloth (which does not log it) can be
    relied on for this. The collator counts on the CPU, where the batch is made (in a batch worker when there
    is one: counting it on the GPU would wait for the GPU), and the count travels in the batch, as a plain
    number, to the training loop, which takes it out before the model sees the batch."""
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        masks = [v for k, v in batch.items() if k.endswith("attention_mask") and hasattr(v, "sum")]
        if masks:
            batch[TOKENS_KEY] = int(sum(int(m.sum()) for m in masks))
        elif all(isinstance(f, Mapping) and "input_ids" in f for f in features):  # padding-free: the rows as drawn
            batch[TOKENS_KEY] = int(sum(len(f["input_ids"]) for f in features))
        else:
            batch[TOKENS_KEY] = int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids")))
        return batch

    class Counted:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return self

        def __next__(self):
            batch = next(self.batches)
            if isinstance(batch, MutableMapping):
                progress.tokens += batch.pop(TOKENS_KEY, 0)
            return batch

    draw = trainer.get_batch_samples

    def get_batch_samples(epoch_iterator, num_batches, device):
        return draw(Counted(epoch_iterator), num_batches, device)

    trainer.data_collator = counting
    trainer.get_batch_samples = get_batch_samples


def separate_embedding_learning_rate(trainer, learning_rate: float) -> None:
    """Gives the fully trained modules (peft's `modules_to_save` copies of embed_tokens / lm_head) their own
    learning rate, as unsloth's UnslothTrainer does for continued pretraining: the Trainer's optimizer is built as
    usual (its class, 8-bit state, weight-decay groups), then those parameters move to groups of their own before
    any step, so the scheduler scales both rates alike and a resumed optimizer finds the same groups."""
    create = trainer.create_optimizer

    def create_optimizer(model=None):
        optimizer = create(model)
        if any(group.get("peftopt_embeddings") for group in optimizer.param_groups):
            return optimizer
        names = {id(p): n for n, p in (model or trainer.model).named_parameters()}
        moved = []
        for group in list(optimizer.param_groups):
            full = [p for p in group["params"] if ".modules_to_save." in names.get(id(p), "")]
            if full:
                group["params"] = [p for p in group["params"] if ".modules_to_save." not in names.get(id(p), "")]
                moved.append({"params": full, "weight_decay": group["weight_decay"], "lr": learning_rate,
                              "peftopt_embeddings": True})
        for group in moved:
            optimizer.add_param_group(group)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        log.info("embedding_learning_rate", learning_rate=learning_rate,
                 parameters=sorted(names[id(p)] for g in moved for p in g["params"]))
        return optimizer

    trainer.create_optimizer = create_optimizer


# ------------------------------------------------------------------------------ the trainer


@dataclass
class TrainingSession:
    """One training session's moving parts, shared by the trainer's callbacks and the code around it."""
    progress: Any  # the Progress callback: token counts and the step clock
    writer: AsyncCheckpointWriter | None = None  # checkpoints off the training thread
    uploader: Any = None  # checkpoint_sync.Uploader, when checkpoints go to the Hub
    start_step: int = 0  # the step this session started from
    restored_step: int | None = None  # a checkpoint restored from the Hub
    sync_figures: dict = field(default_factory=dict)
    sampling: Any = None  # rewards.Timing: seconds scoring sampled answers (a rewarded method)
    sampling_s: float = 0.0  # seconds sampling and scoring answers (a rewarded method)
    backend_figures: dict = field(default_factory=dict)  # what the backend did once trl wrapped the model
    batch_workers: BatchWorkers | None = None  # the processes collating batches ahead, ended with training


def build_trainer(spec: JobSpec, model, tokenizer, dataset, device: str, plan: Plan, output_dir: Path, *,
                  peft_config=None, fingerprint: str | None = None, backend=None,
                  extra_callbacks=(), run_dir: RunDir | None = None, settings=None):
    """The trl trainer of the spec's method as the job runs it, and its session. With a `fingerprint` (the train
    stage's), checkpoints are written and marked with it; without (bench), nothing is saved. `backend`: the
    training backend's module (unsloth recomputes activations inside its own layers; a backend's `wrapped`
    hook runs once trl has wrapped the model with LoRA)."""
    from job import methods

    method = methods.get(spec.train.method)
    _, trainer_class = method.classes()
    if plan.parallel == "fsdp":
        trainer_class = distributed.placing_real_weights_only(trainer_class)

    Progress, StopOnSignal, OptimizerSteps = _callbacks()
    session = TrainingSession(progress=Progress())
    callbacks = [StopOnSignal(session.progress, session), session.progress, OptimizerSteps(), *extra_callbacks]
    saving = fingerprint is not None
    on_written = None
    if saving and spec.train.checkpoint_sync and distributed.world().is_main:
        from job import checkpoint_sync

        uploader = session.uploader = checkpoint_sync.Uploader(spec, fingerprint)

        def on_written(path: Path) -> None:
            uploader.submit(path, complete_steps(path.parent))
    tracked = run_dir is not None and tracking.trackers(spec)
    if tracked:
        callbacks.append(tracking.spec_callback(spec, run_dir))
    workers = (settings or settings_module.get()).batch_workers_on(device)
    sampling = {}
    if method.rewarded and device == "cuda" and (settings or settings_module.get()).sampler == "continuous":
        sampling["use_transformers_continuous_batching"] = True
    config = trainer_config(spec, output_dir, device, plan, modelsrc.dtype_for(spec, device), saving=saving,
                            trainer_checkpointing=backend is None or backend.NAME != "unsloth", batch_workers=workers,
                            tracking=tracking.trainer_settings(spec, run_dir, settings) if tracked else None,
                            **sampling)
    inputs = {}
    if method.rewarded:
        inputs["reward_funcs"] = reward_functions(spec, dataset, session, settings or settings_module.get())
    trainer = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, callbacks=callbacks, **inputs)
    if plan.parallel == "fsdp":
        distributed.shard(trainer)
    flops_counted_once(trainer)
    if spec.train.embedding_learning_rate is not None:
        separate_embedding_learning_rate(trainer, spec.train.embedding_learning_rate)
    if saving:
        session.writer = AsyncCheckpointWriter(trainer, fingerprint, on_written)
    if method.rewarded:
        time_sampling(trainer, session)
    else:
        count_tokens(trainer, session.progress)
        LossReadAStepLate(trainer)
    if workers:
        session.batch_workers = BatchWorkers(trainer)
    if hasattr(backend, "wrapped"):
        session.backend_figures = backend.wrapped(trainer, device, plan, settings or settings_module.get())
    return trainer, session


def reward_functions(spec: JobSpec, dataset, session: "TrainingSession", settings) -> list:
    """The reward functions of a method trained on tasks (job/evaluation/rewards.py). A check that runs the answer's
    code needs the sandbox: where it cannot isolate code, the job stops here, before the first step."""
    from job import methods
    from job.evaluation import rewards, sandbox

    declared = methods.get(spec.train.method).value(spec.train, "rewards")
    code = any(d["type"] in rewards.CODE_TYPES for d in declared) or any(
        check.get("type") in rewards.CODE_TYPES for text in dataset["checks"] for check in json.loads(text or "[]"))
    if code:
        isolated, why = sandbox.available(settings.tool_env())
        if not isolated:
            raise ExternalError(f"the rewards run the answers' code (a python check), which cannot be isolated here "
                                f"({why}); run where seccomp filters can be installed")
    session.sampling = rewards.Timing()
    return rewards.functions(declared, session.sampling)


# The attention implementations transformers' continuous batching has a paged variant of.
PAGED_VARIANTS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


@contextlib.contextmanager
def paged_attention_for_sampling(model):
    """transformers' continuous batching runs the paged variant of the model's attention, which exists for its own
    implementations only: a model that trains with another (the hf backend's packed `peftopt_varlen`) samples with
    paged sdpa and trains with its own again."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if before.startswith("paged|") or before in PAGED_VARIANTS:
        yield
        return
    base.set_attn_implementation("paged|sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def time_sampling(trainer, session: "TrainingSession") -> None:
    """Counts what a rewarded method's step spends sampling answers (and scoring them) and the tokens it puts
    through the model (prompts and answers, padding excluded): trl's GRPOTrainer samples a generation batch in
    `_generate_and_score_completions` and trains on it over the step's micro-batches."""
    sample = trainer._generate_and_score_completions
    progress = session.progress

    def generate_and_score(inputs):
        started = time.perf_counter()
        output = sample(inputs)
        session.sampling_s += time.perf_counter() - started
        progress.tokens += int(output["prompt_mask"].sum()) + int(output["completion_mask"].sum())
        return output

    trainer._generate_and_score_completions = generate_and_score
    if getattr(trainer, "use_transformers_continuous_batching", False):  # PEFTOPT_SAMPLER=continuous
        sample_paged = trainer._generate

        def generate_paged(prompts):
            with paged_attention_for_sampling(trainer.accelerator.unwrap_model(trainer.model)):
                return sample_paged(prompts)

        trainer._generate = generate_paged
    if distributed.is_sharded(trainer.model):
        sample_whole = trainer._generate

        def generate_unsharded(prompts):
            """FSDP2 gathers a module's parameters when that module is called; sampling calls the model inside the
            root (peft's wrapper), so the root's own parameters (embeddings, head, final norm) are gathered for it
            here, each decoder layer's by its own call as in training."""
            trainer.model._get_fsdp_state()._lazy_init()  # as the root's first forward would (torch 2.13)
            trainer.model.unshard()
            try:
                return sample_whole(prompts)
            finally:
                trainer.model.reshard()

        trainer._generate = generate_unsharded


class BatchWorkers:
    """The processes that collate training batches ahead of the step (settings.batch_workers_on), as the trainer's
    DataLoader starts them, and ended by `end()` once training is over.

    Each worker starts a process group of its own, so that a signal sent to the job's whole group (`kill --
    -PGID`, a terminal's Ctrl-C, tini -g) reaches the training process alone, which stops at a safe point and then
    ends its workers. The DataLoader's own ends (its shutdown, SIGTERM to a stuck worker, multiprocessing's at exit)
    keep the default handlers; a worker whose parent is gone notices it (torch's watchdog) and ends.

    `end()` runs torch's own shutdown of the loader's persistent iterator while everything it uses is alive. Left
    to the garbage collector, the iterator (held in a cycle by the Trainer, accelerate and the loader) is freed by a
    full collection, which runs the finalizer of the queue that tells the worker to leave (closing it) before the
    iterator's `__del__` puts the word in it: the worker never hears, and the join waits out torch's 5 s timeout
    before killing it, on whichever thread the collection happened to run (after t1, the next stage's model
    load: docs/performance.md)."""

    def __init__(self, trainer):
        self.loaders: list = []
        make = trainer.get_train_dataloader

        def get_train_dataloader():
            loader = make()
            loader.worker_init_fn = functools.partial(_own_process_group, loader.worker_init_fn)
            self.loaders.append(loader)
            return loader

        trainer.get_train_dataloader = get_train_dataloader

    def end(self) -> None:
        """Each loader's workers told to leave and joined (torch's `_shutdown_workers`, what its `__del__` calls;
        a worker already gone, ended by a stop, is joined at once)."""
        for loader in self.loaders:
            iterator, loader._iterator = getattr(loader, "_iterator", None), None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self.loaders.clear()


def _own_process_group(init, worker_id: int) -> None:
    os.setpgid(0, 0)
    if init is not None:
        init(worker_id)


def with_steps_of_epochs(spec: JobSpec, sequences: int) -> JobSpec:
    """The spec with train.max_steps for its train.epochs over `sequences` training sequences (the trainer's
    dataset, packed where packing is on): every rank counts the same, as the spec's sequences a step are shared."""
    import math

    per_step = spec.train.per_device_batch_size * spec.train.gradient_accumulation_steps
    steps = max(1, math.ceil(spec.train.epochs * sequences / per_step))
    return spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": steps})})


def train(backend, spec: JobSpec, run_dir: RunDir, device: str, *, fingerprint: str, settings,
          restart: bool = False) -> dict:
    """The train stage's work for either backend (see job/backends/__init__.py)."""
    import torch
    from transformers import AutoConfig

    loss_head_fallback = install_cpu_loss_head()
    share_inputs(spec, run_dir)
    location = modelsrc.model_location(spec, run_dir)
    chosen = backend.plan(spec, AutoConfig.from_pretrained(location), device, settings)
    log.info("batch_plan", backend=backend.NAME, **chosen.__dict__)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, peft_config, info = backend.setup(spec, location, device, chosen, settings)
    tokenizer, _ = modelsrc.load_tokenizer(location, spec)  # the spec's template, not the backend's
    loaded_reserved = torch.cuda.memory_reserved() if device == "cuda" else 0
    trainer, session = build_trainer(spec, model, tokenizer, load_train_dataset(run_dir), device, chosen,
                                     run_dir.checkpoints_dir, peft_config=peft_config, fingerprint=fingerprint,
                                     backend=backend, run_dir=run_dir, settings=settings)
    info.update(session.backend_figures)
    if spec.train.epochs is not None:
        spec = with_steps_of_epochs(spec, len(trainer.train_dataset))
        trainer.args.max_steps = spec.train.max_steps
    log.info("train_started", backend=backend.NAME, device=device, ranks=distributed.world().size,
             max_steps=spec.train.max_steps, epochs=spec.train.epochs,
             micro_batch=chosen.micro_batch, accumulation=chosen.accumulation,
             gradient_checkpointing=chosen.gradient_checkpointing, loss_head_fallback=loss_head_fallback,
             batch_workers=trainer.args.dataloader_num_workers,
             trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad), **info)
    figures = run_trainer(trainer, spec, run_dir, tokenizer, session, fingerprint, restart)
    figures.update(backend=backend.NAME, device=device, micro_batch=chosen.micro_batch,
                   accumulation=chosen.accumulation, gradient_checkpointing=chosen.gradient_checkpointing,
                   batch_workers=trainer.args.dataloader_num_workers, plan_estimated_gb=chosen.estimated_gb or None,
                   plan_budget_gb=chosen.budget_gb or None, **info)
    if device == "cuda":
        peak = torch.cuda.max_memory_reserved()
        figures.update(peak_gpu_gb=round(peak / 1024**3, 3), lora_gpu_gb=round((peak - loaded_reserved) / 1024**3, 3))
    return figures


def run_trainer(trainer, spec: JobSpec, run_dir: RunDir, tokenizer, session: TrainingSession, fingerprint: str,
                restart: bool = False) -> dict:
    """Trains from the newest complete checkpoint, saves the adapter, and returns the run's figures.

    Raises:
        Interrupted: a signal stopped training; a checkpoint of the last finished step was saved.
        ExternalError: a checkpoint could not be written (the disk).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # The Trainer would print raw dicts (and its bar) beside our events and our terminal bar.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    expected = Expected(max_steps=spec.train.max_steps, adapter_shapes=adapter_shapes(trainer.model))
    resume = find_resume_point(spec, run_dir, fingerprint, restart, session, expected)
    if distributed.active() and trainer.args.device.type == "cpu" and trainer.args.device.index is not None:
        # accelerate names CPU ranks "cpu:N", which torch.load rejects as a map_location when the Trainer
        # reloads the optimizer on resume (transformers 5.17); the same device under its plain name.
        import torch

        trainer.args.__dict__["_setup_devices"] = torch.device("cpu")
    started = time.perf_counter()
    checkpointing = None
    collector = CollectorPauses()
    try:
        if resume is not None and checkpoint_step(resume) >= spec.train.max_steps:
            train_loss = finished_checkpoint(trainer, resume)
            session.start_step = trainer.state.global_step
        else:
            try:
                with collector.frozen():
                    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            except (OSError, PeftoptError):
                raise
            except Exception as exc:  # the Trainer failed to take the checkpoint in: never a crash on every retry
                if resume is None or trainer.state.global_step > checkpoint_step(resume) \
                        or (isinstance(exc, RuntimeError) and distributed.peer_lost(exc) is not None) \
                        or (interrupt.stop_requested() and batch_worker_ended_by_the_stop(exc)):
                    raise
                set_aside(resume, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                raise CheckpointRefused(f"{resume.name} could not be resumed ({type(exc).__name__}); it was removed: "
                                        "rerun the same command to resume from the checkpoint before it") from exc
            train_loss = result.metrics.get("train_loss")
    except Interrupted:
        raise
    except Exception as exc:
        if interrupt.stop_requested() and batch_worker_ended_by_the_stop(exc):
            raise stopped_session(spec, trainer, session, time.perf_counter() - started,
                                      "it ended the batch worker too; complete checkpoints are kept") from exc
        if isinstance(exc, OSError):
            raise ExternalError(f"training could not write to {run_dir.checkpoints_dir}: {exc.strerror or exc}") \
                from exc
        lost = distributed.peer_lost(exc) if isinstance(exc, RuntimeError) else None
        if lost is None:
            raise
        raise RankLost(f"another rank of this {distributed.world().size}-rank run was lost at step "
                       f"{trainer.state.global_step} ({lost}); complete checkpoints are kept: rerun the same "
                       "command to resume") from exc
    finally:
        if session.batch_workers is not None:
            session.batch_workers.end()
        if session.writer is not None:
            checkpointing = session.writer.finish()  # the last checkpoint is complete (or its failure raised)
        if session.uploader is not None:
            session.sync_figures = session.uploader.finish()
    runtime = time.perf_counter() - started
    step = trainer.state.global_step
    if interrupt.stop_requested() and step < spec.train.max_steps:
        raise stopped_session(spec, trainer, session, runtime, "checkpoint saved")
    gathered = None
    if distributed.active() and distributed.is_sharded(trainer.model):  # a collective: every rank gives its shard
        gathered = distributed.full_state(trainer.model)[0]
    if distributed.world().is_main:
        with atomic_dir(run_dir.adapter_dir) as out:
            trainer.model.save_pretrained(str(out), state_dict=gathered)
            tokenizer.save_pretrained(str(out))
            modelsrc.drop_custom_code(out)  # a base tokenizer's code reference is not pushed along
    history = [h for h in trainer.state.log_history if "loss" in h]
    progress = session.progress
    figures = {
        "global_step": step, "resumed_from_step": session.start_step or None,
        "session_runtime_s": round(runtime, 3), "train_loss_mean": train_loss,
        "final_loss": history[-1]["loss"] if history else None,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history],
        "session_tokens": int(progress.all_tokens),
        "tokens_per_s": round(progress.all_tokens / runtime, 1) if runtime > 0 else None,
        "steady_tokens_per_s": progress.steady_tokens_per_s(),
        "world_size": distributed.world().size,
        "collector": collector.figures(),
    }
    rewarded = [h for h in trainer.state.log_history if "reward" in h]
    if rewarded:
        figures["reward_curve"] = [{"step": h["step"], **reward_figures(h)} for h in rewarded]
        scoring = session.sampling.seconds if session.sampling is not None else 0.0
        figures["time_split"] = {"sampling_s": round(session.sampling_s - scoring, 3), "scoring_s": round(scoring, 3),
                                 "training_s": round(runtime - session.sampling_s, 3)}
    if checkpointing is not None:
        figures["checkpointing"] = {**checkpointing, "share_of_training": round(checkpointing["blocking_s"] / runtime, 4)
                                    if runtime > 0 else None}
    if session.uploader is not None:
        figures["checkpoint_sync"] = {**session.sync_figures, "restored_step": session.restored_step}
    return figures


def batch_worker_ended_by_the_stop(exc: BaseException) -> bool:
    """A batch worker ended by the signal that asked the job to stop (one sent to each process by name, `pkill -f`;
    a signal to the process group does not reach it: BatchWorkers). torch reports it
    in the training loop as the worker's death, or as the connection it was handing a batch over lost. A stop like
    any other (exit 75), not a crash, nor a disk error."""
    if isinstance(exc, (ConnectionError, EOFError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DataLoader worker" in text and (
        "Terminated" in text or "Interrupt" in text or "exited unexpectedly" in text)


def stopped_session(spec, trainer, session, runtime: float, kept: str) -> Interrupted:
    """A stop request ended this session at the trainer's step; what it did counts in the run's figures when the
    run is resumed (job/stages/train.py)."""
    step = trainer.state.global_step
    stopped = Interrupted(f"stopped at step {step}/{spec.train.max_steps} by a signal; {kept}, rerun the same command "
                          "to resume")
    stopped.session = {"runtime_s": round(runtime, 3), "tokens": int(session.progress.all_tokens),
                       "from_step": session.start_step or 0, "to_step": step, "interrupted": True}
    return stopped


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


def share_inputs(spec: JobSpec, run_dir: RunDir) -> None:
    """Every rank, before training: what rank 0 prepared (data/, a GGUF or package base's copy) and an earlier run's
    merged model that a `run:NAME` base names, on each rank's node (job/distributed.py `share_files`; nothing is
    sent to ranks that share rank 0's volume)."""
    if not distributed.active():
        return
    main = distributed.world().is_main
    distributed.share_files(run_dir.root, ["data", "base"] if main else None)
    if modelsrc.source_kind(spec.model.base) == "run":
        earlier = modelsrc.earlier_run(spec)
        distributed.share_files(earlier.parent, [f"{earlier.name}/merged"] if main else None)


def find_resume_point(spec: JobSpec, run_dir: RunDir, fingerprint: str, restart: bool = False,
                      session: TrainingSession | None = None, expected: Expected | None = None) -> Path | None:
    """The checkpoint to resume from: the newest of this training that holds what `expected` says and loads as the
    Trainer loads it. Rank 0 decides (it may remove a torn or refused checkpoint, or restore one from the Hub when
    the local directory is empty) and tells the other ranks."""
    me = distributed.world()
    resume = None
    if me.is_main:
        resume = newest_complete_checkpoint(run_dir.checkpoints_dir, fingerprint, expected)
        if resume is None and spec.train.checkpoint_sync:
            from job import checkpoint_sync

            resume = checkpoint_sync.restore(spec, run_dir, fingerprint, restart, expected)
            if resume is not None and session is not None:
                session.restored_step = checkpoint_step(resume)
        if resume is not None:
            log.info("train_resumed", checkpoint=str(resume), step=checkpoint_step(resume))
    if me.size > 1:  # by its place in the run directory: each node may keep its own, at another path
        where = distributed.send({"resume": resume.relative_to(run_dir.root).as_posix() if resume else None})["resume"]
        if where:
            distributed.share_files(run_dir.root, [where])  # rank 0's checkpoint, on nodes that lack it
        return run_dir.root / where if where else None
    return resume
