"""validate lists every problem of a suite at once (it stopped at the first item that was not an item), refuses
an id that names two items (the report's answers were looked up by id: the second item's checks were run on the
first's answer), and names the check type or key a misspelt one was meant to be."""
import json

import pytest

from job.errors import SpecError
from job.evaluation import suite
from job.spec import EvaluateSpec


def suite_file(tmp_path, items):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return EvaluateSpec(prompts=str(path))


def test_every_item_s_problem_is_listed_at_once(tmp_path):
    evaluate = suite_file(tmp_path, [
        {"id": "a", "prompt": "2+2?", "assert": [{"type": "contain", "value": "4"}]},
        {"id": "b", "prompt": "3+3?", "assert": {"type": "number", "value": 6}},
        {"prompt": "1+1?", "asserts": [{"type": "equals", "value": "2"}]},
        {"id": "d", "prompt": "5+5?", "assert": [{"type": "number", "value": "ten"}]},
        {"id": "a", "prompt": "again"},
    ])
    assert suite.problems(evaluate) == [
        "evaluate.prompts: suite.jsonl item 1: 'assert' is a list of checks, each {\"type\": ..., \"value\": ...}",
        "evaluate.prompts: suite.jsonl item 2: unknown key(s) 'asserts'; did you mean 'assert' for 'asserts'? An "
        f"item is {suite.ITEM_SHAPE}",
        "evaluate.prompts: suite.jsonl item 4: id 'a' is also item 0's; each item's id names its answers in eval/ "
        "and the report",
        "evaluate.prompts: prompt a: assert[0]: unknown type 'contain'; did you mean 'contains'? (known: equals, "
        "contains, icontains, contains-any, contains-all, starts-with, regex, is-json, number, chrf, levenshtein, "
        "python; not-<type> for equals, contains, icontains, contains-any, contains-all, starts-with, regex, is-json)",
        "evaluate.prompts: prompt d: assert[0]: number: no number in the value 'ten'",
    ]
    with pytest.raises(SpecError, match="item 1: 'assert' is a list"):
        suite.load(evaluate)


def test_a_given_id_that_an_unnamed_item_would_get_is_a_duplicate_too(tmp_path):
    evaluate = suite_file(tmp_path, [{"prompt": "first"}, {"id": "p0", "prompt": "second"}])
    assert suite.problems(evaluate) == ["evaluate.prompts: suite.jsonl item 1: id 'p0' is also item 0's; each "
                                        "item's id names its answers in eval/ and the report"]


def test_a_held_out_row_whose_id_a_suite_item_has_is_renamed(tmp_path):
    class RunDir:
        data_dir = tmp_path / "data"

        def own(self, path):
            return path

    RunDir.data_dir.mkdir()
    (RunDir.data_dir / "suite.jsonl").write_text(json.dumps({"id": "row3", "prompt": "held", "reference": "x"}) + "\n")
    mine = suite_file(tmp_path, [{"id": "row3", "prompt": "mine"}])
    evaluate = EvaluateSpec(prompts=mine.prompts, from_data={"rows": 1})
    assert [item["id"] for item in suite.load(evaluate, RunDir())] == ["row3", "data:row3"]


def test_a_suite_conversation_may_give_its_content_as_text_parts(tmp_path):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    evaluate = suite_file(tmp_path, [{"id": "a", "messages": [{"role": "user", "content": parts}]},
                                     {"id": "b", "messages": [{"role": "user", "content": [{"type": "image"}]}]}])
    assert suite.problems(evaluate) == ["evaluate.prompts: suite.jsonl item 1: message 0 content part 0 is one of "
                                        "type 'image'; peftopt reads text parts only"]
    items, _ = suite._spec_items(evaluate)
    assert items[0]["prompt"] == "What is 2+2?" and items[0]["messages"] == [{"role": "user",
                                                                             "content": "What is 2+2?"}]
