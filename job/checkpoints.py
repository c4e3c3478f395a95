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
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from job import distributed, statefile
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
        if (path / "optimizer.pt").exists():
            statefile.load(path / "optimizer.pt")
        for name in ("scheduler.pt", "scaler.pt"):
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


class HostSnapshot:
    """A CPU copy of a nested structure of tensors (dicts, lists, tuples), taken without stopping the GPU.

    An adapter and its 8-bit optimizer state are over a thousand small tensors: copied one by one, each copy is a
    launch and the loop waited for the lot. Here the tensors of each device and dtype are packed into one buffer:
    the CUDA ones on the GPU, copied once into page-locked memory, with an event marking the copy's end (the training
    thread goes on: its next kernels queue behind the copy, so the weights it changes are copied first); the CPU ones
    at once. On the writer thread, `packs()` waits for the event and hands back the packs, which
    `write_safetensors` and `save_state` write whole (a write releases the interpreter lock the training loop needs;
    a Python call per tensor would hold it); `take()` gives the structure back with its tensors on the CPU, each a
    view into its pack (with `own_storage`, for comparison, a copy of its own, as `.to("cpu")` makes them)."""

    def __init__(self, tree: Any, own_storage: bool = False):
        import torch

        self.own_storage = own_storage
        self._tensors: list = []
        self._skeleton = self._walk(tree)
        self._buffers: dict = {}  # (device type, dtype) -> the pack on the CPU, in the order of the first tensors
        self._layout: list[tuple] = [None] * len(self._tensors)  # per tensor: (pack's key, offset, shape)
        self.event = None
        groups: dict = {}
        for index, tensor in enumerate(self._tensors):
            groups.setdefault((tensor.device.type, tensor.dtype), []).append(index)
        for key, members in groups.items():
            offset = 0
            for index in members:
                tensor = self._tensors[index]
                self._layout[index] = (key, offset, tuple(tensor.shape))
                offset += tensor.numel()
            with torch.no_grad():  # one C++ call flattens and concatenates the lot (a Python view per tensor
                # cost more host time than the copy); it hands back a view, not a copy, of a single tensor
                packed = torch._utils._flatten_dense_tensors([self._tensors[index] for index in members]) \
                    if len(members) > 1 else self._tensors[members[0]].reshape(-1).clone()
            if packed.is_cuda:
                host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                packed = host
            self._buffers[key] = packed
        if any(device == "cuda" for device, _ in groups):
            self.event = torch.cuda.Event()
            self.event.record()
        self._tensors = []  # the tensors are not held past the copy
        self._pack_index = {key: index for index, key in enumerate(self._buffers)}

    def _walk(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            self._tensors.append(value)
            return _Slot(len(self._tensors) - 1)
        if isinstance(value, dict):
            return {k: self._walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._walk(v) for v in value)
        return value

    def wait(self) -> None:
        """Waits for the copy to the CPU."""
        if self.event is not None:
            self.event.synchronize()

    def packs(self) -> list:
        """The packs, flat CPU tensors, once copied; a tensor's place in them is `where(slot)`'s."""
        self.wait()
        return list(self._buffers.values())

    def where(self, value: Any) -> tuple[int, int, tuple[int, ...]] | None:
        """A tensor's (pack, offset, shape) in `packs()` given its place in the structure, None for other values."""
        if not isinstance(value, _Slot):
            return None
        key, offset, shape = self._layout[value.index]
        return self._pack_index[key], offset, shape

    @property
    def skeleton(self) -> Any:
        """The structure, each tensor in it replaced by its place (`where` reads it)."""
        return self._skeleton

    def take(self) -> Any:
        """The structure with every tensor on the CPU; waits for the copy."""
        self.wait()
        return self._fill(self._skeleton)

    def _fill(self, value: Any) -> Any:
        if isinstance(value, _Slot):
            key, offset, shape = self._layout[value.index]
            count = 1
            for size in shape:
                count *= size
            tensor = self._buffers[key][offset:offset + count].view(shape)
            return tensor.clone() if self.own_storage else tensor
        if isinstance(value, dict):
            return {k: self._fill(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._fill(v) for v in value)
        return value


# safetensors' names of the dtypes an adapter's tensors come in
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(snapshot: HostSnapshot, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of the snapshot of a flat dict of tensors (an adapter's): the header, then each pack's
    bytes with one write, the packs of the larger elements first so that every tensor stays aligned to its size.
    safetensors' `save_file` copies every tensor into a bytes object and serializes the lot holding the
    interpreter lock, which the training loop needs while a checkpoint is written beside it; a file write releases
    it. The same file for safetensors' readers (tests/unit/test_host_snapshot.py); other dtypes go through
    `save_file`."""
    import torch

    skeleton = snapshot.skeleton
    places = {name: snapshot.where(value) for name, value in skeleton.items()} if isinstance(skeleton, dict) else None
    packs = snapshot.packs()
    if places is None or any(place is None for place in places.values()) or \
            any(str(pack.dtype).removeprefix("torch.") not in SAFETENSORS_DTYPES for pack in packs):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in snapshot.take().items()}, str(path), metadata=metadata)
        return
    order = sorted(range(len(packs)), key=lambda index: -packs[index].element_size())
    base, start = {}, 0
    for index in order:
        base[index] = start
        start += packs[index].numel() * packs[index].element_size()
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, (index, offset, shape) in places.items():
        size = packs[index].element_size()
        first = base[index] + offset * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(packs[index].dtype).removeprefix("torch.")],
                        "shape": list(shape), "data_offsets": [first, first + math.prod(shape) * size]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for index in order:
            if packs[index].numel():
                out.write(memoryview(packs[index].view(torch.uint8).numpy()))


def save_state(snapshot: HostSnapshot, path: Path) -> None:
    """The snapshot of an optimizer's state dict in `statefile`'s format (the plain state dict, pickled by
    torch.save, when the JSON cannot carry something in it)."""
    try:
        tree = statefile.encode(snapshot.skeleton, snapshot.where)
    except statefile.Unencodable:
        import torch

        torch.save(snapshot.take(), path)
        return
    statefile.save(path, tree, snapshot.packs())


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int


def _state_now(state) -> dict:
    """TrainerState's fields (none of them a dataclass) as `dataclasses.asdict` gives them, without its recursive copy
    of the growing log (its records, flat dicts of numbers, copied one level), the rest deep-copied (small)."""
    import copy

    fields = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if field.name == "log_history" and isinstance(value, list):
            value = [dict(entry) if isinstance(entry, dict) else entry for entry in value]
        elif isinstance(value, (dict, list)):
            value = copy.deepcopy(value)
        fields[field.name] = value
    return fields


class AsyncCheckpointWriter:
    """Installed in place of `trainer._save_checkpoint`; writes what the Trainer's own resume reads.

    `on_written(path)` runs on the writer thread once a checkpoint is complete (the Hub sync hooks in there).
    A failed write is raised on the training thread at the next save or at `finish()`.
    """

    def __init__(self, trainer, fingerprint: str | None, on_written: Callable[[Path], None] | None = None):
        self.trainer = trainer
        self.fingerprint = fingerprint
        self.on_written = on_written
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.blocking_s = 0.0  # time the training loop spent on checkpoints
        self.write_s = 0.0  # time the writer thread spent
        self.saves = 0
        self.blocking_split: dict[str, float] = {}  # where the loop's time on checkpoints went
        self._adapter: tuple[dict, list] | None = None  # the adapter's state dict, and its parameters' storage
        trainer._save_checkpoint = self.save
        if not distributed.is_sharded(trainer.model):  # a sharded model's state loads through distributed.shard's
            trainer._load_optimizer_and_scheduler = self.load_optimizer_and_scheduler

    def load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's `_load_optimizer_and_scheduler` for the optimizer state `save_state` writes: loaded on the
        CPU, as the Trainer loads it in one process (the optimizer moves its state to its parameters' devices)."""
        import torch

        if checkpoint is None:
            return
        path = Path(checkpoint)
        if not ((path / "optimizer.pt").is_file() and (path / "scheduler.pt").is_file()):
            return  # as the Trainer: the two together or neither
        self.trainer.optimizer.load_state_dict(statefile.load(path / "optimizer.pt"))
        self.trainer.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def _adapter_state(self, model) -> dict:
        """peft's state dict of the adapter. Its tensors are the trainable parameters themselves (detached views),
        which training updates in place: after the first save the same dict is used again (peft walks the whole
        model's state dict to make it: a third of a save's time on the loop), as long as every parameter still
        holds the storage it held then."""
        from peft import get_peft_model_state_dict

        if self._adapter is not None and all(param.data_ptr() == ptr for param, ptr in self._adapter[1]):
            return self._adapter[0]
        state = get_peft_model_state_dict(model)
        params = {param.data_ptr(): param for param in model.parameters() if param.requires_grad}
        pairs = [(params.get(tensor.data_ptr()), tensor.data_ptr()) for tensor in state.values()]
        if all(param is not None and param.shape == tensor.shape for (param, _), tensor in zip(pairs, state.values())):
            self._adapter = (state, pairs)
        return state

    def _split(self, part: str, since: float) -> float:
        now = time.perf_counter()
        self.blocking_split[part] = self.blocking_split.get(part, 0.0) + now - since
        return now

    def save(self, model, trial=None) -> None:
        import numpy as np
        import torch
        from peft import get_peft_model_state_dict
        from transformers.trainer_callback import ExportableState

        started = time.perf_counter()
        self.wait()
        self._split("waiting", started)
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
        mark = time.perf_counter()
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
        state = {"adapter": get_peft_model_state_dict(unwrapped, state_dict=gathered[0]) if gathered
                 else self._adapter_state(unwrapped),
                 "optimizer": gathered[1] if gathered else trainer.optimizer.state_dict()}
        mark = self._split("state_dicts", mark)
        tensors = {"adapter": HostSnapshot(state["adapter"]), "optimizer": HostSnapshot(state["optimizer"])}
        mark = self._split("copy", mark)
        snapshot = {
            "step": trainer.state.global_step,
            "tensors": tensors,
            "adapter_config": unwrapped.peft_config,
            "scheduler": trainer.lr_scheduler.state_dict(),
            "rng": rng,
            # TrainerState's fields as they are now (the state moves on with training), written in save_to_json's
            # format by the writer thread
            "trainer_state": _state_now(trainer.state),
            "dir": root,
            "partial": partial,
            "keep": trainer.args.save_total_limit,
        }
        self._split("trainer_state", mark)
        self.thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer", daemon=True)
        self.thread.start()
        self.saves += 1
        self.blocking_s += time.perf_counter() - started

    def _write(self, snapshot: dict) -> None:
        import torch

        started = time.perf_counter()
        root: Path = snapshot["dir"]
        final = root / f"checkpoint-{snapshot['step']}"
        partial: Path = snapshot["partial"]
        try:
            write_safetensors(snapshot["tensors"]["adapter"], partial / "adapter_model.safetensors",
                              metadata={"format": "pt"})
            for config in snapshot["adapter_config"].values():
                config.save_pretrained(str(partial))
            save_state(snapshot["tensors"]["optimizer"], partial / "optimizer.pt")
            torch.save(snapshot["scheduler"], partial / "scheduler.pt")
            if snapshot["rng"] is not None:
                torch.save(snapshot["rng"], partial / "rng_state.pth")
            (partial / "trainer_state.json").write_text(
                json.dumps(snapshot["trainer_state"], indent=2, sort_keys=True) + "\n")
            write_marker(partial, snapshot["step"], self.fingerprint)
            for path in partial.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._rotate(root, snapshot["keep"])
        except BaseException as exc:  # raised on the training thread by the next save or finish()
            shutil.rmtree(partial, ignore_errors=True)
            self.error = exc
            return
        self.write_s += time.perf_counter() - started
        log.info("checkpoint_saved", step=snapshot["step"], path=str(final),
                 write_s=round(time.perf_counter() - started, 3))
        if self.on_written is not None:
            self.on_written(final)

    @staticmethod
    def _rotate(root: Path, keep: int | None) -> None:
        if not keep:
            return
        steps = complete_steps(root)
        for step in steps[:-keep]:
            shutil.rmtree(root / f"checkpoint-{step}", ignore_errors=True)

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
        self.wait()
        return {"saves": self.saves, "blocking_s": round(self.blocking_s, 3), "write_s": round(self.write_s, 3),
                "blocking_split_s": {part: round(s, 3) for part, s in self.blocking_split.items()}}
