"""Prepare data: read conversations, standardize roles, apply the chat template, mask non-assistant tokens.

Writes `data/train.jsonl` (and `data/eval.jsonl` when the spec holds some rows out): one row per
conversation with `input_ids` and, when training on responses only, `assistant_masks`, which trl turns
into labels. The base model is made local first when it is a GGUF (see modelsrc).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from job import modelsrc
from job.errors import DataError, ExternalError
from job.log import get_logger
from job.rundir import RunDir, atomic_dir
from job.spec import JobSpec, LOCAL_DATA_SUFFIXES

log = get_logger("peftopt.prepare")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "bot": "assistant", "system": "system"}


class BadRow(ValueError):
    """A row that breaks the conversation rules; the message says how."""


def run(spec: JobSpec, run_dir: RunDir, ctx) -> dict:
    facts: dict[str, Any] = {}
    if modelsrc.needs_local_copy(spec) and not (run_dir.base_dir / "config.json").exists():
        facts["base"] = modelsrc.materialize_gguf_base(spec, run_dir)
    if spec.data is None:  # an evaluation-only run (T0) needs only the base model
        return {"artifacts": ["base"] if modelsrc.needs_local_copy(spec) else [], "metrics": facts}
    tokenizer, template_name = modelsrc.load_tokenizer(modelsrc.model_location(spec, run_dir), spec)
    rows = read_rows(spec.data.source, spec.data.split)
    if spec.data.num_samples is not None:
        rows = rows[: spec.data.num_samples]
    train_rows, eval_rows = split_rows(rows, spec.data.eval_split, spec)
    stats: dict[str, Any] = {"rows_read": len(rows), "chat_template": template_name}
    with atomic_dir(run_dir.data_dir) as out:
        for part, part_rows in (("train", train_rows), ("eval", eval_rows)):
            if part == "eval" and not part_rows:
                continue
            encoded, counts = encode_rows(part_rows, tokenizer, spec)
            if part == "train" and not encoded:
                raise DataError(f"data.source: no usable training rows out of {len(part_rows)} "
                                f"(skipped: {dict(counts['skipped'])})")
            write_jsonl(out / f"{part}.jsonl", encoded)
            stats[part] = {
                "rows": len(encoded), "skipped": dict(counts["skipped"]), "truncated": counts["truncated"],
                "tokens": counts["tokens"], "trainable_tokens": counts["trainable_tokens"],
            }
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("data_prepared", **{k: v for k, v in stats.items() if k != "chat_template"})
    artifacts = ["data/train.jsonl"] + (["data/eval.jsonl"] if "eval" in stats else [])
    if modelsrc.needs_local_copy(spec):
        artifacts.append("base")
    return {"artifacts": artifacts, "metrics": {**facts, **stats}}


# ------------------------------------------------------------------------------------------ reading


def _slice(rows: list, split: str) -> list:
    match = re.match(r"^[^\[]+\[(-?\d+%?)?:(-?\d+%?)?\]$", split)
    if not match:
        return rows

    def bound(text):
        if text is None:
            return None
        if text.endswith("%"):
            return int(len(rows) * int(text[:-1]) / 100)
        return int(text)

    return rows[bound(match.group(1)): bound(match.group(2))]


def read_rows(source: str, split: str) -> list[dict]:
    """Raises DataError for an unreadable local file; ExternalError when a Hub data set cannot be had."""
    if source.endswith(LOCAL_DATA_SUFFIXES):
        return _slice(read_local(Path(source)), split)
    from job import hub

    try:
        import datasets

        return list(hub.retrying(f"download data set {source}", lambda: datasets.load_dataset(source, split=split)))
    except (OSError, ConnectionError, FileNotFoundError, ValueError) as exc:
        raise ExternalError(f"data.source: cannot load {source!r} split {split!r} from the Hub: "
                            f"{str(exc).splitlines()[0]}") from None


def read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data.source: {path} does not exist")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data.source: {path} is not UTF-8 (byte {exc.start})") from None
    except Exception as exc:  # pyarrow raises its own types for a corrupt file
        raise DataError(f"data.source: cannot read {path}: {exc}") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"data.source: {path} line {number + 1}: invalid JSON: {exc.msg}") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data.source: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"data.source: {path} must hold a JSON list of conversations")
    return data


def split_rows(rows: list, eval_split, spec: JobSpec) -> tuple[list, list]:
    if eval_split is None:
        return rows, []
    if isinstance(eval_split, float):
        order = list(range(len(rows)))
        random.Random(spec.train.seed if spec.train else 0).shuffle(order)
        n_eval = max(1, int(len(rows) * eval_split))
        held = set(order[:n_eval])
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
    return rows, read_rows(spec.data.source, eval_split)


# ------------------------------------------------------------------------------------ standardizing


def standardize(row: Any, fmt: str, system_prompt: str | None) -> list[dict]:
    """One conversation as [{role, content}], system first; raises BadRow naming what is wrong."""
    if not isinstance(row, dict):
        raise BadRow(f"not an object but {type(row).__name__}")
    if fmt in ("sharegpt", "auto") and "conversations" in row:
        turns, role_key, text_key = row["conversations"], "from", "value"
    elif fmt in ("openai", "auto") and "messages" in row:
        turns, role_key, text_key = row["messages"], "role", "content"
    else:
        want = {"sharegpt": "'conversations'", "openai": "'messages'"}.get(fmt, "'conversations' or 'messages'")
        raise BadRow(f"no {want} field (has: {', '.join(map(str, row)) or 'nothing'})")
    if not isinstance(turns, list) or not turns:
        raise BadRow("the conversation is empty or not a list")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {number} is not an object")
        role = ROLE_ALIASES.get(str(turn.get(role_key, turn.get("role", turn.get("from")))).lower())
        content = turn.get(text_key, turn.get("content", turn.get("value")))
        if role is None:
            raise BadRow(f"turn {number} has no known role ({role_key}={turn.get(role_key)!r})")
        if not isinstance(content, str):
            raise BadRow(f"turn {number} content is {type(content).__name__}, not text")
        if not content.strip():
            raise BadRow(f"turn {number} ({role}) is empty")
        messages.append({"role": role, "content": content})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for number, message in enumerate(body):
        expected = "user" if number % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRow(f"turn {number + len(messages) - len(body)} is {message['role']!r} where "
                         f"{expected!r} was expected (roles must alternate user/assistant)")
    if not any(m["role"] == "assistant" for m in body):
        raise BadRow("no assistant turn to learn from")
    return messages


# ----------------------------------------------------------------------------------------- encoding


def assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Renders the conversation and finds each assistant reply by rendering growing prefixes of it."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise DataError("model.chat_template: the template does not render conversations prefix by "
                            "prefix, so assistant turns cannot be located; use a built-in template")
        spans.append((len(before), len(through)))
    return full, spans


def encode_rows(rows: Iterable, tokenizer, spec: JobSpec) -> tuple[list[dict], dict]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("model.base: the tokenizer has no fast (Rust) version; assistant masking needs offsets")
    data = spec.data
    counts: dict[str, Any] = {"skipped": Counter(), "truncated": 0, "tokens": 0, "trainable_tokens": 0}
    encoded = []
    for index, row in enumerate(rows):
        try:
            messages = standardize(row, data.format, data.system_prompt)
        except BadRow as exc:
            if data.bad_rows == "error":
                raise DataError(f"data row {index}: {exc} (set data.bad_rows='skip' to drop such rows)") from None
            counts["skipped"][str(exc).split(" (")[0] if "turn" not in str(exc) else "malformed turn"] += 1
            continue
        text, spans = assistant_char_spans(messages, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        mask = [int(any(a <= start < b for a, b in spans)) if data.train_on_responses_only else 1
                for start, _ in offsets]
        if len(ids) > spec.model.max_seq_length:
            ids, mask = ids[: spec.model.max_seq_length], mask[: spec.model.max_seq_length]
            counts["truncated"] += 1
        if not any(mask):
            counts["skipped"]["nothing to learn after truncation"] += 1
            continue
        counts["tokens"] += len(ids)
        counts["trainable_tokens"] += sum(mask)
        encoded.append({"input_ids": ids, "assistant_masks": mask} if data.train_on_responses_only
                       else {"input_ids": ids})
    if encoded and counts["trainable_tokens"] == 0:
        raise DataError("data: every label is masked; nothing to learn (check train_on_responses_only)")
    return encoded, counts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
