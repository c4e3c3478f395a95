"""Files saved with a UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad, PowerShell's Out-File) read as the same
files without one: data rows, jobspecs and suites. The mark used to become part of the first column's name (a CSV
then fit no shape) or made the JSON invalid."""
import json

import pytest

from job.data import read_rows
from job.evaluation.suite import read_suite_file
from job.specfile import parse_spec_text

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name, content", [
    ("rows.csv", b'prompt,completion\n"2+2?","4"\n'),
    ("rows.tsv", b"prompt\tcompletion\n2+2?\t4\n"),
    ("rows.jsonl", b'{"prompt": "2+2?", "completion": "4"}\n'),
    ("rows.json", b'[{"prompt": "2+2?", "completion": "4"}]'),
])
def test_a_data_file_with_a_bom_gives_the_rows_it_gives_without(name, content, tmp_path):
    plain, marked = tmp_path / "plain" / name, tmp_path / "marked" / name
    for path, data in ((plain, content), (marked, BOM + content)):
        path.parent.mkdir()
        path.write_bytes(data)
    assert read_rows(str(marked), "train") == read_rows(str(plain), "train") == [{"prompt": "2+2?", "completion": "4"}]


@pytest.mark.parametrize("origin, text", [("spec.json", '{"name": "x"}'), ("spec.yaml", "name: x\n")])
def test_a_jobspec_with_a_bom_parses(origin, text):
    assert parse_spec_text(BOM + text.encode(), origin) == {"name": "x"}


@pytest.mark.parametrize("name", ["suite.jsonl", "suite.json"])
def test_a_suite_with_a_bom_reads(name, tmp_path):
    item = {"id": "a", "prompt": "2+2?", "assert": [{"type": "number", "value": 4}]}
    path = tmp_path / name
    path.write_bytes(BOM + (json.dumps(item) + "\n" if name.endswith("l") else json.dumps([item])).encode())
    assert read_suite_file(path) == [item]
