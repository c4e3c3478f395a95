"""What a stage is: one `Stage` declaration per stage module, read by the runner, fingerprints, preflight and
the CLI (job/stages/__init__.py holds the registry). A stage declares what it reads (spec fields, and files by
their content), which stages it needs, what it writes in the run directory, how it is checked before any
work, and how it runs. A plain dataclass, not a framework: adding a stage is one module and one registry line.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Mapping

from job.rundir import RunDir
from job.settings import Settings
from job.spec import JobSpec


@dataclass(frozen=True)
class RunContext:
    """Everything a stage's `run` gets: the resolved spec, the run directory, the settings, and this run's
    stage fingerprints (the train stage marks checkpoints with its own)."""
    spec: JobSpec
    run_dir: RunDir
    settings: Settings
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    dry_run: bool = False
    restart: bool = False
    warm: dict[str, Any] = field(default_factory=dict)  # what each stage's `warm_up` started, by stage name
    # Set by the runner when a stage is done in this job (run now, or found finished): work a warm_up started
    # waits on these for the results it needs.
    done: defaultdict[str, threading.Event] = field(default_factory=lambda: defaultdict(threading.Event))


@dataclass(frozen=True)
class StageResult:
    """What a stage made: its artifacts (paths relative to the run directory), its figures (`metrics.json`
    under the stage's name), and whether it stays to do (a dry run)."""
    artifacts: tuple[str, ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)
    keep_pending: bool = False


@dataclass(frozen=True)
class CheckScope:
    """Where preflight looks: `peftopt run` checks everything on this machine; `peftopt validate` only the files
    shipped beside the jobspec (under `spec_dir`), machine-independently."""
    spec_dir: Path | None = None

    @property
    def machine(self) -> bool:
        return self.spec_dir is None

    def covers(self, path: str | None) -> bool:
        if not path or not path.startswith("/"):
            return False
        return self.spec_dir is None or Path(path).resolve().is_relative_to(self.spec_dir.resolve())


def _no_needs(spec: JobSpec) -> tuple[str, ...]:
    return ()


def _reads_nothing(spec: JobSpec) -> dict[str, Any]:
    return {}


def _no_problems(spec: JobSpec, scope: CheckScope) -> list[str]:
    return []


def _imports_nothing(ctx: RunContext) -> None:
    return None


@contextlib.contextmanager
def _nothing_ahead(ctx: RunContext) -> Iterator[None]:
    yield None


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str  # one line: what it does (the README's stage table says the same)
    enabled: Callable[[JobSpec], bool]
    run: Callable[[RunContext], StageResult]
    fields: tuple[str, ...] = ()  # dotted spec fields its result depends on
    # Fields added later: counted only when set, so that the results of specs written before them stay finished.
    fields_when_set: tuple[str, ...] = ()
    reads: Callable[[JobSpec], dict[str, Any]] = _reads_nothing  # the files it reads, by content digest
    needs: Callable[[JobSpec], tuple[str, ...]] = _no_needs  # stages whose results it uses
    artifacts: tuple[str, ...] = ()  # run-directory entries it owns: removed when it is redone
    check: Callable[[JobSpec, CheckScope], list[str]] = _no_problems  # problems found before any work
    all_ranks: bool = False  # data-parallel: every rank joins this stage (the others run only these)
    # It saves as it goes and checks for a stop request at safe points (train's checkpoints). Every other stage is
    # ended by a stop request where it is, and redone by the rerun (job/interrupt.py).
    safe_points: bool = False
    # Work started when the job starts, so that it is ready by the stage's turn (a tool's process importing its
    # libraries while training runs): a context manager the runner holds for the whole job, whose value the stage
    # finds in `ctx.warm[name]`, and which ends what the stage did not use.
    warm_up: Callable[[RunContext], ContextManager[Any]] = _nothing_ahead
    # Libraries this stage needs imported in the job's process before any later stage imports others (unsloth
    # patches transformers, trl and peft at import): called right after the stage's warm_up, also when its work
    # is already finished (later stages run on what it patched), so that the earlier stages' warm-ups (prepare's
    # child process) overlap it. Raises MachineError when the library cannot load here and nothing else would do.
    imports: Callable[[RunContext], None] = _imports_nothing

    def inputs(self, spec: JobSpec) -> dict[str, Any]:
        """The values and file digests this stage's result depends on (upstream fingerprints aside)."""
        from job.fingerprint import dotted

        data = spec.model_dump(mode="json")
        fields = {key: dotted(data, key) for key in self.fields}
        fields.update({key: value for key in self.fields_when_set if (value := dotted(data, key)) is not None})
        return {"fields": fields, "files": self.reads(spec)}
