"""Tasks for a method trained on rewards (train.method grpo): prompts with the checks a right answer passes, kept
as trl's GRPOTrainer takes them: the conversational prompt (which the trainer renders with the chat template and
samples answers to), and the columns its reward functions receive (`checks`: the task's declared checks as JSON
text; `reference`: the expected answer, which a check without a value compares against).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

from job import methods
from job.errors import DataError
from job.rundir import jsonl_line
from job.spec import JobSpec


def prompt_ids(tokenizer, prompt: list[dict], row: int) -> list[int]:
    """The prompt's token ids as the trainer renders it (the chat template with its generation prompt), by the
    guarded renderer (job/render.py).

    Raises:
        DataError: the chat template fails on this row, or outruns its time or memory.
    """
    from job import render

    result = render.chat(tokenizer, [{"messages": prompt, "add_generation_prompt": True}])[0]
    if "error" in result:
        raise DataError(f"model.chat_template: rendering data row {row} {render.why(result)}")
    return tokenizer(result["text"], add_special_tokens=False)["input_ids"]


def encode_tasks(examples: Iterable[dict], tokenizer, spec: JobSpec, origin=None,
                 sink=None) -> tuple[list[dict], dict]:
    """The tasks, with the counts prepare reports: the prompts' tokens (an answer's are not known before it is
    sampled), none trainable ahead of sampling. A prompt that leaves no room for a whole answer within
    model.max_seq_length (train.max_completion_length tokens) is skipped. With a `sink` (a text file) each kept task
    is written to it as a JSON line instead of returned.

    Raises:
        DataError: a task has no checks and train.rewards names none, so nothing would reward its answers
            (data.bad_rows 'skip' drops it instead).
    """
    method = methods.get(spec.train.method)
    room = spec.model.max_seq_length - method.value(spec.train, "max_completion_length")
    rewarded_anyway = bool(method.value(spec.train, "rewards"))
    counts: dict[str, Any] = {"skipped": Counter(), "truncated": 0, "tokens": 0, "trainable_tokens": 0,
                              "rows_by_source": Counter(), "trainable_by_source": Counter()}
    kept = []
    for index, example in enumerate(examples):
        if not rewarded_anyway and not json.loads(example["checks"]):
            if spec.data.bad_rows != "skip":
                raise DataError(f"data row {index}: the task has no checks ('assert') and train.rewards names none, "
                                "so nothing rewards its answers; give it checks, add train.rewards, or set "
                                "data.bad_rows='skip'")
            counts["skipped"]["no checks to reward"] += 1
            continue
        tokens = len(prompt_ids(tokenizer, example["prompt"], index))
        broken = spec.data.length_rule_broken(tokens)
        if broken:
            counts["skipped"][broken] += 1
            continue
        if tokens > room:
            counts["skipped"]["no room for an answer within model.max_seq_length"] += 1
            continue
        source = origin[index] if origin is not None else 0
        counts["tokens"] += tokens
        counts["rows_by_source"][source] += 1
        if sink is not None:
            sink.write(jsonl_line(example))
        else:
            kept.append(example)
    return kept, counts
