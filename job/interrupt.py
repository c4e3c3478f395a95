"""Preemption: the first SIGTERM/SIGINT asks the job to stop; a second one exits at once.

A stage that saves as it goes (train: its checkpoints) stops at its next safe point. Any other stage keeps nothing
that a stop would lose, so a stop request ends it where it is (Interrupted is raised in the main thread), except
inside a section that checks for a stop itself because it must end a child process first (`polled`).
A stop request also starts a watchdog: if the job has not exited within the grace period (the scheduler's kill is
coming), it records the run as interrupted (`on_give_up`) and leaves with exit 75; whatever was saved is complete.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from job.errors import EXIT_INTERRUPTED
from job.log import get_logger

log = get_logger("peftopt")

_stop = threading.Event()
_grace_s = 20.0
_watchdog: threading.Timer | None = None
_stopped_at: float | None = None
_stage: str | None = None  # the stage in progress
_at_once = False  # it keeps no safe points, and no `polled` section is running
_give_up_hooks: list = []


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
    kept = ("the last complete checkpoint is on disk" if _stage == "train" else
            f"finished stages are kept; {_stage} is redone by the rerun" if _stage else "finished stages are kept")
    log.error("grace_expired", grace_s=_grace_s, stage=_stage, exit_code=EXIT_INTERRUPTED,
              action=f"exiting before a safe point; {kept}")
    for hook in list(_give_up_hooks):
        try:
            hook()
        except Exception:  # exiting within the grace period matters more than any record
            pass
    _flush_logs()
    os._exit(EXIT_INTERRUPTED)


def on_give_up(hook) -> None:
    """Calls `hook` before the process leaves after a stop request: from the watchdog's thread at the end of the grace
    period, or from `leave` (what ends a child process of ours goes here as well as to atexit)."""
    _give_up_hooks.append(hook)


def leave(code: int) -> None:
    """Exits once the exit code is known and everything is written, without the interpreter's teardown: freeing
    torch's and the libraries' objects one by one takes 1-2 s (after a stop request, time the grace period does not
    have; after a finished job, time the user waits for nothing). What an exit does for others still runs:
    the give-up hooks, the thread pools' shutdown, the threads that are not daemons, the atexit handlers."""
    import atexit

    for hook in list(_give_up_hooks):
        try:
            hook()
        except Exception:
            pass
    # What the interpreter does first when it exits: the thread pools' shutdown hooks, then the threads that are
    # not daemons joined (a stuck one after a stop request: the watchdog ends the process at the grace's end)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    _flush_logs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def off_give_up(hook) -> None:
    with contextlib.suppress(ValueError):
        _give_up_hooks.remove(hook)


@contextlib.contextmanager
def stage(name: str, *, safe_points: bool):
    """The stage in progress: one without safe points is ended by a stop request where it is."""
    global _stage, _at_once
    previous = _stage, _at_once
    _stage, _at_once = name, not safe_points
    try:
        if _at_once and stop_requested():
            _raise_stop()
        yield
    finally:
        _stage, _at_once = previous


@contextlib.contextmanager
def polled():
    """A section that checks stop_requested() itself, because it must end what it started (a child process) before
    it leaves: a stop request does not raise inside it."""
    global _at_once
    previous = _at_once
    _at_once = False
    try:
        yield
    finally:
        _at_once = previous


def _raise_stop() -> None:
    from job.errors import Interrupted

    raise Interrupted(f"stopped by a signal during {_stage}; rerun to redo it (finished stages are kept)")


def _handle(signum, _frame) -> None:
    if _stop.is_set():
        _flush_logs()
        os._exit(EXIT_INTERRUPTED)
    # The same signal may have ended a child (a batch worker signalled by name): its end is reported where the job
    # waits for it, not by torch's SIGCHLD handler raising at whatever line runs, a checkpoint's write included.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _start_stopping(signal=signal.Signals(signum).name)
    if _at_once:  # signal handlers run in the main thread, between two bytecodes of what it was doing
        _raise_stop()


def request_stop(by: str) -> None:
    """A stop asked elsewhere (another rank's signal, learnt in a training step's vote): this process stops as if it
    had been signalled itself, so that it saves, records the run as interrupted and exits 75 with the others."""
    if not _stop.is_set():
        _start_stopping(signal=None, by=by)


def _start_stopping(**why) -> None:
    global _watchdog, _stopped_at
    _stopped_at = time.monotonic()
    _stop.set()
    log.warning("stop_requested", **why, grace_s=_grace_s, stage=_stage,
                action="stopping now, then exiting 75" if _at_once else "saving at the next safe point, then exiting 75")
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
    deadline = time.monotonic() + timeout if timeout else None
    pending_input = input_text
    with polled():
        return _wait(proc, what, deadline, timeout, pending_input, stop)


def _wait(proc, what, deadline, timeout, pending_input, stop):
    import subprocess

    from job.errors import ExternalError, Interrupted

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


def die_with_parent(parent: int) -> None:
    """In a child process of the job's: the kernel kills it when the job's process dies, even by SIGKILL, so that no
    child lives on writing into a run directory a retry may already hold (PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the call above took effect
        os._exit(1)
