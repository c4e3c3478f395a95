"""A stage's work in a child process of its own, started by the stage's `warm_up` while the job's process does
what only it can (imports unsloth, 10-15 s on a GPU machine): two interpreters overlap where two threads of one
would take turns on its lock. The child is peftopt itself (same code, same environment, the spec as resolved),
runs the stage's `run` and nothing else, and reports back on a pipe: its log events, which the job's process logs
as its own (stdout, events.jsonl, the console), then the stage's result or its error.

    with process.started("prepare", ctx) as child:   # in the stage's warm_up
        ...
        result = child.result()   # in the stage's run: its StageResult, its PeftoptError raised, or None

The child lives in a session of its own (a signal to the job's process group is the job's to handle) and dies
with the job's process (PR_SET_PDEATHSIG); ending the job ends it, and what it half wrote is scratch
(`*.tmp-<pid>`) that the job removes.

    python -m job.stages.process     # the child: a request on stdin, events and the result on stdout
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from job import errors, interrupt
from job.log import get_logger

log = get_logger("peftopt")

RESULT, ERROR, CRASH = "peftopt_stage_result", "peftopt_stage_error", "peftopt_stage_crash"
# Keys of a relayed event that the job's own processors set again (its logger, level and time).
_SET_AGAIN = ("level", "logger", "timestamp")


class Child:
    """A stage running in a child process; `result()` waits for it."""

    def __init__(self, stage: str, ctx):
        self.stage, self.run_dir = stage, ctx.run_dir
        request = {"stage": stage, "spec": ctx.spec.model_dump(mode="json"), "run_dir": str(ctx.run_dir.root),
                   "fingerprints": dict(ctx.fingerprints), "restart": ctx.restart, "parent": os.getpid()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "job.stages.process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**ctx.settings.child_env(), **ctx.settings.environ}, start_new_session=True)
        self.process.stdin.write(json.dumps(request).encode())
        self.process.stdin.close()
        self.outcome: dict[str, Any] | None = None
        self.reader = threading.Thread(target=self._relay, name=f"{stage}-child-events", daemon=True)
        self.reader.start()
        log.info("stage_ahead_started", stage=stage, pid=self.process.pid)

    def _relay(self) -> None:
        """Each line the child writes: an event, logged here as the job's own, or its outcome."""
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # only the child's JSON reaches this pipe (its library prints go to stderr)
            if not isinstance(message, dict):
                continue
            if RESULT in message or ERROR in message or CRASH in message:
                self.outcome = message
                continue
            event = message.pop("event", None)
            if not isinstance(event, str):
                continue
            level = logging.getLevelName(str(message.get("level", "info")).upper())
            name = message.get("logger") if isinstance(message.get("logger"), str) else "peftopt"
            fields = {k: v for k, v in message.items() if k not in _SET_AGAIN}
            get_logger(name).log(level if isinstance(level, int) else logging.INFO, event, **fields)

    def result(self):
        """The stage's StageResult; the child's PeftoptError raised here; None when the child ended without an
        outcome or with an unexpected error (logged: the stage then runs in the job's process)."""
        from job.stages.base import StageResult

        self.process.wait()
        self.reader.join()
        outcome = self.outcome or {}
        if RESULT in outcome:
            found = outcome[RESULT]
            return StageResult(artifacts=tuple(found["artifacts"]), metrics=found["metrics"],
                               keep_pending=bool(found["keep_pending"]))
        if ERROR in outcome:
            found = outcome[ERROR]
            kind = getattr(errors, str(found.get("type")), None)
            if not (isinstance(kind, type) and issubclass(kind, errors.PeftoptError)):
                kind = errors.PeftoptError
            raise kind(str(found.get("message")), details=found.get("details") or None)
        why = outcome.get(CRASH) or f"the child process ended with code {self.process.returncode} and no result"
        log.warning("stage_ahead_failed", stage=self.stage, error=str(why)[:2000],
                    action="the stage runs in the job's process")
        return None

    def close(self) -> None:
        """Ends the child if it still runs, and removes what it half wrote."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join(timeout=5)
        from job.rundir import _remove

        for folder in (self.run_dir.root, *(self.run_dir.root / entry for entry in ("data", "base"))):
            if folder.is_dir() and not folder.is_symlink():
                for entry in folder.iterdir():
                    if entry.name.endswith((f".tmp-{self.process.pid}", f".old-{self.process.pid}")):
                        _remove(entry)


@contextlib.contextmanager
def started(stage: str, ctx) -> Iterator[Child]:
    child = Child(stage, ctx)
    try:
        yield child
    finally:
        child.close()


def main() -> int:
    request = json.loads(sys.stdin.read())
    interrupt.die_with_parent(int(request["parent"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job's process decides when this ends
    from job import log as logs, settings as settings_module

    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")

    def send(message: dict) -> None:
        out.write(json.dumps(logs.mask(message), default=str) + "\n")
        out.flush()

    try:
        settings = settings_module.init()
        logs.configure(json_output=True, settings=settings)
        logs.keep_stdout_for_events()  # the events keep the pipe; libraries' prints go to stderr
        import structlog

        from job import stages as registry
        from job.rundir import RunDir
        from job.spec import JobSpec
        from job.stages.base import RunContext

        spec = JobSpec.model_validate(request["spec"])
        stage = registry.get(request["stage"])
        ctx = RunContext(spec=spec, run_dir=RunDir(Path(request["run_dir"])),
                         settings=settings, fingerprints=request["fingerprints"], restart=bool(request["restart"]))
        with structlog.contextvars.bound_contextvars(run=spec.name, stage=stage.name):
            result = stage.run(ctx)
        send({RESULT: {"artifacts": list(result.artifacts), "metrics": dict(result.metrics),
                       "keep_pending": result.keep_pending}})
    except errors.PeftoptError as exc:
        send({ERROR: {"type": type(exc).__name__, "message": exc.message, "details": exc.details}})
    except BaseException as exc:  # the stage runs again in the job's process, where it fails as it would have
        send({CRASH: f"{type(exc).__name__}: {exc}"})
    out.close()
    os._exit(0)  # the interpreter's teardown (torch's finalizers) is time nobody waits for


if __name__ == "__main__":
    sys.exit(main())
