"""Prepare data: read conversations, standardize roles, apply the chat template, mask non-assistant tokens.

Writes `data/train.jsonl` (and `data/eval.jsonl` when the spec holds some rows out): one row per
conversation with `input_ids` and, when training on responses only, `assistant_masks`, which trl turns
into labels. The base model is made local first when it is a GGUF (see modelsrc).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
from collections import Counter
from typing import Any, Iterable

import numpy as np

from job import data as conversations_in
from job import modelsrc, preference, tasks, templates
from job.errors import DataError, SpecError
from job.fingerprint import file_digest
from job.log import counted, get_logger
from job.rundir import atomic_dir, jsonl_line
from job.spec import JobSpec, local_data_format
from job.stages.base import CheckScope, RunContext, Stage, StageResult

log = get_logger("peftopt.prepare")


def enabled(spec: JobSpec) -> bool:
    return spec.data is not None or modelsrc.needs_local_copy(spec)


def reads(spec: JobSpec) -> dict[str, Any]:
    """The data files, the chat-template file and the base model's config and tokenizer, by content."""
    out: dict[str, Any] = {"base": modelsrc.source_digest(spec)}
    if spec.data:
        out["data"] = [file_digest(s.source) if local_data_format(s.source) else None
                       for s in spec.data.all_sources()]
    if spec.model.chat_template.endswith(".jinja"):
        out["chat_template"] = file_digest(spec.model.chat_template)
    return out


def check(spec: JobSpec, scope: CheckScope) -> list[str]:
    """The base model, a chat-template file, and each local data file with its first rows.

    Raises:
        DataError: a malformed row among the first ones (exit 3), when the files themselves are sound.
    """
    problems = modelsrc.problems(spec) if scope.machine else []
    if spec.model.chat_template.endswith(".jinja") and scope.covers(spec.model.chat_template):
        problems += templates.file_problems(spec.model.chat_template)
    readable = []
    for index, source in enumerate(spec.data.all_sources() if spec.data else []):
        where = "data.source" if spec.data.source is not None else f"data.sources[{index}]"
        if not scope.covers(source.source):
            continue
        if os.path.isfile(source.source):
            readable.append((source, where))
        else:
            problems.append(f"{where}: {source.source} does not exist")
    if not problems:
        for source, where in readable:
            conversations_in.check_rows(spec, source, where)
    return problems


def run(ctx: RunContext) -> StageResult:
    child = ctx.warm.get("prepare")
    if child is not None:  # started by warm_up in a process of its own; None: it failed, and the work is done here
        result = child.result()
        if result is not None:
            return result
    return prepare(ctx)


def prepare(ctx: RunContext) -> StageResult:
    from job import render

    render.start()  # the template renderer's imports, while the tokenizer loads
    spec, run_dir = ctx.spec, ctx.run_dir
    facts: dict[str, Any] = {}
    if modelsrc.needs_local_copy(spec) and not (run_dir.base_dir / "config.json").exists():
        facts["base"] = modelsrc.materialize_gguf_base(spec, run_dir, ctx.settings)
    if spec.data is None:  # an evaluation-only run (T0) needs only the base model
        return StageResult(artifacts=("base",) if modelsrc.needs_local_copy(spec) else (), metrics=facts)
    location = modelsrc.model_location(spec, run_dir)
    tokenizer, template_name = modelsrc.load_tokenizer(location, spec)
    gguf_refused(spec, location, tokenizer)
    data = spec.data
    line_cap = conversations_in.max_line_chars(spec)
    rows_by_source = [conversations_in.iter_rows(s.source, s.split, line_cap, s.config) for s in data.all_sources()]
    if data.source is not None and data.num_samples is not None:
        rows_by_source[0] = itertools.islice(rows_by_source[0], data.num_samples)
    chosen, origin, per_source = conversations_in.mixture(spec, rows_by_source)
    parts = split_rows(chosen, origin, spec)
    asked = hold_out_questions(parts, spec)
    family = conversations_in.family(spec)
    encode = {"chat": encode_rows, "task": tasks.encode_tasks}.get(family, preference.encode_examples)
    stats: dict[str, Any] = {"rows_read": sum(f["rows_read"] for f in per_source), "chat_template": template_name,
                             "examples": family}
    with atomic_dir(run_dir.data_dir) as out:
        for part, (part_rows, part_origin) in parts.items():
            if part == "eval" and not part_rows:
                continue
            with open(out / f"{part}.jsonl", "w", encoding="utf-8") as sink:
                _, counts = encode(part_rows, tokenizer, spec, part_origin, sink=sink)
            rows = sum(counts["rows_by_source"].values())
            if part == "train" and not rows:
                raise DataError(f"data: no usable training rows out of {len(part_rows)} "
                                f"(skipped: {dict(counts['skipped'])})")
            stats[part] = {
                "rows": rows, "skipped": dict(counts["skipped"]), "truncated": counts["truncated"],
                "tokens": counts["tokens"], "trainable_tokens": counts["trainable_tokens"],
            }
            if part == "train":
                for index, figures in enumerate(per_source):
                    figures.update(train_rows=counts["rows_by_source"][index],
                                   trainable_tokens=counts["trainable_by_source"][index])
        stats["sources"] = per_source
        if asked is not None:
            with open(out / "suite.jsonl", "w", encoding="utf-8") as sink:
                sink.writelines(jsonl_line(item) for item in asked[0])
            stats["suite"] = {"rows": len(asked[0]), "not_askable": asked[1]}
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info("data_prepared", **{k: v for k, v in stats.items() if k not in ("chat_template", "examples")})
    artifacts = ["data/train.jsonl"] + (["data/eval.jsonl"] if "eval" in stats else []) + \
        (["data/suite.jsonl"] if asked is not None else [])
    if modelsrc.needs_local_copy(spec):
        artifacts.append("base")
    return StageResult(artifacts=tuple(artifacts), metrics={**facts, **stats})


@contextlib.contextmanager
def warm_up(ctx: RunContext):
    """The whole stage in a child process (job/stages/process.py) while the job's process imports the training
    backend (train's `imports`), when PEFTOPT_PREPARE_AHEAD says so: on a GPU by default (unsloth's import is
    10-15 s there, and the machine has cores to spare)."""
    if not ahead(ctx):
        yield None
        return
    from job.stages import process

    with process.started("prepare", ctx) as child:
        yield child


def ahead(ctx: RunContext) -> bool:
    from job import backends, distributed

    setting = ctx.settings.prepare_ahead
    if setting == "0" or ctx.dry_run or distributed.active(ctx.settings):
        return False
    return setting == "1" or (ctx.spec.train is not None and backends.device(ctx.spec) == "cuda")


STAGE = Stage(
    name="prepare",
    doc="reads the data (local files, Hub data sets, mixtures), applies the chat template, masks all but the "
        "assistant's replies; makes a GGUF base trainable",
    enabled=enabled, run=run, check=check, reads=reads, warm_up=warm_up,
    fields=("model.base", "model.chat_template", "model.max_seq_length", "data", "train.seed", "train.method",
            "evaluate.from_data"),
    artifacts=("data", "base"),
)


def split_rows(chosen, origin, spec: JobSpec) -> dict[str, tuple[Any, Any]]:
    """{"train": (examples, source of each), "eval": (...)}: the held-out rows are a seeded fraction of the data,
    or (one source) another slice of it."""
    eval_split = spec.data.eval_split
    if eval_split is None:
        return {"train": (chosen, origin), "eval": ([], [])}
    if isinstance(eval_split, float):
        order = list(range(len(chosen)))
        random.Random(spec.train.seed if spec.train else 0).shuffle(order)
        held = np.zeros(len(chosen), dtype=bool)
        held[order[: max(1, int(len(chosen) * eval_split))]] = True
        del order
        keep, out = np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()
        return {"train": (chosen.subset(keep), [origin[i] for i in keep]),
                "eval": (chosen.subset(out), [origin[i] for i in out])}
    source = spec.data.all_sources()[0]
    held_out = spec.model_copy(update={"data": spec.data.model_copy(update={"split": eval_split})})
    rows, _, _ = conversations_in.mixture(held_out, [conversations_in.iter_rows(
        source.source, eval_split, conversations_in.max_line_chars(spec), source.config)])
    return {"train": (chosen, origin), "eval": (rows, [0] * len(rows))}


def gguf_refused(spec: JobSpec, location: str, tokenizer) -> None:
    """A GGUF the pinned converter would refuse for the base's tokenizer (a BPE pre-tokenizer newer than the pin)
    refused now, before training, instead of after it.

    Raises:
        SpecError: it would be refused (naming export.tokenizer_pre).
    """
    from pathlib import Path

    from job import llamacpp
    from job.errors import MachineError

    if not (spec.export and spec.export.gguf) or spec.export.tokenizer_pre:
        return
    try:
        tools = llamacpp.find()
    except MachineError:  # a machine that prepares and trains only; the gguf stage's own check names the tools
        return
    problem = llamacpp.pre_tokenizer_problem(tools, Path(location), tokenizer)
    if problem:
        raise SpecError(problem)


def held_out_tasks(rows, held: list[int], spec: JobSpec) -> tuple[list[dict], int]:
    """Held-out tasks as suite items: the prompt asked, scored by the task's own checks and the train.rewards every
    answer was rewarded by (evaluate.from_data's checks only when the spec gives them); a task whose prompt has
    turns a suite cannot ask (tool turns) is not askable."""
    from job import methods
    from job.evaluation import checks

    wanted = spec.evaluate.from_data
    every = [checks.weighed_check(d) for d in methods.get(spec.train.method).value(spec.train, "rewards")]
    extra = wanted.assert_ if "assert_" in wanted.model_fields_set else []
    items, not_askable = [], 0
    named = [rows[index].get("id") for index in held]
    for index in held:
        task = rows[index]
        ident = task.get("id") if task.get("id") and named.count(task.get("id")) == 1 else f"row{index}"
        if not all(m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                   for m in task["prompt"]):
            not_askable += 1
            continue
        items.append({"id": ident, "messages": task["prompt"],
                      "reference": task.get("reference"),
                      "assert": json.loads(task["checks"]) + every + list(extra)})
    return items, not_askable


def hold_out_questions(parts: dict, spec: JobSpec) -> tuple[list[dict], int] | None:
    """`evaluate.from_data`: a seeded choice of training rows taken out of `parts["train"]` (in place) and made
    into suite items: the conversation up to its last assistant reply is asked, that reply is the reference.
    Returns (items, rows chosen that could not be asked: no user turn before a text reply), or None."""
    wanted = spec.evaluate.from_data if spec.evaluate else None
    if wanted is None:
        return None
    rows, origin = parts["train"]
    count = wanted.rows if wanted.rows is not None else max(1, int(len(rows) * wanted.fraction))
    if count >= len(rows):
        raise DataError(f"evaluate.from_data: holding {count} rows out leaves none of the {len(rows)} training "
                        "rows to train on")
    order = list(range(len(rows)))
    random.Random(wanted.seed).shuffle(order)
    held = sorted(order[:count])
    items, not_askable = [], 0
    if conversations_in.family(spec) == "task":
        items, not_askable = held_out_tasks(rows, held, spec)
    for index in held if conversations_in.family(spec) != "task" else ():
        messages = rows[index]
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant" or \
                messages[-2].get("role") != "user" or not all(isinstance(m.get("content"), str) and m.get("role") in
                                                              ("system", "user", "assistant") for m in messages):
            not_askable += 1
            continue
        items.append({"id": f"row{index}", "messages": messages[:-1], "reference": messages[-1]["content"],
                      "assert": wanted.assert_})
    if not items:
        raise DataError("evaluate.from_data: none of the rows held out ends in a user turn answered by an assistant "
                        "text reply, so there is nothing to ask")
    keep = sorted(set(range(len(rows))) - set(held))
    parts["train"] = (rows.subset(keep), [origin[i] for i in keep])
    return items, not_askable


# ----------------------------------------------------------------------------------------- encoding


def raw_text_spans(example: dict, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """A text example with no chat template: BOS, the text (or the prompt and its completion), EOS so the model
    learns to stop; every character but BOS trained (a prompt's are not)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    if "text" in example:
        return bos + example["text"] + eos, [(len(bos), len(bos) + len(example["text"]) + len(eos))]
    prompt, completion = example["text_prompt"], example["text_completion"]
    start = len(bos) + len(prompt)
    return bos + prompt + completion + eos, [(start, start + len(completion) + len(eos))]


def assistant_char_spans(batch: list, tokenizer, first_row: int = 0) -> list[tuple[str, list[tuple[int, int]]]]:
    """Each conversation rendered, with each assistant reply found by rendering growing prefixes of it, by the
    guarded renderer (job/render.py); a raw-text example: `raw_text_spans`.

    Raises:
        DataError: the template takes longer than its time or more than its memory for a row, fails on it, or hides
            turns (naming the row).
    """
    from job import render

    chats = [i for i, example in enumerate(batch) if not (isinstance(example, dict) and "messages" not in example)]
    items = [{"messages": batch[i]["messages"], "tools": batch[i]["tools"]} if isinstance(batch[i], dict)
             else {"messages": batch[i]} for i in chats]
    rendered = dict(zip(chats, render.chat(tokenizer, [{**item, "spans": True} for item in items])))
    out = []
    for index, example in enumerate(batch):
        if index not in rendered:
            out.append(raw_text_spans(example, tokenizer))
            continue
        result = rendered[index]
        if "error" in result:
            if result["error"] == "prefix":
                raise DataError("model.chat_template: the template does not render conversations prefix by "
                                "prefix, so assistant turns cannot be located; use a built-in template")
            raise DataError(f"model.chat_template: rendering data row {first_row + index} {render.why(result)}")
        out.append((result["text"], [tuple(span) for span in result["spans"]]))
    return out


def encode_rows(conversations: Iterable, tokenizer, spec: JobSpec, origin=None, sink=None,
                chunk: int = 1024) -> tuple[list[dict], dict]:
    """Tokenizes standardized conversations with the chat template and masks everything but the assistant's
    replies; applies data.min_tokens / max_tokens (else truncates to model.max_seq_length). Counts per source.
    A chunk at a time: with a `sink` (a text file) each encoded row is written to it as a JSON line and none is
    kept, so memory does not grow with the data; without one they are returned.

    Raises:
        DataError: the tokenizer cannot give offsets, the template hides assistant turns, or nothing trains.
        SpecError: a row has tools and the chat template cannot render them.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("model.base: the tokenizer has no fast (Rust) version; assistant masking needs offsets")
    data = spec.data
    counts: dict[str, Any] = {"skipped": Counter(), "truncated": 0, "tokens": 0, "trainable_tokens": 0,
                              "rows_by_source": Counter(), "trainable_by_source": Counter()}
    encoded: list[dict] = []
    renders_tools = None
    rows = iter(counted(conversations, "prepare", "rows") if sink is not None else conversations)  # a run's, not inspect's
    for first in itertools.count(0, chunk):
        batch = list(itertools.islice(rows, chunk))
        if not batch:
            break
        with_tools = next((i for i, c in enumerate(batch) if isinstance(c, dict) and "tools" in c), None)
        if with_tools is not None:
            renders_tools = templates.renders_tools(tokenizer) if renders_tools is None else renders_tools
            if not renders_tools:
                raise SpecError(f"model.chat_template: data row {first + with_tools} has a tools list, and the chat "
                                f"template ({getattr(tokenizer, 'template_name', spec.model.chat_template)}) does not "
                                "render tools or tool calls; use 'chatml' or a tokenizer template that does")
        rendered = assistant_char_spans(batch, tokenizer, first)
        for offset, (ids, starts, spans) in enumerate(_tokenize(tokenizer, rendered, first_row=first)):
            index = first + offset
            raw = isinstance(batch[offset], dict) and "messages" not in batch[offset]  # their spans count
            broken = data.length_rule_broken(len(ids))
            if broken:
                counts["skipped"][broken] += 1
                continue
            if data.train_on_responses_only or raw:
                inside = np.zeros(len(starts), dtype=bool)
                for a, b in spans:
                    inside |= (starts >= a) & (starts < b)
                mask = inside.astype(int).tolist()
            else:
                mask = [1] * len(ids)
            if len(ids) > spec.model.max_seq_length:
                ids, mask = ids[: spec.model.max_seq_length], mask[: spec.model.max_seq_length]
                counts["truncated"] += 1
            if not any(mask):
                counts["skipped"]["nothing to learn after truncation"] += 1
                continue
            source = origin[index] if origin is not None else 0
            counts["tokens"] += len(ids)
            counts["trainable_tokens"] += sum(mask)
            counts["rows_by_source"][source] += 1
            counts["trainable_by_source"][source] += sum(mask)
            row = {"input_ids": ids, "assistant_masks": mask} if data.train_on_responses_only or raw \
                else {"input_ids": ids}
            if sink is not None:
                sink.write(json.dumps(row, separators=(",", ":")) + "\n")
            else:
                encoded.append(row)
    if counts["tokens"] and counts["trainable_tokens"] == 0:
        raise DataError("data: every label is masked; nothing to learn (check train_on_responses_only)")
    return encoded, counts


def _failing(tokenizer, texts: list[str]) -> int:
    """Which of `texts` the tokenizer fails on (the first)."""
    for index, text in enumerate(texts):
        try:
            tokenizer([text], add_special_tokens=False)
        except BaseException as exc:
            if modelsrc.tokenizer_failure(exc):
                return index
            raise
    return 0


def _tokenize(tokenizer, rendered: list[tuple[str, list]], batch: int = 1024, first_row: int = 0):
    """(ids, start offset of each token, assistant spans) per conversation, tokenized a batch at a time on
    every core. The tokenizers library reads TOKENIZERS_PARALLELISM at each call (a write for it): on for
    these calls, off again after, as unsloth and the Makefile set it, because processes forked later (the
    converter, data-loader workers) deadlock in a thread pool that was used before the fork."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # a write for tokenizers
    try:
        for first in range(0, len(rendered), batch):
            chunk = rendered[first:first + batch]
            try:
                enc = tokenizer([text for text, _ in chunk], add_special_tokens=False, return_offsets_mapping=True)
            except BaseException as exc:  # the base's tokenizer.json failing inside its own regex engine
                if not modelsrc.tokenizer_failure(exc):
                    raise
                row = first_row + first + _failing(tokenizer, [text for text, _ in chunk])
                raise DataError(f"data row {row}: the base's tokenizer fails on it ({str(exc).splitlines()[0][:200]}: "
                                "a regex of its tokenizer.json); use another base or tokenizer") from None
            for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], chunk):
                starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
                yield ids, starts, spans
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a write for tokenizers, before later forks
