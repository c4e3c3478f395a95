"""Prompt suites: reading one (a JSON or JSONL file of items, each a prompt or a conversation with its declared
checks and expected answer; the seed's named checks may keep their settings in a JSON file beside the suite),
checking it before any work, and writing a target's answers (`eval/<target>.jsonl`) and `eval/summary.json`.

    {"id": "minutes", "prompt": "How many minutes is 3 hours?", "reference": "180 minutes",
     "assert": [{"type": "number", "value": 180}, {"type": "icontains", "value": "minutes"}]}
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


ITEM_SHAPE = ('{"id"?: text, "prompt": text | "messages": [{"role", "content"}, ...], "assert"?: [{"type", '
              '"value"?, ...}], "reference"?: text, "checks"?: {name: settings}}')


def read_small_json(path: Path, what: str) -> Any:
    """A regular file of at most MAX_SUITE_BYTES, parsed as JSON. Raises SpecError naming `what` and the file."""
    from job.inputs import read_regular_file

    raw = read_regular_file(path, MAX_SUITE_BYTES, what)
    try:
        return json.loads(raw.decode("utf-8-sig"))  # -sig: without the BOM some editors write
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"{what}: cannot read {path}: {exc}") from None


def read_suite_file(path: Path) -> list:
    """The items of a suite file: JSON (a list, or an object with a "prompts" list) or JSONL (an item a line)."""
    from job.inputs import read_regular_file

    if path.suffix.lower() not in (".json", ".jsonl"):
        raise SpecError(f"evaluate.prompts: {path.name} is neither .json nor .jsonl: a suite is a JSON list of items "
                        f"(or of prompts) or a .jsonl file, one item a line: {ITEM_SHAPE}")
    if path.suffix.lower() != ".jsonl":
        data = read_small_json(path, "evaluate.prompts")
        raw = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"evaluate.prompts: {path} holds no 'prompts' list (a JSON suite is a list of items, or "
                            f"{{\"prompts\": [...]}}; an item is {ITEM_SHAPE})")
        return raw
    text = read_regular_file(path, MAX_SUITE_BYTES, "evaluate.prompts")
    items = []
    for number, line in enumerate(text.decode("utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except (ValueError, RecursionError) as exc:
            raise SpecError(f"evaluate.prompts: {path} line {number} is not JSON ({str(exc).split(':')[0]}); each "
                            f"line is one item: {ITEM_SHAPE}") from None
    if not items:
        raise SpecError(f"evaluate.prompts: {path} holds no items (one a line: {ITEM_SHAPE})")
    return items


def check_files(evaluate: EvaluateSpec) -> list[Path]:
    """The suite file and the check files it names (what its content digest covers)."""
    if not isinstance(evaluate.prompts, str):
        return []
    path = Path(evaluate.prompts)
    found = [path]
    try:
        raw = read_suite_file(path)
    except SpecError:
        return found
    for item in raw:
        for settings in (item.get("checks") or {}).values() if isinstance(item, dict) and \
                isinstance(item.get("checks"), dict) else ():
            if isinstance(settings, str):
                found.append(path.parent / settings)
    return found


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' is a non-empty list of {\"role\", \"content\"}"
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("role") not in ("system", "user", "assistant"):
            return "each message is {\"role\": system|user|assistant, \"content\": text}"
    if messages[-1]["role"] != "user":
        return "the last message is the user's (the model answers it)"
    return None


def item_from(raw: Any, where: str, base: Path | None = None) -> dict[str, Any]:
    """One suite item as the stages use it: {id, prompt (the text shown and checked for echoes), messages
    (None: the prompt as one user message), assert, reference, checks}.

    Raises:
        SpecError: the item is not of the suite's shape, saying which part and what is expected.
    """
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: an item is {ITEM_SHAPE}")
    keys = ("id", "prompt", "messages", "assert", "reference", "checks", "description")
    unknown = [k for k in raw if k not in keys]
    if unknown:
        import difflib

        meant = {str(k): close[0] for k in unknown if (close := difflib.get_close_matches(str(k), keys, 1, 0.75))}
        hint = "; did you mean " + ", ".join(f"{v!r} for {k!r}" for k, v in meant.items()) + "?" if meant else ""
        raise SpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}{hint} An item is {ITEM_SHAPE}")
    messages = raw.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list)
                                          for m in messages):
        from job.shapes import BadRow, text_of_parts

        try:  # content parts, as in the training data: their text joined
            messages = [{**m, "content": text_of_parts(m["content"], f"message {i}")}
                        if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                        for i, m in enumerate(messages)]
        except BadRow as exc:
            raise SpecError(f"{where}: {exc}") from None
    if messages is not None:
        problem = _messages_problem(messages)
        if problem:
            raise SpecError(f"{where}: {problem}")
        prompt = messages[-1]["content"]
    elif isinstance(raw.get("prompt"), str):
        prompt = raw["prompt"]
    else:
        raise SpecError(f"{where}: has no 'prompt' text (or 'messages'); an item is {ITEM_SHAPE}")
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise SpecError(f"{where}: 'reference' is the expected answer's text")
    declared = raw.get("assert", [])
    if not isinstance(declared, list):
        raise SpecError(f"{where}: 'assert' is a list of checks, each {{\"type\": ..., \"value\": ...}}")
    configured = raw.get("checks", {})
    if not isinstance(configured, dict):
        raise SpecError(f"{where}: 'checks' is an object of named checks")
    resolved = {}
    for name, settings in configured.items():
        if isinstance(settings, str) and base is not None:  # a check file beside the suite
            settings = read_small_json(base / settings, f"{where} check {name!r}")
        resolved[name] = settings
    return {"id": str(raw.get("id", "")), "prompt": prompt, "messages": messages, "assert": declared,
            "reference": reference, "checks": resolved}


def load(evaluate: EvaluateSpec, run_dir=None) -> list[dict[str, Any]]:
    """The suite's items (see item_from): the spec's prompts or suite file, then the rows `evaluate.from_data`
    held out of the training data (prepare's `data/suite.jsonl`, when a run directory is given).

    Raises:
        SpecError: the suite (or a check file it names) is unreadable or malformed, naming it.
    """
    items, found = _spec_items(evaluate)
    if found:
        raise SpecError(found[0])
    items = items[: evaluate.num_prompts] if evaluate.num_prompts else items
    if run_dir is not None and evaluate.from_data is not None:
        from job.rundir import read_jsonl

        held = read_jsonl(run_dir.own(run_dir.data_dir / "suite.jsonl"))
        taken = {item["id"] for item in items}
        for i, row in enumerate(held):
            item = item_from(row, f"data/suite.jsonl row {i}")
            if item["id"] in taken:  # a held-out row's id is its own; the suite's may be the same text
                item["id"] = f"data:{item['id']}"
            items.append(item)
    return items


def _spec_items(evaluate: EvaluateSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """The items of the spec's prompts or suite file, and the problem of each that is not an item and of each
    id that names two (an id names its item's answers in eval/ and the report).

    Raises:
        SpecError: the suite file is unreadable, or holds more than MAX_PROMPTS items.
    """
    if isinstance(evaluate.prompts, list):
        raw, where, base = evaluate.prompts, "evaluate.prompts[{}]", None
    elif evaluate.prompts is not None:
        path = Path(evaluate.prompts)
        raw, where, base = read_suite_file(path), f"evaluate.prompts: {path.name} item {{}}", path.parent
        if len(raw) > MAX_PROMPTS:
            raise SpecError(f"evaluate.prompts: {path} holds {len(raw)} prompts; at most {MAX_PROMPTS}")
    else:
        return [], []
    items, found, seen = [], [], {}
    for i, entry in enumerate(raw):
        try:
            item = item_from(entry, where.format(i), base)
        except SpecError as exc:
            found.append(exc.message)
            continue
        item["id"] = item["id"] or f"p{i}"
        if item["id"] in seen:
            found.append(f"{where.format(i)}: id {item['id']!r} is also item {seen[item['id']]}'s; each item's id "
                         "names its answers in eval/ and the report")
        seen.setdefault(item["id"], i)
        items.append(item)
    return items, found


def problems(evaluate: EvaluateSpec) -> list[str]:
    """Preflight: the suite reads, and every check it names is known and takes the settings given."""
    try:
        items, found = _spec_items(evaluate)
    except SpecError as exc:
        return [exc.message]
    for item in items:
        for name, settings in item["checks"].items():
            if name not in checks.CHECKS:
                found.append(f"evaluate.prompts: prompt {item['id']}: unknown check {name!r} "
                             f"(known: {', '.join(sorted(checks.CHECKS))})")
                continue
            problem = checks.settings_problem(name, settings)
            if problem:
                found.append(f"evaluate.prompts: prompt {item['id']}: check {name!r} settings {settings!r}: {problem}")
        for k, declared in enumerate(item["assert"]):
            problem = checks.assertion_problem(declared, item["reference"])
            if problem:
                found.append(f"evaluate.prompts: prompt {item['id']}: assert[{k}]: {problem}")
    if evaluate.from_data is not None:
        for k, declared in enumerate(evaluate.from_data.assert_):
            problem = checks.assertion_problem(declared, None, each_row=True)
            if problem:
                found.append(f"evaluate.from_data.assert[{k}]: {problem}")
    return found[:50]


def record(run_dir, target: str, suite: list[dict], answers: list[dict], code_checks: str) -> dict:
    """Checks the answers, writes `eval/<target>.jsonl` and the target's line of `eval/summary.json`."""
    by_id = {item["id"]: item for item in suite}
    for answer in answers:
        item = by_id.get(answer["id"], {})
        answer.update(checks.run_all(answer["answer"], item, prompt=answer["prompt"],
                                     stop_reason=answer.get("stop_reason"), code_checks=code_checks))
        if item.get("reference") is not None:
            answer["reference"] = item["reference"]
        if item.get("assert"):
            answer["declared"] = item["assert"]
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
