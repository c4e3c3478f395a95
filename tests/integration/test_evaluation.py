"""Scoring the user's own task, end to end through `peftopt run` and `peftopt report`: models built on the spot
whose greedy answer is known (tests/tiny.py `make_answering_model`) answer suites with declared checks; the
held-out rows of `evaluate.from_data` are asked and never trained on."""
import json
from pathlib import Path

import pytest

import tiny
from conftest import events, run_cli, write_tiny_spec

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def answers_310(tmp_path_factory) -> Path:
    return tiny.make_answering_model(tmp_path_factory.mktemp("m310") / "model", "310 minutes")


@pytest.fixture(scope="module")
def answers_180(tmp_path_factory) -> Path:
    return tiny.make_answering_model(tmp_path_factory.mktemp("m180") / "model", "180 minutes")


def ask(tmp_path: Path, model: Path, suite: list[dict] | str, name: str) -> tuple[dict, list[dict]]:
    """An evaluation-only run of `model` (the base target) on `suite` (items, written as JSONL, or a path):
    (its eval/summary.json line, its answers)."""
    path = tmp_path / f"{name}.jsonl"
    if isinstance(suite, str):
        path = Path(suite)
    else:
        path.write_text("".join(json.dumps(item) + "\n" for item in suite))
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({
        "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(model), "max_seq_length": 128, "chat_template": "llama-3"},
        "evaluate": {"prompts": path.name, "max_new_tokens": 16, "targets": ["base"]}}))
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / name
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["targets"]["base"]
    answers = [json.loads(line) for line in (run_dir / "eval" / "base.jsonl").read_text().splitlines()]
    return summary, answers


def test_a_wrong_answer_to_each_of_three_prompts_is_zero_of_three(tmp_path, answers_310):
    suite = [{"id": f"{h}h", "prompt": f"How many minutes is {h} hours?", "reference": f"{60 * h} minutes",
              "assert": [{"type": "number"}]} for h in (1, 2, 3)]
    summary, answers = ask(tmp_path, answers_310, suite, "wrong")
    assert [a["answer"] for a in answers] == ["310 minutes"] * 3
    assert (summary["checked"], summary["passed"], summary["pass_rate"]) == (3, 0, 0.0)
    assert summary["sanity"] == {"leakage": 0, "degenerate": 0}
    assert answers[2]["failed"] == ["number: expected 180, found 310"]
    report = tmp_path / "report"
    assert run_cli("report", tmp_path / "runs", "--out", report).returncode == 0  # an output directory of runs
    text = (report / "report.md").read_text()
    assert "| base | 0/3 (0.00-0.56) |" in text and "Expected: 180 minutes" in text
    assert "number: expected 180, found 310" in text and "Swedish" not in text


def test_every_check_type_on_a_known_answer(tmp_path, answers_180):
    passing = [{"type": "equals", "value": "180 minutes"}, {"type": "contains", "value": "180"},
               {"type": "icontains", "value": "MINUTES"}, {"type": "contains-any", "value": ["180", "three hours"]},
               {"type": "contains-all", "value": ["180", "minutes"]}, {"type": "not-contains", "value": "310"},
               {"type": "starts-with", "value": "18"}, {"type": "regex", "value": r"^\d+ minutes$"},
               {"type": "not-is-json"}, {"type": "number", "value": 180},
               {"type": "number", "value": 181, "tolerance": "1%"}, {"type": "chrf", "threshold": 90},
               {"type": "levenshtein", "value": "180 minute", "threshold": 1}]
    failing = [{"type": "equals", "value": "3 hours"}, {"type": "contains", "value": "310"},
               {"type": "icontains", "value": "HOURS"}, {"type": "contains-any", "value": ["310", "hours"]},
               {"type": "contains-all", "value": ["180", "hours"]}, {"type": "not-contains", "value": "180"},
               {"type": "starts-with", "value": "3"}, {"type": "regex", "value": r"^\d+ hours$"},
               {"type": "is-json"}, {"type": "number", "value": 120},
               {"type": "number", "value": 200, "tolerance": "5%"}, {"type": "chrf", "value": "three hours"},
               {"type": "levenshtein", "value": "three hours", "threshold": 3}]
    suite = [{"id": f"pass-{k}", "prompt": "How many minutes is 3 hours?", "reference": "180 minutes",
              "assert": [check]} for k, check in enumerate(passing)]
    suite += [{"id": f"fail-{k}", "messages": [{"role": "system", "content": "Answer briefly."},
                                               {"role": "user", "content": "How many minutes is 3 hours?"}],
               "reference": "180 minutes", "assert": [check]} for k, check in enumerate(failing)]
    suite.append({"id": "unchecked", "prompt": "Say hello."})
    summary, answers = ask(tmp_path, answers_180, suite, "catalog")
    verdicts = {a["id"]: a["passed"] for a in answers}
    assert all(verdicts[f"pass-{k}"] is True for k in range(len(passing))), verdicts
    assert all(verdicts[f"fail-{k}"] is False for k in range(len(failing))), verdicts
    assert verdicts["unchecked"] is None
    assert (summary["prompts"], summary["checked"], summary["passed"]) == (len(suite), len(suite) - 1, len(passing))
    for answer in answers:
        assert all("\n" not in reason for reason in answer.get("failed", []))


def test_targets_are_compared_with_the_base_prompt_by_prompt(tmp_path, answers_180):
    """The paired comparison on real targets whose answers are known: the merged model of an adapter trained at a
    learning rate too small to move a weight answers as the base does, so nothing is fixed or broken, the prompts
    both pass and both fail are counted, and the exact McNemar test finds no difference (p = 1)."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"How many minutes is {h} hours?"},
                                                     {"role": "assistant", "content": f"{60 * h} minutes"}]}) + "\n"
                            for h in range(1, 9)))
    suite = [{"id": f"{h}h", "prompt": f"How many minutes is {h} hours?", "reference": f"{60 * h} minutes",
              "assert": [{"type": "number"}]} for h in (1, 2, 3)]
    (tmp_path / "suite.jsonl").write_text("".join(json.dumps(item) + "\n" for item in suite))
    spec = write_tiny_spec(tmp_path, answers_180, data, "paired",
                           train={"max_steps": 1, "save_steps": 1, "learning_rate": 1e-12, "packing": False},
                           evaluate={"prompts": "suite.jsonl", "max_new_tokens": 16, "targets": ["base", "merged"]},
                           export={"merge": True})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "paired" / "eval" / "summary.json").read_text())["targets"]
    assert (summary["base"]["passed"], summary["merged"]["passed"]) == (1, 1)  # 3 hours: 180 minutes
    assert summary["merged"]["vs_base"] == {"prompts": 3, "fixed": 0, "broken": 0, "both_passed": 1,
                                            "both_failed": 2, "p_value": 1.0, "test": "exact McNemar (two-sided)"}


def test_a_suite_item_of_the_wrong_shape_says_what_shape_is_expected(tmp_path, answers_180):
    (tmp_path / "bad.jsonl").write_text('{"question": "How many minutes is 3 hours?"}\n')
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"name": "bad", "output_dir": str(tmp_path / "runs"),
                                "model": {"base": str(answers_180), "chat_template": "llama-3"},
                                "evaluate": {"prompts": "bad.jsonl", "targets": ["base"]}}))
    result = run_cli("validate", spec)
    assert result.returncode == 2
    assert "unknown key(s) 'question'" in result.stderr and '"prompt": text | "messages"' in result.stderr
    (tmp_path / "bad.jsonl").write_text('{"prompt": "3 hours?", "assert": [{"type": "numbr", "value": 180}]}\n')
    result = run_cli("validate", spec)
    assert result.returncode == 2 and "unknown type 'numbr'" in result.stderr
    del_prompts = json.loads(spec.read_text())
    del del_prompts["evaluate"]["prompts"]
    spec.write_text(json.dumps(del_prompts))
    result = run_cli("validate", spec)
    assert result.returncode == 2 and "evaluate: name the questions" in result.stderr
    assert "seed10" not in result.stderr.split("such as")[0]


def test_rows_held_out_by_from_data_are_asked_and_never_trained_on(tmp_path, tiny_model):
    """evaluate.from_data on the demo's data: the held-out conversations are asked, checked against their own
    replies, reported per target, and none of them is in data/train.jsonl."""
    data = ROOT / "jobspecs" / "data" / "chat-demo.jsonl"
    spec = write_tiny_spec(tmp_path, tiny_model, data, "held", train={"max_steps": 2, "save_steps": 2},
                           data={"format": "sharegpt"},
                           evaluate={"from_data": {"rows": 10, "seed": 1}, "max_new_tokens": 8,
                                     "targets": ["base", "adapter"]})
    result = run_cli("run", spec, "--stages", "prepare,train,evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "held"
    held = [json.loads(line) for line in (run_dir / "data" / "suite.jsonl").read_text().splitlines()]
    assert len(held) == 10 and all(item["assert"] == [{"type": "chrf", "threshold": 60}] for item in held)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    trained = [tokenizer.decode(json.loads(line)["input_ids"])
               for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    for item in held:
        question, answer = item["messages"][-1]["content"], item["reference"]
        assert not [text for text in trained if question in text and answer in text], question
    log = {e["event"]: e for e in events(result.stdout)}
    assert log["data_prepared"]["suite"] == {"rows": 10, "not_askable": 0}
    assert log["data_prepared"]["train"]["rows"] == log["data_prepared"]["rows_read"] - 10 - \
        log["data_prepared"]["sources"][0]["duplicates_dropped"]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["targets"]
    assert summary["base"]["checked"] == 10 and summary["adapter"]["checked"] == 10
    assert summary["adapter"]["vs_base"]["prompts"] == 10
    report = tmp_path / "report"
    assert run_cli("report", run_dir, "--out", report).returncode == 0
    text = (report / "report.md").read_text()
    assert text.count("/10 (") == 2 and "| adapter | " in text and "| base | " in text


MINUTES_TASK = """task: minutes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_the_harness_scores_base_and_adapter_on_a_local_task_offline(tmp_path, tiny_model, tiny_data):
    """lm-evaluation-harness with a task of its own YAML format over a local data file: both targets scored with
    the same settings, scores and standard errors in metrics.json and the report; an unknown task is refused
    before training."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = tmp_path / "minutes.jsonl"
    rows.write_text("".join(json.dumps({"question": f"How many minutes is {h} hours?", "answer": 0,
                                        "choices": [f"{60 * h} minutes", f"{60 * h + 30} minutes", f"{h} minutes"]})
                            + "\n" for h in range(1, 7)))
    (tasks / "minutes.yaml").write_text(MINUTES_TASK.format(data=rows))
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "bench", train={"max_steps": 2, "save_steps": 2},
                           evaluate={"harness": {"tasks": ["minutes"], "limit": 6, "include_path": "tasks",
                                                 "batch_size": 4}, "targets": ["adapter"]})
    bad = json.loads(spec.read_text())
    bad["evaluate"]["harness"]["tasks"] = ["minutes", "no_such_task"]
    (tmp_path / "bad.json").write_text(json.dumps({**bad, "name": "bad"}))
    refused = run_cli("run", tmp_path / "bad.json")
    assert refused.returncode == 2 and "unknown task 'no_such_task'" in refused.stderr
    assert not (tmp_path / "runs" / "bad" / "adapter").exists()
    result = run_cli("run", spec, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "bench"
    scores = json.loads((run_dir / "metrics.json").read_text())["evaluate"]["harness"]
    for target in ("base", "adapter"):
        minutes = scores[target]["minutes"]
        assert 0 <= minutes["acc"] <= 1 and minutes["acc_stderr"] >= 0 and minutes["examples"] == 6
    assert [e["target"] for e in events(result.stdout) if e["event"] == "harness_scored"] == ["base", "adapter"]
    assert run_cli("report", run_dir, "--out", tmp_path / "report").returncode == 0
    assert "| bench | minutes | acc | " in (tmp_path / "report" / "report.md").read_text()
