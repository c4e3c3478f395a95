"""Everything a jobspec names, checked before any work starts: each stage that will run declares its own check
(job/stages/), and every problem of every stage is reported at once.

`peftopt validate` runs the part that does not depend on the machine: files named relative to the jobspec
(shipped beside it). `peftopt run` runs all of it for the stages it will run.
"""
from __future__ import annotations

from pathlib import Path

from job import stages as registry
from job.errors import DataError, MachineError, SpecError
from job.spec import JobSpec
from job.stages.base import CheckScope


def check(spec: JobSpec, stage_names: list[str], *, spec_dir: Path | None = None) -> None:
    """Checks what the named stages will need. With `spec_dir` (validate), only files shipped beside the jobspec.

    Raises:
        SpecError: every problem with the spec's inputs, listed (exit 2).
        MachineError: the spec is sound but this machine lacks a tool it needs (exit 4).
        DataError: a data row among the first ones is malformed (exit 3), when the rest is sound.
    """
    scope = CheckScope(spec_dir)
    problems: list[str] = []
    machine: MachineError | None = None
    bad_row: DataError | None = None
    for stage in registry.all_stages():
        if stage.name not in stage_names:
            continue
        try:
            problems += stage.check(spec, scope)
        except MachineError as exc:
            machine = machine or exc
        except DataError as exc:
            bad_row = bad_row or exc
    if scope.machine and {"train", "evaluate"} & set(stage_names):
        from job.backends import machine as this_machine

        try:
            this_machine.check(spec)
        except MachineError as exc:
            machine = machine or exc
    problems = list(dict.fromkeys(problems))  # a check several stages share reports once
    if problems:
        raise SpecError(problems[0] if len(problems) == 1 else f"{len(problems)} problems with the jobspec's inputs",
                        details=problems if len(problems) > 1 else None)
    if machine is not None:
        raise machine
    if bad_row is not None:
        raise bad_row
