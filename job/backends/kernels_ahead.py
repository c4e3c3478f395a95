"""The training step's Triton kernels compiled ahead, in a child process, while the job imports its backend, prepares
the data and loads the model. The first training step otherwise compiles them: on unsloth RMSNorm, RoPE, SwiGLU and
the fused linear cross-entropy (ten kernels, about 6 s of t1's first step on the H200, docs/performance.md); on hf
Liger's RMSNorm, RoPE and SwiGLU and trl's chunked log-prob head (t1's first step on hf: 4.7 s). The child imports
the backend, builds the same model with the backend's own `setup` cut to a layer of each kind (the kernels are
compiled per shape, and every decoder layer of a kind has the same shapes), and runs made-up packed steps of the
spec's shape (on hf through the job's own trainer, whose loss is trl's);
Triton writes what it compiles into a cache directory made for this job alone (`TRITON_CACHE_DIR`, 0700, removed
when the job ends), where the training process finds it. Nothing in that directory comes from anywhere but the
job's own two processes: never the image, never a shared volume.

The child needs room on the GPU for a second copy of the model and its step (it checks, and leaves when there is
none); it lives in a session of its own, dies with the job's process, and is ended when the job ends. Whatever it
does not finish, the training process compiles itself, as it would have.

    python -m job.backends.kernels_ahead      # the child: a request on stdin, one JSON line on stdout
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from job.log import get_logger

log = get_logger("peftopt.train")

# Made-up steps: (share of the micro-batch's tokens, the count of labels kept mod 16, or None: every label kept).
# Packed rows of conversations cut where a packed row has them restart. Triton specializes a kernel on each integer
# argument's divisibility by 16, and unsloth's fused loss takes the count of kept labels (and 8 times it) as such:
# the three classes of counts, 0, 10 and 3 mod 16, each in a row padded to a multiple of 16 tokens with the labels
# of each conversation's first tokens masked, as the job's response-only batches are (t1's fourth step otherwise
# compiled the class its first three had not met: 0.8-1.0 s); then a row of any length with every label kept
# (methods that neither mask nor pad).
STEPS = ((1.0, 0), (1.0, 10), (1.0, 3), (0.97, None))
ROOM = 2.0  # the child starts only when the GPU has this many times the planner's estimate free (plus 4 GiB)


def backend_of(spec) -> str | None:
    """The backend whose kernels the child compiles: unsloth's when unsloth will train (auto picks it on a GPU for
    its methods), hf's for supervised fine-tuning on hf; None for anything else (the preference methods' steps
    need pairs the child does not make up)."""
    from job import methods

    if spec.train.backend != "hf" and "unsloth" in methods.get(spec.train.method).backends \
            and not (spec.lora is not None and spec.lora.use_dora):
        return "unsloth"
    return "hf" if spec.train.method == "sft" else None


def wanted(spec, settings, device: str) -> bool:
    """Compile ahead for this job: PEFTOPT_KERNELS_AHEAD 1, or auto, on one CUDA GPU, when `backend_of` names a
    backend and the base is one the child can load before prepare (a model directory, an earlier run's model, a
    Hub model)."""
    from job import distributed, modelsrc

    setting = settings.kernels_ahead
    if setting == "0" or spec.train is None or distributed.active(settings):
        return False
    loadable = modelsrc.source_kind(spec.model.base) in ("dir", "run", "hub")  # a GGUF or package base: prepare
    return backend_of(spec) is not None and loadable and device == "cuda"


@contextlib.contextmanager
def started(spec, run_dir, settings) -> Iterator[subprocess.Popen]:
    """Starts the child; on leaving, ends it if it still runs, logs what it did, and removes the cache it made."""
    made = None
    if not settings.triton_cache_dir:  # one the operator set is theirs to trust, and kept
        made = tempfile.mkdtemp(prefix="peftopt-triton-")  # 0700
        os.environ["TRITON_CACHE_DIR"] = made  # a write for Triton, here and in the child
    request = {"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir.root), "parent": os.getpid(),
               "backend": backend_of(spec)}
    child = subprocess.Popen([sys.executable, "-m", "job.backends.kernels_ahead"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=settings.child_env(),
                             start_new_session=True)
    child.stdin.write(json.dumps(request).encode())
    child.stdin.close()
    log.info("kernels_ahead_started", pid=child.pid)
    try:
        yield child
    finally:
        ended = child.poll() is not None
        if not ended:
            child.kill()
        child.wait()
        line = child.stdout.readline() if ended else b""
        child.stdout.close()
        log.info("kernels_compiled_ahead", **(_outcome(line) if ended else {"error": "still running: ended"}))
        if made is not None:  # a write for Triton: later compiles in this process go where they went before
            os.environ.pop("TRITON_CACHE_DIR", None)
            shutil.rmtree(made, ignore_errors=True)


def _outcome(line: bytes) -> dict:
    """The figures of the child's answer line (a child that died without one: an error saying so)."""
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return {"error": "ended without an answer"}
    return {k: answer[k] for k in ("seconds", "steps", "skipped", "error", "timeline") if k in answer}


def few_layers(config):
    """A copy of the model's config with one decoder layer of each kind it has (`layer_types`: sliding and full
    attention), in their first order; the config itself when it does not say its layers in a way this knows."""
    import copy

    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 2 or getattr(config, "text_config", None) not in (None, config):
        return config
    kinds = getattr(config, "layer_types", None)
    keep = list(dict.fromkeys(kinds)) if isinstance(kinds, (list, tuple)) and len(kinds) == count else None
    small = copy.deepcopy(config)
    small.num_hidden_layers = len(keep) if keep else 1
    if keep:
        small.layer_types = keep
    return small


def _packed(tokens: int, row: int, vocab: int, kept_mod_16: int | None = None, device: str = "cuda"):
    """input_ids, position_ids and labels of one packed micro-batch: conversations of up to `row` tokens; with
    `kept_mod_16`, the labels at each conversation's start masked, and then its first tokens (a prompt's), until
    about three fifths are kept, their count `kept_mod_16` mod 16."""
    import torch

    ids = torch.randint(3, vocab, (1, tokens), device=device)
    piece = max(row // 3, 1)
    lengths = [piece] * (tokens // piece) + ([tokens % piece] if tokens % piece else [])
    positions = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    if kept_mod_16 is not None:
        labels[positions == 0] = -100
        open_ = (labels.view(-1) != -100).nonzero().flatten()
        kept = min(len(open_) * 3 // 5 // 16 * 16 + kept_mod_16, len(open_))
        labels.view(-1)[open_[: len(open_) - kept]] = -100
    return ids, positions, labels


def main() -> int:
    request = json.loads(sys.stdin.read())
    from job import interrupt

    interrupt.die_with_parent(int(request["parent"]))
    started = time.perf_counter()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # unsloth prints its banners: the answer alone goes to the pipe
    timeline: dict[str, float] = {}  # seconds from the child's start to the end of each part of its work

    def mark(part: str) -> None:
        timeline[part] = round(time.perf_counter() - started, 3)

    def answer(**fields) -> int:
        out.write(json.dumps({"seconds": round(time.perf_counter() - started, 3), **fields,
                              **({"timeline": timeline} if timeline else {})}) + "\n")
        out.flush()
        return 0

    try:
        from job import settings as settings_module

        settings = settings_module.init()
        if request.get("backend", "unsloth") == "unsloth":
            from job.backends import unsloth

            unsloth.import_library()
        import torch
        from transformers import AutoConfig

        from job import modelsrc
        from job.rundir import RunDir
        from job.spec import JobSpec

        mark("imported")

        spec = JobSpec.model_validate(request["spec"])
        location = modelsrc.model_location(spec, RunDir(Path(request["run_dir"])))
        config = AutoConfig.from_pretrained(location)
        backend = _backend(request.get("backend", "unsloth"))
        plan = backend.plan(spec, config, "cuda", settings)
        free, _ = torch.cuda.mem_get_info()
        if plan.estimated_gb and free < (ROOM * plan.estimated_gb + 4) * 1024**3:
            return answer(skipped=f"{free / 1024**3:.1f} GiB free on the GPU, not room for a second model")
        if backend.NAME == "unsloth":
            steps = _unsloth_steps(spec, location, config, plan, settings, mark)
        else:
            steps = trainer_steps(spec, location, config, plan, settings, "cuda", mark)
        torch.cuda.synchronize()
        return answer(steps=steps)
    except BaseException as exc:  # the training process compiles what this did not
        return answer(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def _backend(name: str):
    import importlib

    return importlib.import_module(f"job.backends.{name}")


def _unsloth_steps(spec, location: str, config, plan, settings, mark=lambda part: None) -> int:
    """The made-up steps (STEPS) straight through unsloth's model: its loss is in the model's forward. `mark(part)`
    notes when each part ends (the model built, each step: `kernels_compiled_ahead`'s timeline)."""
    import torch

    from job.backends import attention, unsloth

    model, _, _ = unsloth.setup(spec, location, "cuda", plan, settings, config=few_layers(config))
    model.train()
    mark("model")
    row = spec.model.max_seq_length
    vocab = int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size"))
    steps = 0
    for fill, kept_mod_16 in STEPS:
        tokens = max(int(plan.micro_batch * row * fill) // 16 * 16 - (1 if fill < 1 else 0), 17)
        ids, positions, labels = _packed(tokens, row, vocab, kept_mod_16)
        lengths = attention.segment_lengths(positions.cpu())  # as the training loop gives them (lengths_from_host)
        extra = {"packed_seq_lengths": unsloth.host_lengths(lengths)} if lengths else {}
        loss = model(input_ids=ids, position_ids=positions, labels=labels, **extra).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        steps += 1
        torch.cuda.synchronize()  # a step's kernels are compiled and have run: its end on the timeline
        mark(f"step{steps}")
    return steps


TRAINER_STEPS = 3  # the trainer's packed micro-batches vary in length; their token count is padded to a multiple of 16


def trainer_steps(spec, location: str, config, plan, settings, device: str, mark=lambda part: None) -> int:
    """hf: made-up steps through the job's own trainer (`trainer.build_trainer`: trl's collator and loss head,
    Liger's kernels, the fused LoRA layers, the 8-bit optimizer) on the model cut to a layer of each kind, rows
    of random tokens of the spec's lengths, nothing saved and no batch worker."""
    import dataclasses
    import tempfile

    import datasets
    import torch

    from job import modelsrc
    from job.backends import hf
    from job.backends import trainer as shared

    settings = dataclasses.replace(settings, batch_workers="0")
    shared.install_cpu_loss_head()  # on a CPU (the tests): trl's head is Triton's alone
    model, peft_config, _ = hf.setup(spec, location, device, plan, settings, config=few_layers(config))
    mark("model")
    tokenizer, _ = modelsrc.load_tokenizer(location, spec)
    row = spec.model.max_seq_length
    vocab = min(int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size")), 32000)
    generator = torch.Generator().manual_seed(0)
    count = TRAINER_STEPS * plan.micro_batch * plan.accumulation * 2
    lengths = torch.randint(max(row // 8, 2), max(row * 3 // 4, 3), (count,), generator=generator).tolist()
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(100, vocab, (n,), generator=generator).tolist() for n in lengths]})
    short = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": TRAINER_STEPS, "epochs": None})})
    with tempfile.TemporaryDirectory(prefix="peftopt-kernels-") as scratch:
        trainer, _ = shared.build_trainer(short, model, tokenizer, dataset, device, plan, Path(scratch),
                                                peft_config=peft_config, backend=hf, settings=settings)
        trainer.train()
    mark(f"step{trainer.state.global_step}")
    return trainer.state.global_step


if __name__ == "__main__":
    os._exit(main())  # the interpreter's teardown (torch's, unsloth's finalizers) is time nobody waits for
