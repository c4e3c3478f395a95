"""Reading the files a jobspec names, bounded: only regular files (a FIFO, a device or a directory is refused,
never waited on), at most a stated size, each refusal one line naming the field and the file.
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
from pathlib import Path
from typing import Iterator

from job.errors import SpecError


def regular_file_problem(path: str | Path, max_bytes: int | None = None) -> str | None:
    """Why `path` cannot be read as a spec's input file, or None."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
        return f"is {kind}, not a regular file"
    if max_bytes is not None and info.st_size > max_bytes:
        return f"is {info.st_size:,} bytes, more than the {max_bytes:,} allowed"
    return None


def read_regular_file(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most `max_bytes`.

    Raises:
        SpecError: `what: PATH is a FIFO, not a regular file` and the like.
    """
    problem = regular_file_problem(path, max_bytes)
    if problem:
        raise SpecError(f"{what}: {path} {problem}")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the check, opening it does not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(f"{what}: cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise SpecError(f"{what}: {path} is not a regular file")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SpecError(f"{what}: {path} is more than the {max_bytes:,} bytes allowed")
    return data


@contextlib.contextmanager
def time_limit(seconds: float, error: Exception) -> Iterator[None]:
    """Raises `error` if the block runs longer than `seconds` (a real-time timer; in the main thread only,
    where Python delivers signals: elsewhere the block runs unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum, _frame):
        raise error

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _kind(info: os.stat_result) -> str:
    mode = info.st_mode
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")


def foreign_entry(directory: str | Path, *, links_within: str | Path | None = None,
                  max_entries: int = 10_000) -> str | None:
    """The first entry under `directory` that could lead a library reading it somewhere else, described
    ('tokenizer.model is a link to /proc/self/environ, outside it', 'data/train.jsonl is a FIFO, not a regular
    file'), or None when every entry is a regular file or directory. Checked without following links: a link is
    allowed only to a regular file inside `links_within` (a Hub snapshot's links into its cached repo); without it,
    no link is."""
    root = Path(directory)
    allowed = Path(links_within).resolve() if links_within is not None else None
    count = 0
    for folder, dirs, files in os.walk(root):  # never descends through a link
        for name in sorted(dirs) + sorted(files):
            count += 1
            if count > max_entries:
                return f"holds more than {max_entries:,} entries"
            path = Path(folder) / name
            relative = path.relative_to(root)
            try:
                info = os.lstat(path)
            except OSError:
                continue  # gone since it was listed
            if stat.S_ISLNK(info.st_mode):
                if allowed is None:
                    return f"{relative} is a symbolic link (to {os.readlink(path)})"
                try:
                    target = path.resolve(strict=True)
                    target_info = os.stat(target)
                except (OSError, RuntimeError):
                    return f"{relative} is a broken or looping link"
                if not target.is_relative_to(allowed):
                    return f"{relative} is a link to {os.readlink(path)}, outside it"
                if not stat.S_ISREG(target_info.st_mode):
                    return f"{relative} is a link to {_kind(target_info)}, not a regular file"
            elif not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                return f"{relative} is {_kind(info)}, not a regular file"
    return None
