"""Training checkpoints that can be trusted, and that cost the training loop almost nothing.

A checkpoint is `checkpoints/checkpoint-N/` holding what the Trainer needs to resume (the adapter, optimizer,
scheduler, RNG states, trainer state) and, written last, `peftopt-checkpoint.json`: the marker listing every
file with its size, and the training fingerprint. A checkpoint is used only if its marker matches its files;
a half-written one is removed with a warning.

`AsyncCheckpointWriter` replaces the Trainer's synchronous save: the training thread only copies the trainable
weights and optimizer state into CPU memory, and a background thread writes them into a hidden
`.checkpoint-N.partial/`, writes the marker, renames it into place and rotates old ones. With several ranks
each writes its own RNG state into the partial directory first (the only per-rank state: data-parallel ranks
hold the same weights and optimizer state), and rank 0 alone writes the rest.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from job import distributed
from job.errors import ExternalError, disk_error
from job.log import get_logger
from job.rundir import atomic_write_json

log = get_logger("peftopt.train")
MARKER = "peftopt-checkpoint.json"
STEP_NAME = re.compile(r"^checkpoint-\d+$")


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def write_marker(path: Path, step: int, fingerprint: str | None) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != MARKER}
    atomic_write_json(path / MARKER, {"step": step, "files": files, "train_fingerprint": fingerprint})


def checkpoint_is_complete(path: Path) -> bool:
    """Its marker lists every file at its full size (regular files inside it, no links)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        listed = json.loads((path / MARKER).read_text())["files"]
        json.loads((path / "trainer_state.json").read_text())
        if not isinstance(listed, dict):
            return False
        for name, size in listed.items():
            member = path / name
            if ".." in Path(name).parts or Path(name).is_absolute() or member.is_symlink() or not member.is_file() \
                    or member.stat().st_size != size:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def marker_fingerprint(path: Path) -> str | None:
    try:
        value = json.loads((path / MARKER).read_text()).get("train_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a checkpoint of this training must hold: steps up to max_steps, the model's adapter tensors by name and
    shape (None: not known here)."""
    max_steps: int | None = None
    adapter_shapes: dict[str, tuple[int, ...]] | None = None


def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """The adapter tensors a checkpoint of `model` holds (as peft saves them), by name, with their shapes."""
    from peft import get_peft_model_state_dict

    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}


def load_problem(path: Path, expected: Expected | None = None) -> str | None:
    """Why the Trainer could not resume from this checkpoint (a corrupt or hostile file), or None; everything it
    will load is loaded here as it loads it, so that a checkpoint that passes does not crash it on every retry.
    Nothing in it runs as code: tensors load with weights_only (the RNG states with the numpy types the Trainer
    allows), the adapter as safetensors."""
    import torch
    from safetensors import safe_open
    from transformers import TrainerState
    from transformers.trainer_pt_utils import safe_globals

    expected = expected or Expected()
    step = checkpoint_step(path)
    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
            if expected.adapter_shapes is not None and shapes != expected.adapter_shapes:
                odd = sorted(set(shapes.items()) ^ set(expected.adapter_shapes.items()))[:1]
                return f"its adapter is not this model's (first difference: {odd[0][0]} {odd[0][1]})"
            for key in shapes:
                weights.get_tensor(key)
        for name in ("optimizer.pt", "scheduler.pt", "scaler.pt"):
            if (path / name).exists():
                torch.load(path / name, map_location="cpu", weights_only=True)
        with safe_globals():
            for rng in sorted(path.glob("rng_state*.pth")):
                torch.load(rng, map_location="cpu", weights_only=True)
        state = TrainerState.load_from_json(str(path / "trainer_state.json"))  # as the Trainer reads it
        if not isinstance(state.global_step, int) or state.global_step != step:
            return f"trainer_state.json's global_step ({str(state.global_step)[:20]}) is not its step {step}"
        if expected.max_steps is not None and step > expected.max_steps:
            return f"its step {step} is past train.max_steps ({expected.max_steps})"
        if not isinstance(state.log_history, list) or not all(isinstance(h, dict) for h in state.log_history):
            return "trainer_state.json's log_history is not a list of records"
    except Exception as exc:  # any parser's error: the file is not what the Trainer wrote
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return f"{type(exc).__name__}: {first.split(' In PyTorch 2.6')[0]}"  # never torch's weights_only=False advice
    return None


def complete_steps(checkpoints_dir: Path) -> list[int]:
    return sorted(checkpoint_step(p) for p in checkpoints_dir.glob("checkpoint-*") if checkpoint_is_complete(p))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path, why: str) -> None:
    """Removes a checkpoint the Trainer could not take in, saying why: the next attempt resumes from the one before."""
    log.warning("checkpoint_refused", path=str(path), why=why, action="removed; the next attempt resumes from an "
                "older one")
    _remove(path)


def newest_complete_checkpoint(checkpoints_dir: Path, fingerprint: str | None = None,
                               expected: Expected | None = None) -> Path | None:
    """The newest checkpoint whose files are all there, of this training (`fingerprint`), that loads;
    half-written, foreign and unloadable ones are removed with a warning."""
    if checkpoints_dir.is_symlink() or not checkpoints_dir.is_dir():
        return None
    for partial in checkpoints_dir.glob(".checkpoint-*.partial"):  # a writer killed mid-checkpoint
        _remove(partial)
    candidates = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if STEP_NAME.match(p.name)),
                        key=checkpoint_step, reverse=True)
    for path in candidates:
        if not checkpoint_is_complete(path):
            log.warning("checkpoint_incomplete", path=str(path), action="removed; resuming from an older one")
        elif fingerprint is not None and marker_fingerprint(path) != fingerprint:
            log.warning("checkpoint_refused", path=str(path), why="its marker names another training",
                        action="removed; resuming from an older one")
        elif (problem := load_problem(path, expected)) is not None:
            log.warning("checkpoint_refused", path=str(path), why=problem, action="removed; resuming from an older one")
        else:
            return path
        _remove(path)
    return None


def _to_cpu(value: Any) -> Any:
    """A CPU copy; from CUDA asynchronous into pinned memory (one synchronize for all, not one per tensor:
    an adapter and its 8-bit optimizer state are over a thousand small tensors)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True, non_blocking=value.is_cuda)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def write_checkpoint(snapshot: dict, fingerprint: str | None) -> Path:
    """Writes a snapshot (what `AsyncCheckpointWriter.save` took) as `checkpoint-N/`: into its partial directory,
    each file synced, the marker last, renamed into place, the oldest beyond the limit removed. Returns its path;
    on an error nothing of it is left and the error is raised."""
    import torch
    from safetensors.torch import save_file

    root: Path = snapshot["dir"]
    final = root / f"checkpoint-{snapshot['step']}"
    partial: Path = snapshot["partial"]
    try:
        save_file({k: v.contiguous() for k, v in snapshot["adapter"].items()},
                  str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
        for config in snapshot["adapter_config"].values():
            config.save_pretrained(str(partial))
        torch.save(snapshot["optimizer"], partial / "optimizer.pt")
        torch.save(snapshot["scheduler"], partial / "scheduler.pt")
        if snapshot["rng"] is not None:
            torch.save(snapshot["rng"], partial / "rng_state.pth")
        (partial / "trainer_state.json").write_text(snapshot["trainer_state"])
        write_marker(partial, snapshot["step"], fingerprint)
        for path in partial.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _rotate(root, snapshot["keep"])
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _rotate(root: Path, keep: int | None) -> None:
    if not keep:
        return
    steps = complete_steps(root)
    for step in steps[:-keep]:
        shutil.rmtree(root / f"checkpoint-{step}", ignore_errors=True)


class AsyncCheckpointWriter:
    """Installed in place of `trainer._save_checkpoint`; writes what the Trainer's own resume reads.

    `on_written(path)` runs on the writer thread once a checkpoint is complete (the Hub sync hooks in there).
    A failed write is raised on the training thread at the next save or at `finish()`.
    """

    def __init__(self, trainer, fingerprint: str | None, on_written: Callable[[Path], None] | None = None,
                 in_process: bool = False):
        self.trainer = trainer
        self.fingerprint = fingerprint
        self.on_written = on_written
        # in_process: the files are written by a process of their own (WriterProcess), not a thread of this one
        self.process = WriterProcess() if in_process and not distributed.active() else None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.blocking_s = 0.0  # time the training loop spent on checkpoints
        self.write_s = 0.0  # time the writer thread spent
        self.saves = 0
        trainer._save_checkpoint = self.save

    def save(self, model, trial=None) -> None:
        import numpy as np
        import torch
        from peft import get_peft_model_state_dict
        from transformers.trainer_callback import ExportableState

        started = time.perf_counter()
        self.wait()
        trainer = self.trainer
        trainer.store_flos()  # a collective with several ranks
        me = distributed.world()
        root = Path(trainer.args.output_dir)
        partial = root / f".checkpoint-{trainer.state.global_step}.partial"
        if me.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        if distributed.active():  # every rank's rng_state_<rank>.pth, as the Trainer's resume reads them, written by
            # rank 0: a rank on another node may not see rank 0's directory (nodes keep their own run directories)
            with tempfile.TemporaryDirectory(prefix="peftopt-rng-") as own:
                trainer._save_rng_state(own)
                mine = (Path(own) / f"rng_state_{trainer.args.process_index}.pth").read_bytes()
            every = distributed.gathered_bytes(mine)
            if me.is_main:
                for rank, data in enumerate(every):
                    (partial / f"rng_state_{rank}.pth").write_bytes(data)
        gathered = None
        if distributed.active() and distributed.is_sharded(trainer.model):  # train.parallel fsdp: a collective
            gathered = distributed.full_state(trainer.model, trainer.optimizer)
        if not me.is_main:
            self.saves += 1
            self.blocking_s += time.perf_counter() - started
            return
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        for callback in [*trainer.callback_handler.callbacks, trainer.control]:  # as Trainer._save_checkpoint does
            if isinstance(callback, ExportableState):
                name = type(callback).__name__
                if isinstance(trainer.state.stateful_callbacks.get(name), list):
                    trainer.state.stateful_callbacks[name].append(callback.state())
                else:
                    trainer.state.stateful_callbacks[name] = callback.state()
        rng = None
        if not distributed.active():
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
            if torch.cuda.is_available():  # one process: Trainer._load_rng_state reads one device's state
                rng["cuda"] = torch.cuda.random.get_rng_state()
        adapter = get_peft_model_state_dict(unwrapped, state_dict=gathered[0] if gathered else None)
        optimizer = gathered[1] if gathered else trainer.optimizer.state_dict()
        if self.process is not None:  # into the memory the writer process reads
            try:
                adapter, optimizer = self.process.buffer.take((adapter, optimizer))
            except OSError as exc:  # no memory to share (a file-size limit, no memfd): the thread writes from here on
                log.warning("checkpoint_writer_thread", error=f"{type(exc).__name__}: {exc}",
                            action="checkpoints are written by a thread of the training process")
                self.process.close()
                self.process = None
        if self.process is None:
            adapter, optimizer = _to_cpu(adapter), _to_cpu(optimizer)
        snapshot = {
            "step": trainer.state.global_step,
            "adapter": adapter,
            "adapter_config": unwrapped.peft_config,
            "optimizer": optimizer,
            "scheduler": trainer.lr_scheduler.state_dict(),
            "rng": rng,
            # TrainerState.save_to_json's own format, taken now: the state moves on with training
            "trainer_state": json.dumps(dataclasses.asdict(trainer.state), indent=2, sort_keys=True) + "\n",
            "dir": root,
            "partial": partial,
            "keep": trainer.args.save_total_limit,
        }
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are complete before training changes the weights
        if self.process is not None:
            self.process.send(snapshot, self.fingerprint)
            self.thread = threading.Thread(target=self._await, args=(snapshot["step"],), name="checkpoint-writer",
                                           daemon=True)
        else:
            self.thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer",
                                           daemon=True)
        self.thread.start()
        self.saves += 1
        self.blocking_s += time.perf_counter() - started

    def _write(self, snapshot: dict) -> None:
        started = time.perf_counter()
        try:
            final = write_checkpoint(snapshot, self.fingerprint)
        except BaseException as exc:  # raised on the training thread by the next save or finish()
            self.error = exc
            return
        self._written(snapshot["step"], final, time.perf_counter() - started)

    def _await(self, step: int) -> None:
        """The writer process's answer for the checkpoint of `step` (this thread blocks on a socket, off the lock
        the training loop needs)."""
        try:
            final, seconds = self.process.answer()
        except BaseException as exc:
            self.error = exc
            return
        self._written(step, final, seconds)

    def _written(self, step: int, final: Path, seconds: float) -> None:
        self.write_s += seconds
        log.info("checkpoint_saved", step=step, path=str(final), write_s=round(seconds, 3))
        if self.on_written is not None:
            self.on_written(final)

    def wait(self) -> None:
        """Waits for the checkpoint being written. Raises ExternalError if writing it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            problem = disk_error(error)
            raise ExternalError(f"writing a checkpoint failed: {problem or f'{type(error).__name__}: {error}'}; "
                                "finished checkpoints are kept, rerun to resume") from error

    def finish(self) -> dict:
        try:
            self.wait()
        finally:
            if self.process is not None:
                self.process.close()
        return {"saves": self.saves, "blocking_s": round(self.blocking_s, 3), "write_s": round(self.write_s, 3)}


class _Leaf:
    """Where a tensor of a snapshot lies in the shared buffer: byte offset, byte count, dtype name, shape."""
    __slots__ = ("offset", "nbytes", "dtype", "shape")

    def __init__(self, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]):
        self.offset, self.nbytes, self.dtype, self.shape = offset, nbytes, dtype, shape

    def __reduce__(self):
        return _Leaf, (self.offset, self.nbytes, self.dtype, self.shape)


class SnapshotBuffer:
    """Memory the training process and the writer process both map (a memfd: no /dev/shm size limit, gone with both
    processes). `take` copies each tensor of a snapshot into it, from the GPU without a stop per tensor where CUDA
    could pin it; the caller synchronizes once. Grown when a snapshot needs more, never shrunk."""

    def __init__(self):
        self.fd: int | None = None
        self.size = 0
        self.memory = None
        self.bytes = None  # a uint8 tensor over `memory`
        self.pinned = False

    def take(self, tree):
        import torch

        tensors: list = []
        shape_only = _replace_tensors(tree, tensors)
        offsets, end = [], 0
        for tensor in tensors:
            end = (end + 63) // 64 * 64  # every dtype's alignment, for the views the writer makes
            offsets.append(end)
            end += tensor.numel() * tensor.element_size()
        self._fit(end)
        leaves = []
        for tensor, offset in zip(tensors, offsets):
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes:
                flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
                self.bytes[offset:offset + nbytes].copy_(flat, non_blocking=self.pinned and flat.is_cuda)
            leaves.append(_Leaf(offset, nbytes, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)))
        return _put_leaves(shape_only, leaves)

    def _fit(self, size: int) -> None:
        import mmap

        import torch

        if size <= self.size and self.bytes is not None:
            return
        self.close()
        size = max(-(-int(size * 1.25) // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE)
        self.fd = os.memfd_create("peftopt-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.memory = mmap.mmap(self.fd, size)
        self.bytes = torch.frombuffer(self.memory, dtype=torch.uint8)
        self.size = size
        if torch.cuda.is_available():  # page-locked: copies from the GPU run as DMA, all queued before one sync
            self.pinned = torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), size, 0) == 0

    def close(self) -> None:
        if self.bytes is None:
            return
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
        self.bytes, self.pinned = None, False
        self.memory.close()
        os.close(self.fd)
        self.fd, self.memory, self.size = None, None, 0


class _Slot:
    """The place of the index-th tensor of a snapshot's tree, until it has its _Leaf."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _replace_tensors(value, found: list):
    import torch

    if isinstance(value, torch.Tensor):
        found.append(value)
        return _Slot(len(found) - 1)
    if isinstance(value, dict):
        return {k: _replace_tensors(v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_tensors(v, found) for v in value)
    return value


def _put_leaves(value, leaves: list):
    if isinstance(value, _Slot):
        return leaves[value.index]
    if isinstance(value, dict):
        return {k: _put_leaves(v, leaves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_put_leaves(v, leaves) for v in value)
    return value


def _read_leaves(value, memory):
    """The snapshot's tree with each leaf a tensor of its own (the writer process)."""
    import torch

    if isinstance(value, _Leaf):
        dtype = getattr(torch, value.dtype)
        if not value.nbytes:
            return torch.empty(value.shape, dtype=dtype)
        raw = torch.frombuffer(memory, dtype=torch.uint8, count=value.nbytes, offset=value.offset)
        return raw.view(dtype).reshape(value.shape).clone()
    if isinstance(value, dict):
        return {k: _read_leaves(v, memory) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_read_leaves(v, memory) for v in value)
    return value


class WriterProcess:
    """The process that writes checkpoints (`python -m job.checkpoints FD`), so that serializing a snapshot (torch's
    pickler, a thousand small tensors of an 8-bit optimizer) never takes the interpreter lock from the training loop.
    It gets each snapshot's tensors in a SnapshotBuffer and the rest pickled on a socket, with the buffer's fd; it
    answers with a JSON line. It has no secret in its environment, a session of its own (the job's stop is the job's
    to handle) and dies with the job's process."""

    def __init__(self):
        import socket
        import subprocess
        import sys

        from job import log as logs, settings

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        secrets = logs.registered_secrets()
        env = {k: v for k, v in settings.get().child_env().items() if v not in secrets and v.strip() not in secrets}
        self.process = subprocess.Popen([sys.executable, "-m", "job.checkpoints", str(theirs.fileno()),
                                         str(os.getpid())], pass_fds=[theirs.fileno()], env=env,
                                        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # it answers errors
                                        start_new_session=True)
        theirs.close()
        self.socket = ours
        self.reader = ours.makefile("rb")
        self.buffer = SnapshotBuffer()

    def send(self, snapshot: dict, fingerprint: str | None) -> None:
        import pickle
        import socket
        import struct

        payload = pickle.dumps({"snapshot": snapshot, "fingerprint": fingerprint, "size": self.buffer.size},
                               protocol=pickle.HIGHEST_PROTOCOL)
        try:
            socket.send_fds(self.socket, [struct.pack("!Q", len(payload))], [self.buffer.fd])
            self.socket.sendall(payload)
        except OSError as exc:
            raise RuntimeError(f"the checkpoint writer process is gone ({exc})") from exc

    def answer(self) -> tuple[Path, float]:
        """(the checkpoint's path, the seconds writing took). Raises what the writer raised (an OSError for a disk
        error), or RuntimeError when the process ended."""
        line = self.reader.readline()
        if not line:
            code = self.process.poll()
            raise RuntimeError(f"the checkpoint writer process ended (exit {code}) before answering")
        answer = json.loads(line)
        if answer.get("ok"):
            return Path(answer["path"]), float(answer["write_s"])
        if answer.get("errno"):
            raise OSError(answer["errno"], answer["message"])
        raise RuntimeError(answer.get("message", "the checkpoint writer failed"))

    def close(self) -> None:
        import contextlib
        import socket

        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)  # the writer's end of input: it leaves
        try:
            self.process.wait(timeout=30)
        except Exception:
            self.process.kill()
            self.process.wait()
        self.reader.close()
        self.socket.close()
        self.buffer.close()


def _writer_main(fd: int, parent: int) -> None:
    """The writer process: one snapshot at a time, written and answered, until the socket closes."""
    import mmap
    import pickle
    import socket
    import struct

    from job import interrupt

    interrupt.die_with_parent(parent)
    import torch  # noqa: F401  (before the first snapshot, not in its time)
    import peft  # noqa: F401  (its config classes are in the snapshot)

    channel = socket.socket(fileno=fd)
    while True:
        header, fds, _, _ = socket.recv_fds(channel, 8, 1)
        while header and len(header) < 8:
            more = channel.recv(8 - len(header))
            if not more:
                return
            header += more
        if not header:
            return
        length = struct.unpack("!Q", header)[0]
        payload = bytearray()
        while len(payload) < length:
            chunk = channel.recv(min(length - len(payload), 1 << 20))
            if not chunk:
                return
            payload += chunk
        started = time.perf_counter()
        try:
            message = pickle.loads(bytes(payload))  # from the job's own process (the socket pair is ours alone)
            memory = mmap.mmap(fds[0], message["size"]) if message["size"] else None
            try:
                snapshot = _read_leaves(message["snapshot"], memory)
            finally:
                if memory is not None:
                    memory.close()  # every tensor read from it is a copy of its own
            final = write_checkpoint(snapshot, message["fingerprint"])
            answer = {"ok": True, "path": str(final), "write_s": time.perf_counter() - started}
        except OSError as exc:
            answer = {"ok": False, "errno": exc.errno, "message": exc.strerror or str(exc)}
        except Exception as exc:
            answer = {"ok": False, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            for received in fds:
                os.close(received)
        channel.sendall(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    import sys

    from job import checkpoints  # the module's own classes, as the pickled snapshot names them (not __main__'s)

    checkpoints._writer_main(int(sys.argv[1]), int(sys.argv[2]))
    os._exit(0)
