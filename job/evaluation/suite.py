"""Prompt suites: reading one (a JSON file of prompts with their checks, where a check's settings may be a
separate JSON file beside the suite), checking it before any work, and writing a target's answers
(`eval/<target>.jsonl`) and `eval/summary.json`.

    {"prompts": [{"id": "reverse", "prompt": "Write ...", "checks": {"python_function": "checks/reverse.json"}}]}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.errors import SpecError
from job.evaluation import checks
from job.rundir import atomic_write_bytes, atomic_write_json, jsonl_line, read_json
from job.spec import EvaluateSpec

MAX_SUITE_BYTES = 16 * 1024 * 1024  # a suite or check file is text someone wrote: more is a mistake or an attack
MAX_PROMPTS = 10_000


def read_small_json(path: Path, what: str) -> Any:
    """A regular file of at most MAX_SUITE_BYTES, parsed as JSON. Raises SpecError naming `what` and the file."""
    from job.inputs import read_regular_file

    raw = read_regular_file(path, MAX_SUITE_BYTES, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"{what}: cannot read {path}: {exc}") from None


def check_files(evaluate: EvaluateSpec) -> list[Path]:
    """The suite file and the check files it names (what its content digest covers)."""
    if isinstance(evaluate.prompts, list):
        return []
    path = Path(evaluate.prompts)
    found = [path]
    try:
        data = read_small_json(path, "evaluate.prompts")
    except SpecError:
        return found
    raw = data.get("prompts") if isinstance(data, dict) else data
    for item in raw if isinstance(raw, list) else []:
        for settings in (item.get("checks") or {}).values() if isinstance(item, dict) and \
                isinstance(item.get("checks"), dict) else ():
            if isinstance(settings, str):
                found.append(path.parent / settings)
    return found


def load(evaluate: EvaluateSpec) -> list[dict[str, Any]]:
    """Prompts as [{id, prompt, checks}], each check's settings read from its file when it names one.

    Raises:
        SpecError: the suite (or a check file it names) is unreadable or malformed, naming it.
    """
    if isinstance(evaluate.prompts, list):
        items = [{"id": f"p{i}", "prompt": p, "checks": {}} for i, p in enumerate(evaluate.prompts)]
    else:
        path = Path(evaluate.prompts)
        data = read_small_json(path, "evaluate.prompts")
        raw = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"evaluate.prompts: {path} holds no 'prompts' list")
        if len(raw) > MAX_PROMPTS:
            raise SpecError(f"evaluate.prompts: {path} holds {len(raw)} prompts; at most {MAX_PROMPTS}")
        items = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise SpecError(f"evaluate.prompts: {path} prompt {i} has no 'prompt' text")
            configured = item.get("checks", {})
            if not isinstance(configured, dict):
                raise SpecError(f"evaluate.prompts: {path} prompt {i}: 'checks' is not an object")
            resolved = {}
            for name, settings in configured.items():
                if isinstance(settings, str):  # a check file beside the suite
                    settings = read_small_json(path.parent / settings, f"evaluate.prompts: prompt {i} check {name!r}")
                resolved[name] = settings
            items.append({"id": str(item.get("id", f"p{i}")), "prompt": item["prompt"], "checks": resolved})
    return items[: evaluate.num_prompts] if evaluate.num_prompts else items


def problems(evaluate: EvaluateSpec) -> list[str]:
    """Preflight: the suite reads, and every check it names is known and takes the settings given."""
    try:
        items = load(evaluate)
    except SpecError as exc:
        return [exc.message]
    found = []
    for item in items:
        for name, settings in item["checks"].items():
            if name not in checks.CHECKS:
                found.append(f"evaluate.prompts: prompt {item['id']}: unknown check {name!r} "
                             f"(known: {', '.join(sorted(checks.CHECKS))})")
                continue
            problem = checks.settings_problem(name, settings)
            if problem:
                found.append(f"evaluate.prompts: prompt {item['id']}: check {name!r} settings {settings!r}: {problem}")
    return found


def record(run_dir, target: str, suite: list[dict], answers: list[dict], code_checks: str) -> dict:
    """Checks the answers, writes `eval/<target>.jsonl` and the target's line of `eval/summary.json`."""
    by_id = {item["id"]: item for item in suite}
    for answer in answers:
        answer["checks"] = checks.run_all(answer["answer"], by_id.get(answer["id"], {}).get("checks", {}),
                                          prompt=answer["prompt"], stop_reason=answer.get("stop_reason"),
                                          code_checks=code_checks)
    payload = "".join(jsonl_line(a) for a in answers).encode()
    atomic_write_bytes(run_dir.eval_dir / f"{target}.jsonl", payload)
    summary = read_json(run_dir.eval_dir / "summary.json") or {"targets": {}}
    summary["targets"][target] = checks.summarize(answers)
    atomic_write_json(run_dir.eval_dir / "summary.json", summary)
    return summary["targets"][target]


def timing(answers: list[dict], load_s: float, generate_s: float) -> dict:
    """Where an evaluation's time went: loading the model, and generating (tokens per second over the batch)."""
    new_tokens = sum(len(a["token_ids"]) for a in answers)
    return {"load_s": round(load_s, 2), "generate_s": round(generate_s, 2), "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / generate_s, 1) if generate_s > 0 else None}


def agreement(reference: list[dict], answers: list[dict]) -> dict:
    """How far `answers` follow the `reference` answers token for token (greedy answers of two targets to the
    same prompts): the share answered identically, and where each pair parts (in tokens)."""
    parted = []
    for want, got in zip(reference, answers):
        a, b = want["token_ids"], got["token_ids"]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        parted.append(None if a == b else common)
    return {"identical": round(sum(p is None for p in parted) / max(len(parted), 1), 4),
            "parts_after_tokens": parted}


def annotate(run_dir, target: str, values: dict) -> None:
    """Adds `values` to a target's line of eval/summary.json."""
    summary = read_json(run_dir.eval_dir / "summary.json") or {"targets": {}}
    summary["targets"].setdefault(target, {}).update(values)
    atomic_write_json(run_dir.eval_dir / "summary.json", summary)
