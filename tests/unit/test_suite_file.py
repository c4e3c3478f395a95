"""A suite file's kind is told by its name: .json or .jsonl; a prompts.txt was read as JSON and refused with
the JSON parser's 'Expecting value: line 1 column 1'."""
import pytest

from job.errors import SpecError
from job.evaluation.suite import read_suite_file


def test_a_suite_file_that_is_neither_json_nor_jsonl_is_refused_saying_what_a_suite_is(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2+2?\nName a color.\n")
    with pytest.raises(SpecError) as info:
        read_suite_file(path)
    assert info.value.message.startswith("evaluate.prompts: prompts.txt is neither .json nor .jsonl: a suite is a "
                                         "JSON list of items (or of prompts) or a .jsonl file, one item a line")
