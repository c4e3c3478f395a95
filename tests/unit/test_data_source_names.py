"""data.source names a local data file by its suffix (any case; .ndjson; .gz-compressed) or a Hub data set by its
id; an address on the Hub, another URL or a file of a kind peftopt does not read is refused at validate, naming
the field, where it used to be taken for a Hub id (a traceback, or five retries of an unreachable Hub). The
compressed files read as the plain ones do."""
import gzip
import json

import pytest

from job import data
from job.errors import DataError
from job.spec import JobSpec, local_data_format

BASE = {"name": "n", "model": {"base": "m/m"}, "lora": {}, "train": {"max_steps": 1}}


def spec_with(source):
    return JobSpec.model_validate({**BASE, "data": {"source": source}})


@pytest.mark.parametrize("name, form", [
    ("a.jsonl", ".jsonl"), ("A.JSONL", ".jsonl"), ("a.ndjson", ".jsonl"), ("a.jsonl.gz", ".jsonl"),
    ("a.json.gz", ".json"), ("a.CSV.GZ", ".csv"), ("a.tsv", ".tsv"), ("a.parquet", ".parquet"),
    ("a.parquet.gz", None), ("openai/gsm8k", None), ("a.txt", None),
])
def test_the_suffix_says_the_local_format(name, form):
    assert local_data_format(name) == form


@pytest.mark.parametrize("source, message", [
    ("https://huggingface.co/datasets/openai/gsm8k", "name the data set by its id: 'openai/gsm8k'"),
    ("https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/train.parquet", "by its id: 'openai/gsm8k'"),
    ("hf://datasets/openai/gsm8k", "by its id: 'openai/gsm8k'"),
    ("datasets/openai/gsm8k", "by its id: 'openai/gsm8k'"),
    ("https://example.com/rows.jsonl", "is a URL; download the file and name it"),
    ("notes.txt", "is neither a data file peftopt reads"),
    ("sheet.xlsx", "is neither a data file peftopt reads"),
    ("./folder", "is neither a data file peftopt reads"),
    ("a/b/c", "is neither a data file peftopt reads"),
])
def test_what_is_neither_a_data_file_nor_a_hub_id_is_refused_naming_the_field(source, message):
    with pytest.raises(ValueError) as caught:
        spec_with(source)
    assert "data.source" in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("source", ["openai/gsm8k", "imdb", "HuggingFaceH4/ultrachat_200k", "rows.jsonl.gz",
                                    "/abs/rows.csv"])
def test_hub_ids_and_data_files_pass(source):
    assert spec_with(source).data.source == source


def test_a_model_named_by_its_hub_address_is_refused_with_its_id():
    with pytest.raises(ValueError, match="name the model by its id: 'unsloth/Llama-3.2-1B-Instruct'"):
        JobSpec.model_validate({**BASE, "model": {"base": "https://huggingface.co/unsloth/Llama-3.2-1B-Instruct"}})


ROWS = [{"instruction": f"Say {i}.", "output": str(i), "note": "a,b\tc"} for i in range(300)]


def write(path, text, compressed):
    if compressed:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("form", [".jsonl", ".json", ".csv", ".tsv", ".ndjson"])
def test_a_compressed_file_gives_the_rows_of_the_plain_one(tmp_path, form):
    if form == ".json":
        text = json.dumps(ROWS)
    elif form in (".csv", ".tsv"):
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(ROWS[0]), delimiter="\t" if form == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(ROWS)
        text = out.getvalue()
    else:
        text = "".join(json.dumps(row) + "\n" for row in ROWS)
    write(tmp_path / f"plain{form}", text, False)
    write(tmp_path / f"packed{form}.gz", text, True)
    plain = data.read_rows(str(tmp_path / f"plain{form}"), "train")
    packed = data.read_rows(str(tmp_path / f"packed{form}.gz"), "train[:150]")
    assert plain == [{k: str(v) for k, v in row.items()} for row in ROWS] if form in (".csv", ".tsv") else ROWS
    assert packed == plain[:150]


def test_a_truncated_compressed_file_is_a_data_error_naming_it(tmp_path):
    import random

    rng = random.Random(0)
    text = "".join(json.dumps({"text": " ".join(str(rng.random()) for _ in range(50))}) + "\n" for _ in range(400))
    whole = tmp_path / "whole.jsonl.gz"
    write(whole, text, True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read .*cut.jsonl.gz"):
        data.read_rows(str(cut), "train")


def test_a_compressed_json_list_is_read_to_the_line_limit_at_most(tmp_path):
    path = tmp_path / "big.json.gz"
    write(path, json.dumps([{"text": "x" * 1000}] * 100), True)
    assert len(data.read_rows(str(path), "train")) == 100
    with pytest.raises(DataError, match="decompresses to more than 50,000 characters.*write it as .jsonl"):
        data.read_rows(str(path), "train", max_line_chars=50_000)


@pytest.mark.parametrize("form", [".jsonl", ".csv"])
def test_a_compressed_line_over_the_limit_is_a_bad_row_read_past_in_pieces(tmp_path, form):
    """A few kilobytes that decompress to a line of 64 MiB: the line is refused by its number, never held whole
    (the reader takes at most the limit and a 1 MiB piece at a time), and the rows after it still read."""
    import tracemalloc

    path = tmp_path / f"bomb{form}.gz"
    header = "instruction,output\n" if form == ".csv" else ""
    good = '"Say 1.",1\n' if form == ".csv" else json.dumps({"instruction": "Say 1.", "output": "1"}) + "\n"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(header + good)
        for _ in range(64):
            fh.write("x" * (1 << 20))
        fh.write("\n" + good)
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    rows = data.read_rows(str(path), "train", max_line_chars=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20
    assert [isinstance(row, data.Unparsable) for row in rows] == [False, True, False]
