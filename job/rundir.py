"""The run directory: where a run's state, artifacts and logs live, written so a crash never corrupts them.

Every file goes to a temporary name beside its target and is renamed into place (`os.replace` is atomic
on one filesystem); a directory artifact is built under `<name>.tmp-<pid>` and renamed once complete.
A lock file held with `flock` keeps two processes off one run; the kernel drops it when a process dies.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from job.errors import ExternalError, RunConflict

STAGES = ("prepare", "train", "evaluate", "merge", "gguf", "push")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Raises ExternalError when the disk refuses (full, read-only): the old file is left intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ExternalError(f"cannot write {path}: {exc.strerror or exc}") from exc
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a scratch directory that replaces `final` only if the block finishes without error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def spec_path(self) -> Path:
        return self.root / "spec.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def base_dir(self) -> Path:
        """A local copy of the base model, made only when the source cannot be loaded directly (a GGUF)."""
        return self.root / "base"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def clean_scratch(self) -> None:
        """Removes what a killed process left half-written: `*.tmp-*` and `*.old-*` entries."""
        if not self.root.exists():
            return
        for entry in self.root.rglob("*"):
            if ".tmp-" in entry.name or ".old-" in entry.name:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()

    # ------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Raises RunConflict when a live process holds this run."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunConflict(f"run already in progress in {self.root} (pid {holder}); "
                                  "wait for it or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ state
    def load_state(self) -> dict:
        state = read_json(self.state_path) or {}
        state.setdefault("stages", {})
        for name in STAGES:
            state["stages"].setdefault(name, {"status": "pending"})
        return state

    def save_state(self, state: dict) -> None:
        state["updated_at"] = now_iso()
        atomic_write_json(self.state_path, state)

    def missing_artifacts(self, stage_state: dict) -> list[str]:
        return [rel for rel in stage_state.get("artifacts", []) if not (self.root / rel).exists()]
