"""The stage registry: every stage, in the order a run takes them. Each name is a module of this package that
declares `STAGE` (a job.stages.base.Stage); the runner, fingerprints, preflight, `--stages` and `--restart` all
read this list and those declarations, and nothing else names the stages.
"""
from __future__ import annotations

from functools import lru_cache

REGISTRY = (
    "prepare",
    "train",
    "merge",
    "gguf",
    "evaluate",
    "push",
)


@lru_cache(maxsize=None)
def all_stages() -> tuple:
    """Every registered stage, in run order. A stage may only need stages registered before it."""
    from job import declarations

    return declarations("job.stages", REGISTRY, "STAGE")


def names() -> tuple[str, ...]:
    return tuple(stage.name for stage in all_stages())


def get(name: str):
    return next(stage for stage in all_stages() if stage.name == name)


def enabled(spec) -> list:
    """The stages this spec asks for, in run order."""
    return [stage for stage in all_stages() if stage.enabled(spec)]


def needs(stage, spec) -> tuple[str, ...]:
    """The enabled stages `stage` uses the results of, for this spec."""
    on = {s.name for s in enabled(spec)}
    order = names()
    wanted = [name for name in stage.needs(spec) if name in on]
    for name in wanted:
        if order.index(name) >= order.index(stage.name):
            raise RuntimeError(f"stage {stage.name} needs {name}, which runs after it")
    return tuple(wanted)


def fingerprints(spec) -> dict[str, str]:
    """Each enabled stage's fingerprint: its inputs (fields and files by content) and the fingerprints of the
    stages it needs, so a change anywhere upstream changes every stage after it that uses it."""
    from job.fingerprint import digest

    prints: dict[str, str] = {}
    for stage in enabled(spec):
        prints[stage.name] = digest({**stage.inputs(spec), "upstream": [prints[n] for n in needs(stage, spec)]})
    return prints


def downstream(name: str, spec) -> list[str]:
    """The enabled stages that use `name`'s result, directly or through others, in run order."""
    hit = {name}
    for stage in enabled(spec):
        if set(needs(stage, spec)) & hit:
            hit.add(stage.name)
    return [stage.name for stage in enabled(spec) if stage.name in hit and stage.name != name]
