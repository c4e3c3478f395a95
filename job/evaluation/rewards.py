"""Rewards for a method trained on tasks (train.method grpo): the declared checks of the evaluation (checks.py)
scoring the answers the trainer sampled, as trl's GRPOTrainer calls a reward function.

    "checks"       each task's own `assert` checks: the share of them an answer passes (None for a task without
                   checks: trl leaves it out of that answer's weighted sum)
    train.rewards  one function per entry: 1.0 when the answer passes that check, 0.0 when not

A check that runs the answer's code (`python`) runs in the sandbox (sandbox.py), never in the job's process; those
of one batch run side by side, each in its own process under its own time limit, and one that does not finish in
time fails (0). Where the sandbox cannot isolate code, a reward that needs it stops the job before the first step
(ExternalError) instead of training on missing rewards.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from job.errors import ExternalError
from job.evaluation import checks

CODE_TYPES = ("python", "not-python")


def answer_text(completion: Any) -> str:
    """The text of one sampled answer: trl gives a conversational prompt's answer as [{"role": "assistant",
    "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


class Timing:
    """Seconds spent scoring answers (all reward functions), for the split of a step's time."""

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds


class Reward:
    """One reward function. trl names it by `__name__` in its logs (`rewards/<name>/mean`)."""

    def __init__(self, name: str, declared: dict | None, timing: Timing, workers: int):
        self.__name__ = name
        self.declared = declared  # None: each task's own checks
        self.timing = timing
        self.workers = workers

    def _checks_of(self, row_checks: str | None) -> list[dict]:
        if self.declared is not None:
            return [checks.weighed_check(self.declared)]
        return json.loads(row_checks) if row_checks else []

    def __call__(self, prompts, completions, checks: list | None = None, reference: list | None = None,
                 log_metric=None, **_) -> list[float | None]:
        started = time.perf_counter()
        n = len(completions)
        row_checks = checks if checks is not None else [None] * n
        references = reference if reference is not None else [None] * n
        work = [(answer_text(c), self._checks_of(rc), ref) for c, rc, ref in zip(completions, row_checks, references)]
        runs_code = any(d["type"] in CODE_TYPES for _, declared, _ in work for d in declared)
        if runs_code and self.workers > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=min(self.workers, n)) as pool:
                results = list(pool.map(lambda item: _score(*item), work))
        else:
            results = [_score(*item) for item in work]
        skipped = next((r["skipped"] for rs in results for r in rs if r.get("skipped")), None)
        if skipped:
            raise ExternalError(f"train.rewards: a check that runs the answer's code cannot run here ({skipped}); "
                                "GRPO needs every reward")
        if log_metric is not None:
            for kind, rate in pass_rates(results).items():
                log_metric(f"checks/{kind}", rate)
        self.timing.add(time.perf_counter() - started)
        return [share(r) for r in results]


def _score(answer: str, declared: list[dict], reference: str | None) -> list[dict]:
    return [checks.run_assertion(d, answer, reference=reference, code_checks="sandboxed") for d in declared]


def share(results: list[dict]) -> float | None:
    """The share of the checks that ran which passed; None when none ran."""
    ran = [r for r in results if r.get("passed") is not None]
    return sum(bool(r["passed"]) for r in ran) / len(ran) if ran else None


def pass_rates(results: list[list[dict]]) -> dict[str, float]:
    """Each check type's pass rate over a batch's answers."""
    by_kind: dict[str, list[bool]] = {}
    for answer in results:
        for result in answer:
            if result.get("passed") is not None:
                by_kind.setdefault(str(result.get("type")), []).append(bool(result["passed"]))
    return {kind: sum(passed) / len(passed) for kind, passed in by_kind.items()}


def functions(rewards: list[dict], timing: Timing, workers: int | None = None) -> list[Reward]:
    """The reward functions of a spec: each task's own checks first, then one per train.rewards entry (trl's
    reward_weights follow the same order: job/methods/grpo.py)."""
    workers = workers or min(8, os.cpu_count() or 1)
    made = [Reward("checks", None, timing, workers)]
    names = {"checks"}
    for number, declared in enumerate(rewards):
        name = str(declared["type"])
        if name in names:
            name = f"{name}_{number}"
        names.add(name)
        made.append(Reward(name, declared, timing, workers))
    return made
