"""`peftopt inspect SPEC [--rows N]`: the first rows of the spec's data as the model will see them, the tokens that
count towards the loss marked, with the counts `data_prepared` reports for them: check the masking before
renting a GPU (axolotl's `preprocess --debug` is the model).

Rows go through prepare's own code (job/data.py, job/stages/prepare.py, job/preference.py) with a tokenizer made
from the base's `tokenizer.json` by the `tokenizers` library and the chat template the spec picks, rendered in
transformers' sandboxed Jinja: no torch, no model, a few seconds.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from job import data as data_module
from job import modelsrc, preference, tasks, templates
from job.display import for_terminal, one_line
from job.errors import SpecError
from job.spec import JobSpec


class TextTokenizer:
    """The part of a transformers fast tokenizer prepare uses, over `tokenizers` alone: encode with offsets,
    decode, special tokens, and the chat template (rendered by job/render.py, as for a run)."""

    is_fast = True

    def __init__(self, directory: Path, spec: JobSpec):
        from tokenizers import Tokenizer

        path = modelsrc.source_file(directory, "tokenizer.json")
        if path is None:
            raise SpecError(f"inspect: {directory} has no tokenizer.json (a SentencePiece-only or GGUF base: run "
                            "`peftopt run SPEC --stages prepare` and look at data/train.jsonl instead)")
        self.backend = Tokenizer.from_file(str(path))
        config_path = modelsrc.source_file(directory, "tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path else {}

        def token(name):
            value = config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token, self.eos_token = token("bos_token"), token("eos_token")
        self.pad_token = token("pad_token") or self.eos_token
        own = config.get("chat_template")
        jinja = modelsrc.source_file(directory, "chat_template.jinja")
        if own is None and jinja is not None:
            own = jinja.read_text(encoding="utf-8")
        model_type = None
        config_file = modelsrc.source_file(directory, "config.json")
        if config_file is not None:
            model_type = json.loads(config_file.read_text()).get("model_type")
        self.template_name, self.chat_template = templates.choose(spec.model.chat_template, own, model_type)

    def __call__(self, texts, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        single = isinstance(texts, str)
        encodings = self.backend.encode_batch([texts] if single else list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        out: dict[str, Any] = {"input_ids": ids[0] if single else ids}
        if return_offsets_mapping:
            offsets = [e.offsets for e in encodings]
            out["offset_mapping"] = offsets[0] if single else offsets
        return out

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def base_directory(spec: JobSpec) -> Path:
    """The local directory of the base's tokenizer (a Hub base: its cached snapshot)."""
    kind = modelsrc.source_kind(spec.model.base)
    if kind == "dir":
        return Path(modelsrc.checked_model_dir(spec.model.base))
    if kind == "run":
        return Path(modelsrc.checked_model_dir(modelsrc.earlier_run(spec) / "merged", links=False))
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(spec.model.base, allow_patterns=["*.json", "*.jinja"], local_files_only=True)
        except Exception:
            raise SpecError(f"inspect: {spec.model.base} is not in the local Hub cache; download it once "
                            "(or name a local model directory with --set model.base=DIR)") from None
        return Path(modelsrc.checked_model_dir(snapshot))
    raise SpecError(f"inspect: model.base {spec.model.base!r} is not there; name a local model directory with "
                    "--set model.base=DIR")


def base_tokenizer(spec: JobSpec) -> TextTokenizer:
    """The base's tokenizer with the spec's template. A GGUF or package base is built once into the machine's base
    cache (job/basecache.py, as a run does) and its tokenizer files read from there."""
    if modelsrc.source_kind(spec.model.base) in ("gguf", "package"):
        import tempfile

        from job import settings

        with tempfile.TemporaryDirectory(prefix="peftopt-inspect-") as scratch:
            modelsrc.cached_base_files(spec, settings.get(), Path(scratch), modelsrc.TOKENIZER_FILES + ("config.json",))
            return TextTokenizer(Path(scratch), spec)
    return TextTokenizer(base_directory(spec), spec)


def marked(tokenizer: TextTokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """The tokens decoded, the trained runs wrapped (green on a terminal, «…» elsewhere)."""
    out, run, trained = [], [], None
    for token, counts in zip(ids, mask):
        if trained is not None and bool(counts) != trained:
            out.append((trained, tokenizer.decode(run)))
            run = []
        run.append(token)
        trained = bool(counts)
    if run:
        out.append((trained, tokenizer.decode(run)))
    open_mark, close_mark = ("\x1b[1;32m", "\x1b[0m") if color else ("«", "»")
    return "".join(f"{open_mark}{for_terminal(text)}{close_mark}" if trained else for_terminal(text)
                   for trained, text in out)


def rows(spec: JobSpec, count: int, color: bool) -> tuple[list[str], dict]:
    """(the printed rows, the counts prepare reports for them)."""
    from job.stages import prepare

    if spec.data is None:
        raise SpecError("inspect: the spec has no data section")
    tokenizer = base_tokenizer(spec)
    source = spec.data.all_sources()[0]
    raw = list(itertools.islice(data_module.iter_rows(source.source, source.split,
                                                      data_module.max_line_chars(spec), source.config), count))
    first = spec.model_copy(update={"data": spec.data.model_copy(update={"sources": None, "source": source.source,
                                                                       "num_samples": None, "eval_split": None,
                                                                       "split": source.split, "format": source.format,
                                                                       "columns": source.columns, "config": source.config,
                                                                       "system_prompt": source.system_prompt
                                                                       or spec.data.system_prompt})})
    examples, _, figures = data_module.mixture(first, [raw])
    family = data_module.family(spec)
    printed = []
    if family == "chat":
        encoded, counts = prepare.encode_rows(examples, tokenizer, first)
        for index, row in enumerate(encoded):
            mask = row.get("assistant_masks", [1] * len(row["input_ids"]))
            printed.append(f"--- row {index}: {len(row['input_ids'])} tokens, {sum(mask)} trained ---\n"
                           + marked(tokenizer, row["input_ids"], mask, color))
    elif family == "task":
        kept, counts = tasks.encode_tasks(examples, tokenizer, first)
        for index, task in enumerate(kept):
            ids = tasks.prompt_ids(tokenizer, task["prompt"], index)
            checks = json.loads(task["checks"])
            parts = [f"--- row {index} (task, {len(ids)} prompt tokens; answers are sampled while training) ---",
                     marked(tokenizer, ids, [0] * len(ids), color),
                     "  [checks] " + (one_line(json.dumps(checks, ensure_ascii=False)) if checks else
                                      "none of its own (train.rewards)")]
            if task.get("reference") is not None:
                parts.append(f"  [reference] {one_line(task['reference'][:300])}")
            printed.append("\n".join(parts))
    else:
        kept, counts = preference.encode_examples(examples, tokenizer, first)
        for index, example in enumerate(kept):
            ids = preference.tokenized(example, tokenizer, index)
            parts = [f"--- row {index} ({'pair' if 'chosen' in ids else 'unpaired, label ' + str(example['label'])}) ---",
                     marked(tokenizer, ids["prompt"], [0] * len(ids["prompt"]), color)]
            for key in ("chosen", "rejected", "completion"):
                if key in ids:
                    parts.append(f"  [{key}, {len(ids[key])} tokens] " + marked(tokenizer, ids[key], [1] * len(ids[key]),
                                                                              color))
            printed.append("\n".join(parts))
    summary = {"rows_read": len(raw[:count]), "rows": counts["rows_by_source"][0], "skipped": dict(counts["skipped"]),
               "truncated": counts["truncated"], "tokens": counts["tokens"],
               "trainable_tokens": counts["trainable_tokens"], "chat_template": tokenizer.template_name,
               "examples": family, "source": source.source, "skipped_before_encoding": figures[0]["skipped"]}
    return printed, summary
