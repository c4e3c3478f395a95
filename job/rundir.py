"""The run directory: where a run's state, artifacts and logs live, written so a crash never corrupts them.

Every file goes to a temporary name beside its target and is renamed into place (`os.replace` is atomic
on one filesystem); a directory artifact is built under `<name>.tmp-<pid>` and renamed once complete.
A lock file held with `flock` keeps two processes off one run; the kernel drops it when a process dies.

The directory may sit on a volume other jobs write to, so nothing in it is taken on trust: a symbolic link
where peftopt keeps a file or folder is refused (naming it), files are opened with O_NOFOLLOW, only the
scratch names peftopt itself makes are ever cleaned, and a non-empty directory that holds no run is
refused rather than adopted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from job.errors import ExternalError, RunConflict

# Entries peftopt makes at the top of a run directory; anything else in a directory without state.json
# means it is not a run directory.
OWN_ENTRIES = {".lock", "spec.json", "state.json", "metrics.json", "events.jsonl", "data", "base", "checkpoints",
               "adapter", "merged", "gguf", "eval", "cards", "tracking", "push-ledger.json", ".cache"}
# The scratch names peftopt makes, and only those: a hidden `.<file>.tmp-<pid>` (atomic_write_bytes, report plots),
# `<artifact dir>.tmp-<pid>` / `.old-<pid>` (atomic_dir), a checkpoint being written or restored.
ARTIFACT_DIRS = ("data", "base", "adapter", "merged", "gguf", "eval", "checkpoints", "cards", "tracking")
SCRATCH = re.compile(r"^\.[\w.-]+\.tmp-\d+(\.png)?$|^(" + "|".join(ARTIFACT_DIRS) + r")\.(tmp|old)-\d+$"
                     r"|^\.checkpoint-\d+\.partial$|^\.restore-\d+$|^datasets-\d+-\w+$")
SCRATCH_DIRS = ("", "data", "eval", "gguf", "cards", "checkpoints", "adapter", "merged", "base", "tracking", ".cache")


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


def refuse_links(root: Path, path: Path) -> None:
    """Raises RunConflict when `path`, or a folder between `root` and it, is a symbolic link."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise RunConflict(f"{path} is outside the run directory {root}") from None
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise RunConflict(f"{current} is a symbolic link; peftopt does not follow links inside a run "
                              "directory (another writer of this volume may have put it there): remove it")


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open with O_NOFOLLOW. Raises RunConflict when `path` is a symbolic link."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunConflict(f"{path} is a symbolic link; peftopt does not follow links inside a run directory "
                              "(another writer of this volume may have put it there): remove it") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Raises ExternalError when the disk refuses (full, read-only): the old file is left intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a link planted under our scratch name is removed, never written through
    try:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # replaces a link in `path`'s place, never what it points to
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ExternalError(f"cannot write {path}: {exc.strerror or exc}") from exc
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


MAX_JSON_BYTES = 256 * 1024 * 1024


def read_json(path: Path, default: Any = None, *, strict: bool = False) -> Any:
    """A JSON file peftopt wrote (in a run directory, on a volume others may write): opened without following a
    link and only as a regular file of bounded size. `default` when it is not there, or (unless `strict`) when
    its content is not JSON: it is rewritten whole at the next write.

    Raises:
        RunConflict: a link, a FIFO, a device or a directory is in its place (exit 2, naming it).
        ValueError: with `strict`, the content is not JSON.
    """
    import stat

    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return default
    except IsADirectoryError:
        raise RunConflict(f"{path} is a directory where peftopt keeps a file; remove it") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise RunConflict(f"{path} is not a regular file (a FIFO or a device where peftopt keeps a file; another "
                              "writer of this volume may have put it there): remove it")
        data = fh.read(MAX_JSON_BYTES + 1)
    try:
        if len(data) > MAX_JSON_BYTES:
            raise ValueError(f"more than {MAX_JSON_BYTES:,} bytes")
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        if strict:
            raise ValueError(f"{path} is not JSON") from None
        return default


# Characters Python's str.splitlines (and many JSON Lines readers) break lines on that JSON leaves unescaped
LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def jsonl_line(obj: Any) -> str:
    """One JSON Lines record of text a model or a data set wrote: non-ASCII kept as it is, except the characters
    other readers take for line breaks (U+2028, U+2029, U+0085), which are escaped; the line ends with a newline."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKS) + "\n"


def read_jsonl(path: Path) -> list:
    """The records of a JSON Lines file peftopt wrote, read as `read_json` reads (no link, regular files only),
    split on newlines alone (a record may hold U+2028 and the like when an older peftopt wrote it)."""
    import stat

    fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise RunConflict(f"{path} is not a regular file (another writer of this volume may have put it there): "
                              "remove it")
        text = fh.read().decode("utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a scratch directory that replaces `final` only if the block finishes without error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if final.is_symlink():
            final.unlink()  # a link in the artifact's place is replaced, what it points to left alone
        elif final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    """Removes a file, a link (never its target) or a directory tree (rmtree does not follow links)."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ run state


@dataclass
class StageState:
    status: str = "pending"  # pending, running, done, failed, interrupted
    started_at: str | None = None
    finished_at: str | None = None
    fingerprint: str | None = None
    runtime_s: float | None = None
    artifacts: list[str] = field(default_factory=list)
    error: str | None = None
    # What its fingerprint was made of (Stage.inputs: field values, file digests), so that a refusal to mix work
    # of other inputs can name the fields and files that changed
    inputs: dict | None = None

    @classmethod
    def from_json(cls, data: Any) -> "StageState":
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if not isinstance(state.artifacts, list) or not all(isinstance(a, str) for a in state.artifacts):
            state.artifacts = []
        if not isinstance(state.inputs, dict):
            state.inputs = None
        return state

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, [])} | {"status": self.status}


@dataclass
class RunState:
    """state.json: the run's status and each stage's."""
    stages: dict[str, StageState]
    name: str | None = None
    status: str = "pending"
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    error: str | None = None
    logged_to_experiments: bool = False

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "stages"}
        out["stages"] = {name: stage.to_json() for name, stage in self.stages.items()}
        return out


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

    def refuse_foreign(self) -> None:
        """Raises RunConflict when the run directory is a link, holds a link where peftopt keeps its own files,
        or is a non-empty directory that holds no run (it is refused, not adopted)."""
        if self.root.is_symlink():
            raise RunConflict(f"{self.root} is a symbolic link; a run directory must be a real directory "
                              "inside the output directory")
        if (self.root.parent / "experiments_log.csv").is_symlink():
            raise RunConflict(f"{self.root.parent / 'experiments_log.csv'} is a symbolic link; peftopt does not "
                              "follow links in an output directory (another writer may have put it there): remove it")
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RunConflict(f"{self.root} exists and is not a directory; use another name or output directory")
        entries = {entry.name for entry in self.root.iterdir()}
        foreign = sorted(name for name in entries if name not in OWN_ENTRIES and not SCRATCH.match(name))
        if "state.json" not in entries and foreign:
            raise RunConflict(f"{self.root} is a directory that holds no peftopt run (it has {', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); use another name or output directory")
        for name in entries & OWN_ENTRIES:
            refuse_links(self.root, self.root / name)

    def clean_scratch(self) -> None:
        """Removes what a killed process left half-written: the scratch names peftopt makes (`*.tmp-<pid>`,
        `*.old-<pid>`, `.checkpoint-N.partial`) in the folders peftopt writes, and nothing else."""
        for folder in SCRATCH_DIRS:
            directory = self.root / folder
            if directory.is_symlink() or not directory.is_dir():
                continue
            for entry in directory.iterdir():
                if SCRATCH.match(entry.name):
                    _remove(entry)

    # ------------------------------------------------------------------------------------ files
    def open_append(self, path: Path) -> IO[str]:
        """`path` (inside the run directory) opened for appending, refusing a link in its place or above it."""
        refuse_links(self.root, path)
        fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def remove(self, relative: str) -> None:
        """Removes an artifact peftopt made (a link in its place is removed, never followed)."""
        _remove(self.root / relative)

    # ------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Raises RunConflict when a live process holds this run."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = open_nofollow(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise RunConflict(f"run already in progress in {self.root} (pid {holder[:16]}); "
                                  "wait for it or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ state
    def load_state(self, stage_names) -> RunState:
        """Raises RunConflict when state.json is there but is not a run state peftopt wrote."""
        try:
            data = read_json(self.state_path, strict=True) or {}
        except (OSError, ValueError) as exc:
            raise RunConflict(f"{self.state_path} is not a run state peftopt wrote ({type(exc).__name__}); "
                              "remove the run directory or use another name") from None
        if not isinstance(data, dict):
            raise RunConflict(f"{self.state_path} is not a run state peftopt wrote; remove it or use another name")
        stages = data.get("stages") if isinstance(data.get("stages"), dict) else {}
        state = RunState(stages={name: StageState.from_json(stages.get(name)) for name in stage_names})
        for key in ("name", "status", "started_at", "finished_at", "error"):
            if isinstance(data.get(key), str):
                setattr(state, key, data[key])
        state.attempts = data["attempts"] if isinstance(data.get("attempts"), int) else 0
        state.logged_to_experiments = data.get("logged_to_experiments") is True
        return state

    def save_state(self, state: RunState) -> None:
        from job.log import mask_text

        state.updated_at = now_iso()
        state.error = mask_text(state.error) if state.error else state.error
        for stage in state.stages.values():
            if stage.error:
                stage.error = mask_text(stage.error)
        atomic_write_json(self.state_path, state.to_json())

    def missing_artifacts(self, stage: StageState) -> list[str]:
        """A finished stage's artifacts that are gone, or that hold what peftopt did not write (a link, a FIFO, a
        device, at any level): the stage is done again rather than its work read back."""
        out = []
        for rel in stage.artifacts:
            path = self.root / rel
            if not os.path.lexists(path):
                out.append(rel)
                continue
            problem = self.foreign(path)
            if problem:
                out.append(f"{rel} ({problem})")
        return out

    def foreign(self, path: Path) -> str | None:
        """What in `path` (a file or folder of this run directory) peftopt did not make: a link at any level from
        the run directory down, a FIFO, a device or a socket; None when it is all regular files and folders."""
        from job.inputs import foreign_entry

        try:
            refuse_links(self.root, path)
        except RunConflict:
            return "a symbolic link on its path"
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        import stat

        if stat.S_ISDIR(info.st_mode):
            return foreign_entry(path)
        return None if stat.S_ISREG(info.st_mode) else "not a regular file"

    def gguf_files(self) -> dict[str, dict]:
        """The GGUF files the gguf stage recorded in metrics.json, by type, each a plain file name of a regular file
        in gguf/. metrics.json is on the volume: a name that climbs out of gguf/ or a link is refused, not read.

        Raises:
            RunConflict: naming the entry (exit 2).
        """
        files = ((read_json(self.metrics_path) or {}).get("gguf") or {}).get("files") or {}
        if not isinstance(files, dict):
            raise RunConflict(f"{self.metrics_path}: gguf.files is not a mapping of GGUF types to files")
        for quant, info in files.items():
            name = info.get("file") if isinstance(info, dict) else None
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}\.gguf", name):
                raise RunConflict(f"{self.metrics_path}: gguf.files[{str(quant)[:40]!r}] names "
                                  f"{str(name)[:80]!r}, not a GGUF file of {self.gguf_dir}; rerun with --restart "
                                  "to redo the gguf stage")
            self.own(self.gguf_dir / name)
        return files

    def own(self, path: Path) -> Path:
        """`path`, a file or folder of this run directory about to be read back or handed to a library, once it is
        all peftopt's own (see `foreign`).

        Raises:
            RunConflict: naming what is not (exit 2).
        """
        problem = self.foreign(path)
        if problem:
            raise RunConflict(f"{path}: {problem}; peftopt reads back only its own regular files from a run "
                              "directory (another writer of this volume may have put it there): remove it")
        return path
