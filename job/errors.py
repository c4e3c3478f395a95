"""The one exception family peftopt raises on purpose, each carrying the exit code the CLI returns.

Batch services key their retry rules on these codes (see README, "Exit codes"), so they are part of the
public contract: never renumber one.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_SPEC = 2
EXIT_DATA = 3
EXIT_EXTERNAL = 4
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: state is saved, retry the same command


MAX_MESSAGE_CHARS = 2000  # a message quotes rows, fields and files others wrote: never a 20 MB line
MAX_DETAILS = 50


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters in all)"


class PeftoptError(Exception):
    """Base of every expected failure: printed as one line, no traceback."""

    exit_code = EXIT_BUG
    event = "job_failed"

    def __init__(self, message: str, *, details: list[str] | None = None):
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.details = [bounded(line) for line in (details or [])[:MAX_DETAILS]]


class SpecError(PeftoptError):
    """The jobspec, an override or the command line is invalid (exit 2)."""

    exit_code = EXIT_SPEC


class RunConflict(SpecError):
    """The run directory holds work from a different spec, or another run holds its lock (exit 2)."""


class DataError(PeftoptError):
    """A data set is unreadable, malformed or leaves nothing to train on (exit 3)."""

    exit_code = EXIT_DATA


class ExternalError(PeftoptError):
    """A tool or service outside peftopt failed: llama.cpp, the Hub, the disk (exit 4)."""

    exit_code = EXIT_EXTERNAL


class MachineError(ExternalError):
    """This machine lacks what the job needs (the pinned llama.cpp build, a CUDA GPU for unsloth): exit 4,
    since the same job may run on another machine or image."""


class Interrupted(PeftoptError):
    """A signal stopped the job after its state was saved; rerunning resumes it (exit 75)."""

    exit_code = EXIT_INTERRUPTED
    event = "job_interrupted"


class CheckpointRefused(Interrupted):
    """The Trainer could not take in the checkpoint it resumed from; it was removed, and a retry resumes from the
    one before (exit 75), so that a bad checkpoint is never a crash on every retry."""


class RankLost(Interrupted):
    """A rank of a data-parallel run died (its process was killed, its node lost): the others cannot go on, and
    the retry resumes from the newest complete checkpoint (exit 75)."""


EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BUG: "unexpected error (a bug): traceback in the log",
    EXIT_SPEC: "invalid jobspec, override or usage; or the run directory belongs to another spec",
    EXIT_DATA: "data error: unreadable or malformed data set, or nothing left to train on",
    EXIT_EXTERNAL: "external tool or service failed (llama.cpp, Hugging Face Hub, disk), or this machine lacks a "
                   "tool the job needs",
    EXIT_INTERRUPTED: "interrupted by a signal with state saved, or a rank of a data-parallel run was lost: retry "
                      "the same command to resume",
}


_DISK_ERRNOS = {28, 27, 122, 30}  # ENOSPC, EFBIG, EDQUOT, EROFS
_DISK_WORDS = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
               # torch.save reports a failed write only as its C++ writer's error text:
               "PytorchStreamWriter failed writing", "iostream error", "inline_container.cc")


def disk_error(exc: BaseException) -> str | None:
    """The disk problem behind `exc` (also when a library wraps the OSError in its own type), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return exc.strerror or str(exc)
        text = str(exc)
        for words in _DISK_WORDS:
            if words in text:
                return words
        exc = exc.__cause__ or exc.__context__
    return None
