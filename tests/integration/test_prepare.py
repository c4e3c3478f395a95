"""Unit/integration: conversations are standardized, bad rows are named, sources are mixed reproducibly, and
only assistant tokens train."""
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_cli

from job.errors import DataError
from job.specfile import validate_data
from job import data
from job.stages import prepare

ROOT = Path(__file__).resolve().parents[2]


def spec_for(tiny_model, **data):
    return validate_data({"name": "p", "model": {"base": str(tiny_model), "chat_template": "llama-3",
                                                 "max_seq_length": 64},
                          "data": {"source": "x.jsonl", **data}, "lora": {}, "train": {"max_steps": 1}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from job.templates import LLAMA_3

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = LLAMA_3
    return tok


def test_sharegpt_and_openai_standardize_alike():
    share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert data.standardize(share, "auto", None) == data.standardize(openai, "auto", None)
    with_system = data.standardize(share, "sharegpt", "Be brief.")
    assert with_system[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("row,needle", [
    ({"conversations": []}, "empty"),
    ({"question": "hi"}, "no 'conversations' or 'messages'"),
    ({"conversations": [{"from": "gpt", "value": "x"}]}, "where 'user' was expected"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}, "empty"),
    ({"conversations": [{"from": "human", "value": 3}]}, "not text"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "no known role"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "no assistant turn"),
    ("just text", "not an object"),
])
def test_bad_rows_are_named(row, needle):
    with pytest.raises(data.BadRow, match=needle):
        data.standardize(row, "auto", None)


def test_masks_cover_exactly_the_assistant_replies(tiny_model, tokenizer):
    spec = spec_for(tiny_model)
    row = {"conversations": [{"from": "human", "value": "Tell me one thing about coffee."},
                             {"from": "gpt", "value": "Coffee is warm."},
                             {"from": "human", "value": "And why?"}, {"from": "gpt", "value": "Because."}]}
    [encoded], counts = prepare.encode_rows([data.standardize(row, "auto", None)], tokenizer, spec)
    trained = tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])
    assert trained == "Coffee is warm.<|eot_id|>Because.<|eot_id|>"
    assert counts["trainable_tokens"] == sum(encoded["assistant_masks"])


def test_bad_row_policy_error_names_the_row_and_skip_counts(tiny_model, tokenizer):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    bad = {"conversations": [{"from": "gpt", "value": "Hello"}]}
    with pytest.raises(DataError, match="data row 1:"):
        data.mixture(spec_for(tiny_model), [[good, bad]])
    other = {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello"}]}
    rows, _, [figures] = data.mixture(spec_for(tiny_model, bad_rows="skip"), [[good, bad, other]])
    assert len(rows) == 2 and sum(figures["skipped"].values()) == 1


def test_long_rows_are_truncated_and_counted(tiny_model, tokenizer):
    long = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "word " * 200}]}
    [row], counts = prepare.encode_rows([data.standardize(long, "auto", None)], tokenizer, spec_for(tiny_model))
    assert len(row["input_ids"]) == 64 and counts["truncated"] == 1


def test_nothing_to_learn_is_a_data_error(tiny_model, tokenizer, tmp_path):
    long_prompt = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}]}
    rows, counts = prepare.encode_rows([data.standardize(long_prompt, "auto", None)], tokenizer, spec_for(tiny_model))
    assert rows == [] and counts["skipped"]["nothing to learn after truncation"] == 1


def test_local_files_and_slices(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert [r["i"] for r in data.read_rows(str(path), "train[2:5]")] == [2, 3, 4]
    assert len(data.read_rows(str(path), "train[:50%]")) == 5
    path.write_text('{"i": 1}\n{broken\n')
    first, broken = data.read_rows(str(path), "train")  # a line that is not JSON is a bad row in its place
    with pytest.raises(data.BadRow, match="line 2: invalid JSON"):
        data.standardize(broken, "auto", None)
    with pytest.raises(DataError, match="does not exist"):
        data.read_rows(str(tmp_path / "none.jsonl"), "train")


def test_unknown_fields_are_ignored():
    row = {"conversations": [{"from": "human", "value": "Hi", "weight": 1}, {"from": "gpt", "value": "Hello"}],
           "source": "web", "score": 0.9}
    assert [m["role"] for m in data.standardize(row, "auto", None)] == ["user", "assistant"]


@pytest.mark.parametrize("content,needle", [
    ("", "holds no rows"),
    ('{"conversations": [{"from": "gpt", "value": "x"}]}\n', "data row 0:"),
    ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n{oops\n', "line 2"),
])
def test_data_errors_exit_3_naming_the_row(tmp_path, make_spec, capsys, content, needle):
    from job.cli import invoke

    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    spec = make_spec("bad-data", data={"source": str(data)})
    assert invoke(["run", str(spec)]) == 3
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_weighted_mixture_takes_each_share_by_seed(tiny_model):
    import tiny

    first, second = tiny.conversations(40, seed=1), tiny.conversations(40, seed=2)
    spec = validate_data({"name": "m", "model": {"base": str(tiny_model)}, "lora": {}, "train": {"max_steps": 1},
                          "data": {"sources": [{"source": "a.jsonl", "weight": 3}, {"source": "b.jsonl", "weight": 1}],
                                   "num_samples": 20}})
    rows, origin, figures = data.mixture(spec, [first, second])
    assert (origin.count(0), origin.count(1)) == (15, 5) and [f["rows_used"] for f in figures] == [15, 5]
    assert data.mixture(spec, [first, second])[0] == rows  # the same seed, the same rows in the same order
    other = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 1})})
    assert data.mixture(other, [first, second])[0] != rows


@pytest.mark.integration
def test_two_source_mixture_trains_with_per_source_counts_and_no_duplicates(make_spec, tmp_path):
    import tiny

    first, second = tiny.conversations(24, seed=1), tiny.conversations(16, seed=2)
    second[3] = first[5]  # the same conversation in both sources
    for name, rows in (("a", first), ("b", second)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [{"source": str(tmp_path / "a.jsonl")}, {"source": str(tmp_path / "b.jsonl"), "format": "sharegpt"}]
    outputs = []
    for name in ("mix1", "mix2"):
        spec = make_spec(name, data={"source": None, "sources": sources, "max_tokens": 120},
                         train={"max_steps": 2, "save_steps": 2})
        result = run_cli("run", spec, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(tmp_path / "runs" / name)
    metrics = json.loads((outputs[0] / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2
    a, b = metrics["prepare"]["sources"]
    distinct = {json.dumps(r, sort_keys=True) for r in first}
    assert a["rows_used"] == len(distinct) and b["duplicates_dropped"] == 1 and b["rows_used"] == len(second) - 1
    train_rows = (outputs[0] / "data" / "train.jsonl").read_text().splitlines()
    assert a["train_rows"] + b["train_rows"] == len(train_rows) == metrics["prepare"]["train"]["rows"]
    assert a["trainable_tokens"] + b["trainable_tokens"] == metrics["prepare"]["train"]["trainable_tokens"]
    assert (outputs[0] / "data" / "train.jsonl").read_bytes() == (outputs[1] / "data" / "train.jsonl").read_bytes()
    report = run_cli("report", outputs[0], "--out", tmp_path / "r", timeout=300)
    assert report.returncode == 0, report.stderr
    rows = [line for line in (tmp_path / "r" / "report.md").read_text().splitlines() if line.startswith("| mix1 |")]
    assert len(rows) == 2 and f"| {b['train_rows']} | {b['trainable_tokens']} |" in rows[1]


def test_a_column_no_field_reads_is_named_at_validate_and_prepare_and_refused_under_error(tmp_path, tiny_model):
    """A misnamed optional column (alpaca's 'input' as 'inptu') would train on the instruction alone: it is named
    with the field it may have meant, counted per source by prepare, and refused under data.unused_columns 'error';
    a misnamed required column's error suggests data.columns."""
    from conftest import events, write_tiny_spec

    rows = tmp_path / "plurals.csv"
    rows.write_text("instruction,inptu,output\n" + "".join(
        f"Give the plural of the word.,{w},{p}\n" for w, p in [("goose", "geese"), ("mouse", "mice"), ("cat", "cats")]))
    spec = write_tiny_spec(tmp_path, tiny_model, rows, "plurals", train={"max_steps": 1, "packing": False})
    checked = run_cli("validate", spec)
    assert checked.returncode == 0, checked.stderr
    warned = [e for e in events(checked.stdout + checked.stderr) if e["event"] == "data_columns_unused"]
    assert warned and warned[0]["rows_by_column"] == {"inptu": 3} and warned[0]["meant"] == {"inptu": "input"}
    prepared = run_cli("run", spec, "--stages", "prepare")
    assert prepared.returncode == 0, prepared.stderr
    stats = next(e for e in events(prepared.stdout) if e["event"] == "data_prepared")
    assert stats["sources"][0]["unused_columns"] == {"inptu": 3} and stats["sources"][0]["skipped"] == {}
    strict = run_cli("validate", spec, "--set", "data.unused_columns=error")
    assert strict.returncode == 3 and "'inptu' (did you mean 'input'?)" in strict.stderr
    assert '{"input": "inptu"}' in strict.stderr
    rows.write_text(rows.read_text().replace("instruction,", "instrction,", 1))
    misnamed = run_cli("validate", spec)
    assert misnamed.returncode == 3 and '"instruction": "instrction"' in misnamed.stderr
    assert "data.columns" in misnamed.stderr


def test_the_unread_columns_reported_are_bounded_whatever_the_file_names():
    from job.spec import JobSpec

    spec = JobSpec.model_validate({"name": "x", "model": {"base": "x/y"}, "data": {"source": "d.jsonl"},
                                   "lora": {"r": 8}, "train": {"max_steps": 1}})
    rows = [{"instruction": "Say hi.", "output": "Hi.", **{f"{i}_{k}_{'c' * 500}": 1 for k in range(30)}}
            for i in range(50)]
    counts = Counter()
    list(data._standardized(spec, 0, spec.data.all_sources()[0], rows, counts))
    unread = [k for k in counts if k.startswith(data.UNREAD)]
    assert len(unread) == data.MAX_UNREAD_COLUMNS
    assert all(len(k) <= len(data.UNREAD) + data.MAX_COLUMN_NAME for k in unread)
