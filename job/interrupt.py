"""Preemption: the first SIGTERM/SIGINT asks the job to stop at a safe point; a second one exits at once.

A stop request starts a watchdog: if the job has not exited within the grace period (the scheduler's
kill is coming), it leaves with exit 75 anyway; whatever was last saved is still complete on disk.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from job.errors import EXIT_INTERRUPTED
from job.log import get_logger

log = get_logger("peftopt")

_stop = threading.Event()
_grace_s = 20.0
_watchdog: threading.Timer | None = None
_stopped_at: float | None = None


def stop_requested() -> bool:
    return _stop.is_set()


def grace_left() -> float:
    """Seconds until the watchdog ends the process (the full grace period while no stop was asked)."""
    if _stopped_at is None:
        return _grace_s
    return max(_grace_s - (time.monotonic() - _stopped_at), 0.0)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass


def _give_up() -> None:
    log.error("grace_expired", grace_s=_grace_s, exit_code=EXIT_INTERRUPTED,
              action="exiting before a safe point; the last complete checkpoint is on disk")
    _flush_logs()
    os._exit(EXIT_INTERRUPTED)


def _handle(signum, _frame) -> None:
    global _watchdog, _stopped_at
    if _stop.is_set():
        _flush_logs()
        os._exit(EXIT_INTERRUPTED)
    _stopped_at = time.monotonic()
    _stop.set()
    log.warning("stop_requested", signal=signal.Signals(signum).name, grace_s=_grace_s,
                action="saving at the next safe point, then exiting 75")
    _watchdog = threading.Timer(_grace_s, _give_up)
    _watchdog.daemon = True
    _watchdog.start()


def install(grace_s: float = 20.0) -> None:
    global _grace_s
    _grace_s = grace_s
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)


def set_grace(grace_s: float) -> None:
    global _grace_s
    _grace_s = grace_s


def wait_for(proc, what: str, *, timeout: float | None = None, input_text: str | None = None,
             stop: threading.Event | None = None) -> tuple[str, str]:
    """A child process's (stdout, stderr) once it ends. A stop request (SIGTERM), or `stop` (the caller gave up on
    it), kills it and raises Interrupted; so does running past `timeout`, as ExternalError."""
    import subprocess

    from job.errors import ExternalError, Interrupted

    deadline = time.monotonic() + timeout if timeout else None
    pending_input = input_text
    while True:
        try:
            return proc.communicate(input=pending_input, timeout=0.5)
        except subprocess.TimeoutExpired:
            pending_input = None  # communicate() already sent it
            abandoned = stop is not None and stop.is_set()
            if stop_requested() or abandoned or (deadline is not None and time.monotonic() > deadline):
                proc.kill()
                proc.communicate()
                if stop_requested() or abandoned:
                    raise Interrupted(f"stopped by a signal during {what}; rerun to redo this stage") from None
                raise ExternalError(f"{what} timed out after {timeout:.0f} s") from None
