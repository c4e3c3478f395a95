"""Conversations in: reading a data source (a local .json/.jsonl/.parquet file or a Hub dataset), checking and
standardizing each row into [{role, content}], and mixing several sources (`data.sources`) into one training
set, reproducibly by seed, with exact duplicates across sources removed and counted.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import tempfile
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from job import shapes, templates
from job.errors import DataError, ExternalError, SpecError
from job.rundir import jsonl_line
from job.shapes import BadRow
from job.spec import DataSourceSpec, JobSpec, local_data_format


class Unparsable:
    """A line of a data file that could not become a row (invalid JSON, nested too deeply, too long): kept in
    its place so that the bad-row policy (error naming it, or skip and count) applies to it like any row."""

    def __init__(self, reason: str):
        self.reason = reason


def max_row_chars(spec: JobSpec) -> int:
    """The most characters a row's text may hold before rendering: more is cut (and counted), since training
    keeps only model.max_seq_length tokens of it anyway."""
    return spec.data.max_row_chars or max(65536, 64 * spec.model.max_seq_length)


def max_line_chars(spec: JobSpec) -> int:
    """The longest data-file line parsed at all (JSON of that size is still cheap to parse); a longer one is a
    bad row."""
    return max(64 << 20, 16 * max_row_chars(spec))


def _parse_line(line: str, number: int, max_bytes: int):
    if len(line) > max_bytes:
        return Unparsable(f"line {number}: longer than {max_bytes:,} characters")
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return Unparsable(f"line {number}: invalid JSON: {exc.msg}")
    except RecursionError:
        return Unparsable(f"line {number}: nested too deeply")


# ------------------------------------------------------------------------------------------ reading


def _bounds(split: str, total: int | None) -> tuple[int, int | None] | None:
    """(start, stop) of a split like 'train[2:50]' or 'train[:10%]' (percentages need the total); None when the
    split names no slice."""
    match = re.match(r"^[^\[]+\[(-?\d+%?)?:(-?\d+%?)?\]$", split)
    if not match:
        return None

    def bound(text, default):
        if text is None:
            return default
        value = int(total * int(text[:-1]) / 100) if text.endswith("%") else int(text)
        return max(value + total, 0) if value < 0 else value

    return bound(match.group(1), 0), bound(match.group(2), total)


def _needs_total(split: str) -> bool:
    return "%" in split or "-" in split


def iter_rows(source: str, split: str, max_line_chars: int = 1 << 28, config: str | None = None) -> Iterator:
    """The rows of a source, one at a time, so that prepare's memory does not grow with the data: a local file
    is read as it is consumed (a .json list, which cannot be, whole), a Hub data set from its memory-mapped
    Arrow cache. A slice in the split ('train[2:50]', 'train[:10%]') applies to a local file too. `config` names
    the Hub data set's configuration (data.config).

    Raises:
        DataError: an unreadable local file (when called; a bad byte further in, when reached).
        ExternalError: a Hub data set cannot be had.
        SpecError: its card has no such config, or several and none named.
    """
    if local_data_format(source):
        path = Path(source)
        rows = iter_local(path, max_line_chars)
        bounds = _bounds(split, sum(1 for _ in iter_local(path, max_line_chars)) if _needs_total(split) else None)
        return rows if bounds is None else itertools.islice(rows, bounds[0], bounds[1])
    from job import hub

    data_files = hub_data_files(source, split, config)
    try:
        import datasets

        return iter(hub.retrying(f"download data set {source}", lambda: datasets.load_dataset(
            source, config, split=split, data_files=data_files)))
    except (OSError, ConnectionError, FileNotFoundError, ValueError) as exc:
        raise ExternalError(f"data.source: cannot load {source!r} split {split!r} from the Hub: "
                            f"{str(exc).splitlines()[0]}") from None


CARD_LIMIT = 1 << 20  # a data set card's bytes read at most (its YAML header names the data files)


def hub_data_files(repo: str, split: str, config_name: str | None = None) -> dict[str, list[str]] | None:
    """The files of a Hub data set's `split` as its card's `configs` name them, checked to be the repo's own and
    resolved against the repo's file list; None when the card names none (datasets then picks from the repo's own
    files by their names). A card may not make the job read anything else: datasets takes `data_files` patterns
    from it as they are, and an absolute path (a mounted secret), a URL (a metadata endpoint) or an hf:// path into
    another repo (read with the job's token) would all become training rows.

    Raises:
        DataError: the card names a file outside the repo, or a pattern that matches none of its files (exit 3).
        ExternalError: the Hub cannot be reached.
        SpecError: data.config names a config the card lacks, or none is named where the card has no default.
    """
    import fnmatch

    from job import hub

    api = hub.api(None)
    files = hub.retrying(f"list the files of data set {repo}",
                         lambda: api.list_repo_files(repo, repo_type="dataset"))
    card = hub.retrying(f"read the card of data set {repo}", lambda: _download_card(api, repo)) \
        if "README.md" in files else ""
    config = _card_config(repo, card, config_name)
    if config is None:
        return None
    split_name = split.split("[", 1)[0]
    prefix = config.get("data_dir") or ""
    if _outside_repo(prefix):  # datasets reads a config's data_dir as given, with data_files or without
        raise DataError(f"data.source: data set {repo}'s card names data_dir {_short(str(prefix))!r}, which is not a "
                        "folder of the repo (absolute, a URL, another repo or '..'); only the repo's own files are read")
    patterns = _split_patterns(repo, config, split_name)
    if patterns is None:
        return None
    chosen: list[str] = []
    for pattern in patterns:
        full = f"{prefix.rstrip('/')}/{pattern}" if prefix else pattern
        if not isinstance(pattern, str) or _outside_repo(pattern) or _outside_repo(prefix):
            raise DataError(f"data.source: data set {repo}'s card names data file {_short(full)!r} for split "
                            f"{split_name!r}, which is not a file of the repo (absolute, a URL, another repo or "
                            "'..'); only the repo's own files are read")
        matched = sorted(f for f in files if fnmatch.fnmatchcase(f, full))
        if not matched:
            raise DataError(f"data.source: data set {repo}'s card names data file {_short(full)!r} for split "
                            f"{split_name!r}, which matches none of the repo's files")
        chosen += [f for f in matched if f not in chosen]
    return {split_name: chosen}


def _download_card(api, repo: str) -> str:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo, "README.md", repo_type="dataset", endpoint=api.endpoint)
    with open(path, "rb") as fh:
        return fh.read(CARD_LIMIT).decode("utf-8", errors="replace")


def _card_config(repo: str, card: str, name: str | None = None) -> dict | None:
    """The card's config named `name` (data.config), or the one `load_dataset(repo)` takes: the one marked default,
    else 'default', else the only one."""
    import yaml

    configs = None
    if card.startswith("---"):
        try:
            meta = yaml.safe_load(card[3:].split("\n---", 1)[0])
        except yaml.YAMLError as exc:
            raise DataError(f"data.source: data set {repo}'s card has an unreadable YAML header: "
                            f"{_short(str(exc).splitlines()[0])}") from None
        configs = meta.get("configs") if isinstance(meta, dict) else None
    if not configs:
        if name is not None:
            raise SpecError(f"data.config: data set {repo}'s card declares no configs ({name!r} asked); leave "
                            "data.config out")
        return None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise DataError(f"data.source: data set {repo}'s card has a 'configs' entry that is not a list of mappings")
    names = ", ".join(_short(str(c.get("config_name"))) for c in configs[:8]) + (", ..." if len(configs) > 8 else "")
    if name is not None:
        chosen = [c for c in configs if c.get("config_name") == name]
        if not chosen:
            raise SpecError(f"data.config: data set {repo} has no config {name!r} (it has: {names})")
        return chosen[0]
    marked = [c for c in configs if c.get("default") is True]
    named = [c for c in configs if c.get("config_name") == "default"]
    if marked or named or len(configs) == 1:
        return (marked or named or configs)[0]
    raise SpecError(f"data.config: data set {repo} has several configs and none is the default: name one with "
                    f"data.config (it has: {names})")


def _split_patterns(repo: str, config: dict, split_name: str) -> list | None:
    data_files = config.get("data_files")
    if data_files is None:
        return None
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                    and isinstance(data_files[0], dict)):
        entries = [{"split": "train", "path": data_files}]  # one set of files: the train split
    elif isinstance(data_files, list):
        entries = data_files
    elif isinstance(data_files, dict):
        entries = [{"split": k, "path": v} for k, v in data_files.items()]
    else:
        raise DataError(f"data.source: data set {repo}'s card has data_files of an unknown shape")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("split") == split_name:
            path = entry.get("path")
            return [path] if isinstance(path, str) else list(path or [])
    raise DataError(f"data.source: data set {repo} has no split {split_name!r} in its card's config "
                    f"(it has: {', '.join(_short(str(e.get('split'))) for e in entries if isinstance(e, dict))})")


def _outside_repo(pattern: str) -> bool:
    return (not isinstance(pattern, str) or pattern.startswith(("/", "~", "\\")) or "://" in pattern
            or ":" in pattern.split("/", 1)[0] or ".." in re.split(r"[/\\]", pattern))


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def read_rows(source: str, split: str, max_line_chars: int = 1 << 28) -> list:
    """iter_rows as a list (for a few rows, or tests)."""
    return list(iter_rows(source, split, max_line_chars))


def _table_rows(path: Path, max_field_chars: int) -> Iterator:
    """A CSV or TSV file with a header row, each row a dict of strings; a row with more or fewer fields than the
    header, or a field over the limit, is an Unparsable in its place."""
    import csv

    csv.field_size_limit(max_field_chars)
    with _open_text(path, newline="") as fh:
        delimiter = "\t" if local_data_format(path.name) == ".tsv" else ","
        reader = csv.reader(_bounded_lines(fh, max_field_chars), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield Unparsable(f"line {reader.line_num}: {exc}")
                continue
            if not fields:
                continue
            if len(fields) != len(header):
                yield Unparsable(f"line {reader.line_num}: {len(fields)} fields where the header has {len(header)}")
                continue
            yield dict(zip(header, fields))


def _open_text(path: Path, newline: str | None = None):
    """A data file opened as UTF-8 text, a .gz one decompressed as it is read; -sig: without the byte-order mark
    that spreadsheets and some editors write."""
    if path.name.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _bounded_lines(fh, limit: int) -> Iterator[str]:
    """The file's lines, one longer than `limit` characters cut to limit + 1 and the rest of it read past in
    pieces: no line is held whole beyond the limit, whatever a compressed file decompresses to."""
    while line := fh.readline(limit + 1):
        if len(line) > limit and not line.endswith("\n"):
            while (rest := fh.readline(1 << 20)) and not rest.endswith("\n"):
                pass
        yield line


def _jsonl_rows(path: Path, max_line_chars: int) -> Iterator:
    with _open_text(path) as fh:
        for number, line in enumerate(_bounded_lines(fh, max_line_chars)):
            if line.strip():
                yield _parse_line(line, number + 1, max_line_chars)


def _parquet_rows(path: Path) -> Iterator:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _json_rows(path: Path, max_chars: int) -> list:
    """A .json file's list of rows (or the list under its "data"); a compressed one is read to `max_chars`
    characters at most, as nothing on the disk bounds what it decompresses to."""
    compressed = path.name.lower().endswith(".gz")
    with _open_text(path) as fh:
        text = fh.read(max_chars + 1) if compressed else fh.read()
    if compressed and len(text) > max_chars:
        raise DataError(f"data.source: {path} decompresses to more than {max_chars:,} characters, the most a .json "
                        "list is read whole to; write it as .jsonl (a row a line, streamed)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data.source: {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"data.source: {path}: nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"data.source: {path} must hold a JSON list of conversations")
    return data


def iter_local(path: Path, max_line_chars: int = 1 << 28) -> Iterator:
    """The rows of a local file as they are read; a line that cannot become a row is an `Unparsable` in its
    place.

    Raises:
        DataError: the file is missing or not a regular file (when called); it is not UTF-8, or (.json,
            .parquet) does not parse (when called for .json, else when reached).
    """
    from job.inputs import regular_file_problem

    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"data.source: {path} {problem}")
    form = local_data_format(path.name)
    if form == ".json":  # a JSON list is read whole
        return iter(list(_guarded(path, lambda: iter(_json_rows(path, max_line_chars)))))
    make = {".jsonl": lambda: _jsonl_rows(path, max_line_chars), ".csv": lambda: _table_rows(path, max_line_chars),
            ".tsv": lambda: _table_rows(path, max_line_chars), ".parquet": lambda: _parquet_rows(path)}[form]
    return _guarded(path, make)


def _guarded(path: Path, make) -> Iterator:
    """The rows `make()` yields, with a decoding or parsing failure as a DataError naming the file."""
    try:
        yield from make()
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"data.source: {path} is not UTF-8 (byte {exc.start} of a block)") from None
    except Exception as exc:  # pyarrow raises its own types for a corrupt file
        raise DataError(f"data.source: cannot read {path}: {exc}") from None


def read_local(path: Path, max_line_chars: int = 1 << 28) -> list:
    """iter_local as a list."""
    return list(iter_local(path, max_line_chars))


# ------------------------------------------------------------------------------------ standardizing


def family(spec: JobSpec) -> str:
    """What the spec's training method consumes: chat rows, preference pairs, or unpaired examples."""
    return shapes.FAMILY[spec.train.method if spec.train else "sft"]


MAX_ROW_DEPTH = 64  # a conversation with tool schemas is a dozen levels deep; the recursive code after it has limits


def nesting_depth(value: Any, stop: int) -> int:
    """How deep lists and dicts nest in `value`, counted without recursion, up to `stop` + 1."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > stop:
                return depth
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def standardize(row: Any, fmt: str, system_prompt: str | None, kind: str = "chat", columns=None) -> Any:
    """One chat row as [{role, content}] (system first; or a text example); with `kind` pair or unpaired, the
    row's examples (job/shapes.py). Raises BadRow naming what is wrong."""
    if isinstance(row, Unparsable):
        raise BadRow(row.reason)
    depth = nesting_depth(row, MAX_ROW_DEPTH)
    if depth > MAX_ROW_DEPTH:
        raise BadRow(f"nested more than {MAX_ROW_DEPTH} levels deep")
    examples = shapes.standardize(shapes.renamed(row, columns), fmt, system_prompt, kind)
    if nesting_depth(examples, MAX_ROW_DEPTH) > MAX_ROW_DEPTH:  # JSON text inside it (tool schemas) parsed
        raise BadRow(f"nested more than {MAX_ROW_DEPTH} levels deep")
    return examples[0] if kind == "chat" else examples


FIRST_ROWS = 200  # rows of a data file parsed before any work; the rest are checked by prepare


UNREAD = "unread column "
# A data file's column names are the writer's: the report of unread ones keeps this many, this long.
MAX_UNREAD_COLUMNS, MAX_COLUMN_NAME = 20, 60


def unused_message(names: list[str], row: dict, source: DataSourceSpec) -> str:
    """One line: the columns no field of the row's shape reads, what each may have meant, and the fixes."""
    shape = shapes.detect(row) or "chat"
    names = [name[:MAX_COLUMN_NAME] for name in names[:10]]
    named = ", ".join(f"{name!r}" + (f" (did you mean {guess!r}?)" if (guess := shapes.meant(name, shapes.READS[shape]))
                                     else "") for name in names)
    return (f"column(s) {named} of {source.source} are read by no field of {shapes.NOUNS[shape][0]} "
            f"({', '.join(shapes.READS[shape])}); map a misnamed one with data.columns (e.g. "
            f"{{\"{shapes.meant(names[0], shapes.READS[shape]) or shapes.READS[shape][0]}\": \"{names[0]}\"}}), "
            "or set data.unused_columns to 'warn' to train without them")


def warn_unused(source: DataSourceSpec, unread: dict[str, int]) -> None:
    from job.log import get_logger

    get_logger("peftopt.prepare").warning(
        "data_columns_unused", source=source.source, rows_by_column=unread,
        meant={name: guess for name in unread if (guess := shapes.meant(name))},
        fix="map a misnamed column with data.columns; data.unused_columns 'error' refuses such data")


def check_rows(spec: JobSpec, source: DataSourceSpec, where: str) -> None:
    """Preflight: the file reads and its first rows are conversations (unless bad rows may be skipped).

    Raises:
        DataError: the file is unreadable or empty, or a row is malformed, naming it (exit 3).
    """
    rows = list(itertools.islice(iter_local(Path(source.source), max_line_chars(spec)), FIRST_ROWS))
    if not rows:
        raise DataError(f"{where}: {source.source} holds no rows")
    unread: dict[str, int] = {}
    for index, row in enumerate(rows):
        renamed = shapes.renamed(row, source.columns)
        shape = shapes.detect(renamed) if isinstance(renamed, dict) else None
        if shape is None:
            continue
        names = shapes.unread(renamed, shape)
        if names and spec.data.unused_columns == "error":
            raise DataError(f"{'data' if where == 'data.source' else where} row {index}: "
                            f"{unused_message(names, renamed, source)}")
        for name in names:
            name = name[:MAX_COLUMN_NAME]
            if name in unread or len(unread) < MAX_UNREAD_COLUMNS:
                unread[name] = unread.get(name, 0) + 1
    if unread:
        warn_unused(source, unread)
    if spec.data.bad_rows == "skip":
        return
    kind = family(spec)
    wrong_kind = []
    for index, row in enumerate(rows):
        try:
            standardize(row, source.format, source.system_prompt or spec.data.system_prompt, kind, source.columns)
        except BadRow as exc:
            found = shapes.detect(shapes.renamed(row, source.columns)) if isinstance(row, dict) else None
            named = shapes.FORMATS.get(source.format)
            if found is not None and (found not in shapes.TAKES[kind] or (named and found != named)):
                wrong_kind.append((index, exc))
                continue
            renamed = shapes.renamed(row, source.columns)
            hint = shapes.columns_hint(renamed) if isinstance(renamed, dict) and found is None else ""
            raise DataError(f"{'data' if where == 'data.source' else where} row {index}: {exc} (in {source.source}"
                            f"{hint}; set data.bad_rows='skip' to drop such rows)") from None
    if wrong_kind and len(wrong_kind) == len(rows):  # the whole file is of another kind
        found = shapes.detect(shapes.renamed(rows[0], source.columns))
        named = shapes.FORMATS.get(source.format)
        if named and found != named and found in shapes.TAKES[kind]:
            columns = ", ".join(map(str, shapes.renamed(rows[0], source.columns))) if isinstance(rows[0], dict) else ""
            raise SpecError(f"{where}: {source.source} holds {shapes.NOUNS[found][1]}, not {shapes.NOUNS[named][1]} "
                            f"as data.format {source.format!r} says (its columns: {columns}); set data.format to "
                            "'auto', or map the columns with data.columns")
        method = spec.train.method if spec.train else "sft"
        raise SpecError(f"{where}: {source.source} holds {shapes.NOUNS[found][1]}; train.method {method!r} trains on "
                        f"{shapes.NOUNS[kind][1]} ({shapes.EXPECTED[kind].split(' (', 1)[1]}")
    if wrong_kind:
        index, exc = wrong_kind[0]
        raise DataError(f"{'data' if where == 'data.source' else where} row {index}: {exc} (in {source.source})")


def skip_reason(exc: BadRow) -> str:
    text = str(exc)
    if text.startswith("line "):
        return text.split(": ", 1)[1].split(":")[0]  # "invalid JSON", "nested too deeply", "longer than ..."
    return text.split(" (")[0] if "turn" not in text else "malformed turn"


def without_thinking(example):
    """The example with each assistant turn's leading think block removed (data.thinking 'drop')."""
    def strip(messages):
        return [{**m, "content": templates.without_thinking(m["content"])} if m["role"] == "assistant" else m
                for m in messages]

    if isinstance(example, list):
        return strip(example)
    if "messages" in example:
        return {**example, "messages": strip(example["messages"])}
    return {k: strip(v) if k in ("chosen", "rejected", "completion") and isinstance(v, list) else v
            for k, v in example.items()}


def cap_chars(messages: list[dict], limit: int) -> tuple[list[dict], bool]:
    """The conversation with its text cut to `limit` characters in all (later turns dropped, the turn that
    crosses the limit cut), and whether anything was cut."""
    total, kept = 0, []
    for message in messages:
        room = limit - total
        if room <= 0:
            return kept, True
        if len(message["content"]) > room:
            return kept + [{**message, "content": message["content"][:room]}], True
        kept.append(message)
        total += len(message["content"])
    return kept, False


def cap_example(example, limit: int):
    """(the example cut to `limit` characters, whether it was cut, whether it still has something to learn):
    a conversation as a whole; each part of a pair or an unpaired example on its own."""
    if isinstance(example, list):
        kept, cut = cap_chars(example, limit)
        return kept, cut, any(m["role"] == "assistant" for m in kept)
    if "messages" in example:  # a conversation with its tools
        kept, cut = cap_chars(example["messages"], limit)
        return {**example, "messages": kept}, cut, any(m["role"] == "assistant" for m in kept)
    if "text" in example or "text_prompt" in example:  # raw text: cut the text, the prompt first
        out, room = dict(example), limit
        for key in ("text", "text_prompt", "text_completion"):
            if key in out:
                out[key], room = out[key][:max(room, 0)], room - len(out[key])
        cut = room < 0
        return out, cut, bool(out.get("text") or out.get("text_completion"))
    out, cut = dict(example), False
    for key in ("prompt", "chosen", "rejected", "completion"):
        if key in out:
            out[key], cut_here = cap_chars(out[key], limit)
            cut |= cut_here
    learnable = bool(out["prompt"]) and all(out.get(k) for k in ("chosen", "rejected", "completion") if k in example)
    return out, cut, learnable


# ------------------------------------------------------------------------------------------ mixing


class Spool:
    """Standardized examples kept in an anonymous temporary file as JSON lines, with their offsets in memory: a
    data set of millions of rows costs prepare about 8 bytes a row (and 16 for its duplicate check) rather than
    its Python objects."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.offsets = array("q")

    def add(self, example) -> None:
        self.file.seek(0, 2)
        self.offsets.append(self.file.tell())
        self.file.write(jsonl_line(example).encode())

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, index: int):
        self.file.seek(self.offsets[index])
        return json.loads(self.file.readline())


class Examples(Sequence):
    """A sequence of standardized examples drawn from spools: entry i is spool `source[i]`'s row `position[i]`.
    Subsets and reorderings are index arrays; an example is read back when it is used."""

    def __init__(self, spools: list, source: array, position: array):
        self.spools, self.source, self.position = spools, source, position

    @classmethod
    def of(cls, examples: Iterable) -> "Examples":
        spool = Spool()
        for example in examples:
            spool.add(example)
        return cls([spool], array("i", [0]) * len(spool), array("q", range(len(spool))))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self.spools[self.source[index]].get(self.position[index])

    def subset(self, indices: Iterable[int]) -> "Examples":
        indices = list(indices)
        return Examples(self.spools, array("i", (self.source[i] for i in indices)),
                        array("q", (self.position[i] for i in indices)))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


def _standardized(spec: JobSpec, index: int, source: DataSourceSpec, rows: Iterable, counts: Counter) -> Iterator:
    where = f"data.sources[{index}] ({source.source}) row" if spec.data.sources else "data row"
    limit = max_row_chars(spec)
    kind = family(spec)
    for number, row in enumerate(rows):
        counts["rows_read"] += 1
        try:
            examples = standardize(row, source.format, source.system_prompt or spec.data.system_prompt, kind,
                                   source.columns)
        except BadRow as exc:
            if spec.data.bad_rows == "error":
                renamed = shapes.renamed(row, source.columns)
                hint = shapes.columns_hint(renamed) if isinstance(renamed, dict) and shapes.detect(renamed) is None \
                    else ""
                raise DataError(f"{where} {number}: {exc}{hint} (set data.bad_rows='skip' to drop such rows)") \
                    from None
            counts[skip_reason(exc)] += 1
            continue
        renamed = shapes.renamed(row, source.columns)
        unread = shapes.unread(renamed, shapes.detect(renamed) or "chat")
        if unread:
            if spec.data.unused_columns == "error":
                raise DataError(f"{where} {number}: {unused_message(unread, renamed, source)}")
            for name in unread:
                key = UNREAD + name[:MAX_COLUMN_NAME]
                if key in counts or sum(k.startswith(UNREAD) for k in counts) < MAX_UNREAD_COLUMNS:
                    counts[key] += 1
        for example in [examples] if kind == "chat" else examples:
            if spec.data.thinking == "drop":
                example = without_thinking(example)
            example, cut, learnable = cap_example(example, limit)
            if cut:
                counts["chars_capped"] += 1
                if not learnable:
                    counts["nothing to learn after data.max_row_chars"] += 1
                    continue
            yield example


def mixture(spec: JobSpec, rows_by_source: list[Iterable] | None = None) -> tuple[Examples, array, list[dict]]:
    """The training examples (standardized), which source each came from, and per-source figures.

    Each source's rows are read one at a time, checked, and spooled to disk; exact duplicates (the same
    conversation, after standardizing) are dropped across sources, the first occurrence kept; then each source
    gives all its rows, or `num_samples` of them, or its `weight`'s share of `data.num_samples`, drawn by
    `train.seed`; the union is shuffled by the same seed. A single `data.source` is the one-source case (its
    order kept).

    Raises:
        DataError: a malformed row (unless data.bad_rows is 'skip'), or an unreadable file.
        ExternalError: a Hub data set could not be had.
    """
    data = spec.data
    sources = data.all_sources()
    seed = spec.train.seed if spec.train else 0
    rng = random.Random(seed)
    seen: set[bytes] = set()
    spools, figures = [], []
    for index, source in enumerate(sources):
        counts: Counter = Counter()
        raw = rows_by_source[index] if rows_by_source is not None else \
            iter_rows(source.source, source.split, max_line_chars(spec), source.config)
        spool = Spool()
        for example in _standardized(spec, index, source, raw, counts):
            key = hashlib.blake2b(json.dumps(example, sort_keys=True, ensure_ascii=False).encode(),
                                  digest_size=16).digest()
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            spool.add(example)
        spools.append(spool)
        unread = {k[len(UNREAD):]: v for k, v in counts.items() if k.startswith(UNREAD)}
        kept = Counter({k: counts[k] for k in ("duplicate", "chars_capped", "rows_read")}) + \
            Counter({UNREAD + k: v for k, v in unread.items()})
        figures.append({"source": source.source, "split": source.split, "rows_read": counts["rows_read"],
                        "skipped": dict(counts - kept), "duplicates_dropped": counts["duplicate"],
                        "chars_capped": counts["chars_capped"]})
        if unread:
            figures[-1]["unused_columns"] = unread
            warn_unused(source, unread)
    seen.clear()
    weights = {i: s.weight for i, s in enumerate(sources) if s.weight is not None}
    origin, position = array("i"), array("q")
    for index, (source, spool) in enumerate(zip(sources, spools)):
        if source.num_samples is not None:
            take = min(source.num_samples, len(spool))
        elif index in weights:
            take = min(round(data.num_samples * weights[index] / sum(weights.values())), len(spool))
        else:
            take = len(spool)
        picked = range(len(spool)) if take == len(spool) else sorted(rng.sample(range(len(spool)), take))
        figures[index]["rows_used"] = len(picked)
        position.extend(picked)
        origin.extend([index] * len(picked))
    chosen = Examples(spools, origin, position)
    if len(sources) > 1:
        order = list(range(len(chosen)))
        rng.shuffle(order)
        chosen = chosen.subset(order)
    if data.num_samples is not None and not weights and len(chosen) > data.num_samples:
        chosen = chosen.subset(range(data.num_samples))
    return chosen, chosen.source, figures
