"""Unit: each answer check passes good answers and fails the bad ones the seed notebook saw."""
from job.evaluation import checks

NOTEBOOK_LEAK = ("system\n\nCutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\nuser\n\n"
                 "Explain how a VPN works in one short paragraph.assistant\n\nA VPN creates an encrypted tunnel.")


def test_leakage_catches_the_notebook_shape():
    result = checks.leakage(NOTEBOOK_LEAK, prompt="Explain how a VPN works in one short paragraph.")
    assert not result["passed"]
    assert {"role header", "system text", "prompt echoed"} <= set(result["found"])
    assert checks.leakage("A VPN creates an encrypted tunnel between your device and a server.",
                          prompt="Explain how a VPN works in one short paragraph.")["passed"]
    assert not checks.leakage("Sure.<|eot_id|>")["passed"]
    assert not checks.leakage("<start_of_turn>model\nHi")["passed"]


def test_degenerate():
    assert not checks.degenerate("", stop_reason="end_of_turn")["passed"]
    assert checks.degenerate("Fine answer.", stop_reason="length")["problems"] == ["truncated"]
    loop = "the cat sat on the mat and " * 10
    assert any("looping" in p for p in checks.degenerate(loop, stop_reason="end_of_turn")["problems"])
    assert checks.degenerate("A short, complete answer.", stop_reason="end_of_turn")["passed"]


def test_chrf_scores_the_swedish_sentence():
    ref = "Kaffet är för varmt för att dricka."
    good = checks.chrf("Kaffet är för varmt för att dricka.", reference=ref)
    wrong = checks.chrf("Kaffe är för varm för att drinka.", reference=ref)  # the notebook's T0 answer
    english = checks.chrf("The coffee is too hot to drink.", reference=ref)  # T1-T3 repeated the English
    assert good["passed"] and good["score"] > 99
    assert not english["passed"] and english["score"] < 30
    assert wrong["score"] < good["score"]
    assert checks.chrf('Here is the translation:\n"Kaffet är för varmt för att dricka."', reference=ref)["passed"]


def test_python_function_runs_the_code():
    cases = [["hello", "olleh"], ["", ""]]
    good = "Sure:\n```python\ndef reverse_string(s):\n    return s[::-1]\n```"
    assert checks.python_function(good, cases=cases) == {"passed": True, "function": "reverse_string", "reason": None,
                                                         "isolated": True}
    wrong = "```python\ndef reverse_string(s):\n    return s\n```"
    assert not checks.python_function(wrong, cases=cases)["passed"]
    assert not checks.python_function("Use slicing.", cases=cases)["passed"]
    hang = "```python\ndef r(s):\n    while True:\n        pass\n```"
    result = checks.python_function(hang, cases=cases, timeout_s=2)
    assert not result["passed"] and "timed out" in result["reason"]


def test_list_items():
    three = "1. Labels\n2. Goals\n3. Evaluation"
    assert checks.list_items(three, expected=3)["passed"]
    assert not checks.list_items("1. Labels\n2. Goals", expected=3)["passed"]
    renewable = ("Advantages:\n- Clean\n- Endless\n\nDisadvantages:\n- Intermittent\n- Land use")
    assert checks.list_items(renewable, sections={"advantages": 2, "disadvantages": 2})["passed"]
    lopsided = "Advantages:\n- Clean\n- Endless\n- Cheap\n\nDisadvantages:\n- Intermittent"
    assert not checks.list_items(lopsided, sections={"advantages": 2, "disadvantages": 2})["passed"]


def test_max_ingredients():
    ok = "Ingredients:\n- Spaghetti\n- Garlic\n- Olive oil\n- Chili\n\nInstructions:\n1. Boil.\n2. Mix."
    assert checks.max_ingredients(ok, limit=5) == {"passed": True, "count": 4, "limit": 5}
    too_many = "Ingredients:\n- a\n- b\n- c\n- d\n- e\n- f\n\nSteps:\n1. Cook."
    assert not checks.max_ingredients(too_many, limit=5)["passed"]
    assert not checks.max_ingredients("Just cook pasta.", limit=5)["passed"]


def test_summary_counts_leaks_and_pass_rate():
    answers = [{"answer": a, **checks.run_all(a, {}, prompt="p", stop_reason="end_of_turn")}
               for a in ("Fine.", NOTEBOOK_LEAK)]
    summary = checks.summarize(answers)
    assert summary["leaking_answers"] == 1 and summary["checks"]["leakage"] == 0.5


def test_max_ingredients_without_a_heading_takes_the_first_list():
    assert checks.max_ingredients("1. Olive oil\n2. Garlic\n3. Pasta\n\nBoil and mix.", limit=5)["count"] == 3
    assert not checks.max_ingredients("- a\n- b\n- c\n- d\n- e\n- f", limit=5)["passed"]


# ------------------------------------------------------------------------------------------- declared checks
import pytest  # noqa: E402

SCHEMA = {"type": "object", "required": ["minutes"], "properties": {"minutes": {"type": "integer"}}}
# (check, answer it passes, answer it fails, what the failure's reason names)
CATALOG = [
    ({"type": "equals", "value": "180 minutes"}, " 180 minutes\n", "300 minutes", "expected '180 minutes'"),
    ({"type": "contains", "value": "180"}, "It is 180 minutes.", "It is 300 minutes.", "'180'"),
    ({"type": "icontains", "value": "MINUTES"}, "180 minutes", "3 hours", "any case"),
    ({"type": "contains-any", "value": ["180", "one hundred eighty"]}, "one hundred eighty", "300", "one of"),
    ({"type": "contains-all", "value": ["180", "minutes"]}, "180 minutes", "180 mins", 'missing ["minutes"]'),
    ({"type": "not-contains", "value": "300"}, "180 minutes", "300 minutes", "expected no match"),
    ({"type": "starts-with", "value": "180"}, "180 minutes", "It is 180", "start with '180'"),
    ({"type": "regex", "value": r"^\d+ minutes$"}, "180 minutes", "180 minutes!", "no match for"),
    ({"type": "is-json"}, '```json\n{"minutes": 180}\n```', "minutes: 180", "expected JSON"),
    ({"type": "is-json", "value": SCHEMA}, '{"minutes": 180}', '{"minutes": "180"}', "at 'minutes'"),
    ({"type": "number", "value": 180}, "3 hours is 180 minutes.", "3 hours is 300 minutes.", "expected 180, found 300"),
    ({"type": "number", "value": 1000, "tolerance": "1%"}, "about 1,005 grams", "about 1,020 grams", "± 10"),
    ({"type": "number", "value": 0.5, "tolerance": 0.01}, "0.505", "0.52", "expected 0.5 ± 0.01"),
    ({"type": "chrf", "value": "Kaffet är för varmt.", "threshold": 60}, "Kaffet är för varmt.", "Teet är kallt.",
     "chrF"),
    ({"type": "levenshtein", "value": "180 minutes", "threshold": 2}, "180 minute", "three hours", "edit distance"),
]


@pytest.mark.parametrize("declared,good,bad,reason", CATALOG, ids=[c[0]["type"] for c in CATALOG])
def test_every_check_type_passes_and_fails_on_known_answers_with_a_one_line_reason(declared, good, bad, reason):
    assert checks.assertion_problem(declared, None) is None
    assert checks.run_assertion(declared, good)["passed"] is True
    failed = checks.run_assertion(declared, bad)
    assert failed["passed"] is False and reason in failed["reason"] and "\n" not in failed["reason"]


def test_a_check_without_a_value_takes_the_items_reference():
    item = {"reference": "180 minutes", "assert": [{"type": "equals"}, {"type": "chrf"}]}
    assert checks.run_all("180 minutes", item, stop_reason="end_of_turn")["passed"] is True
    assert checks.run_all("300 minutes", item, stop_reason="end_of_turn")["passed"] is False


def test_the_python_check_runs_the_answers_function_in_the_sandbox():
    declared = {"type": "python", "value": [["ab", "ba"], ["", ""]]}
    good = "```python\ndef rev(s):\n    return s[::-1]\n```"
    bad = "```python\ndef rev(s):\n    return s\n```"
    result = checks.run_assertion(declared, good)
    if result["passed"] is None:
        pytest.skip(result.get("skipped"))
    assert result["passed"] is True and checks.run_assertion(declared, bad)["passed"] is False


@pytest.mark.parametrize("declared,problem", [
    ({"type": "same-as", "value": "x"}, "unknown type 'same-as'"),
    ({"type": "contains"}, "needs a 'value'"),
    ({"type": "contains", "value": "x", "treshold": 1}, "unknown option(s) treshold"),
    ({"type": "contains-any", "value": "x"}, "non-empty list of strings"),
    ({"type": "number", "value": "many"}, "no number in the value"),
    ({"type": "is-json", "value": {"type": 12}}, "SchemaError"),
    ({"type": "python", "value": "print(1)"}, "[input, expected] cases"),
    ("contains", 'a check is {"type"'),
])
def test_a_malformed_check_is_named_before_any_work(declared, problem):
    assert problem in checks.assertion_problem(declared, None)


def run(answer: str, item: dict, stop_reason: str = "end_of_turn") -> dict:
    return {"id": item["id"], "answer": answer, **checks.run_all(answer, item, prompt="q", stop_reason=stop_reason)}


def test_zero_right_of_three_is_zero_of_three_whatever_the_sanity_checks_say():
    items = [{"id": f"q{i}", "reference": f"{60 * i} minutes", "assert": [{"type": "number"}]} for i in (1, 2, 3)]
    summary = checks.summarize([run("300 minutes", item) for item in items])
    assert (summary["checked"], summary["passed"], summary["pass_rate"]) == (3, 0, 0.0)
    assert summary["sanity"] == {"leakage": 0, "degenerate": 0}
    assert summary["pass_rate_interval"][0] == 0.0 and 0.4 < summary["pass_rate_interval"][1] < 0.6
    right = checks.summarize([run(f"{60 * i} minutes", item) for i, item in zip((1, 2, 3), items)])
    assert (right["passed"], right["pass_rate"]) == (3, 1.0)


def test_a_sanity_check_fails_a_prompt_only_when_it_fires():
    item = {"id": "q", "assert": [{"type": "contains", "value": "180"}]}
    cut_off = run("180 minutes and then 180 minutes", item, stop_reason="length")
    assert cut_off["passed"] is False and any("degenerate: truncated" in f for f in cut_off["failed"])
    unchecked = checks.summarize([run("Hello.", {"id": "u"}), run("180", item)])
    assert (unchecked["prompts"], unchecked["checked"], unchecked["passed"]) == (2, 1, 1)


def test_paired_comparison_counts_fixed_and_broken_with_an_exact_mcnemar_test():
    items = [{"id": f"q{i}", "assert": [{"type": "contains", "value": "yes"}]} for i in range(12)]
    base = [run("yes" if i < 2 else "no", item) for i, item in enumerate(items)]
    adapter = [run("no" if i == 0 else "yes", item) for i, item in enumerate(items)]
    result = checks.paired(base, adapter)
    assert (result["fixed"], result["broken"], result["both_passed"], result["both_failed"]) == (10, 1, 1, 0)
    assert result["p_value"] == round(2 * (1 + 11) / 2 ** 11, 6)  # P(X <= 1), X ~ Bin(11, 1/2), two-sided
    assert checks.paired(base, base)["p_value"] == 1.0


def test_json_checks_answer_a_hostile_nesting_with_a_failure_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000
    assert "nested too deeply" in checks.run_assertion({"type": "is-json"}, deep)["reason"]
    schema = {"type": "array", "items": {"$ref": "#"}}
    assert checks.run_assertion({"type": "is-json", "value": schema}, "[" * 900 + "]" * 900)["passed"] in (True, False)


def test_rewards_score_sampled_answers_by_each_tasks_checks_and_the_specs():
    """GRPO's reward functions (job/evaluation/rewards.py): a task's own checks give the share passed (None for a task
    without checks); a train.rewards check without a value compares against the task's reference (a GSM8K answer's
    '#### 5'); each check type's pass rate is logged."""
    import json

    from job.evaluation import rewards

    own, number = rewards.functions([{"type": "number", "weight": 2.0}], rewards.Timing())
    answers = [[{"role": "assistant", "content": "It is 5 apples."}], [{"role": "assistant", "content": "Seven."}],
               "5 pears"]
    task_checks = [json.dumps([{"type": "contains", "value": "apples"}, {"type": "number", "value": 5}]),
                   json.dumps([{"type": "contains", "value": "apples"}]), "[]"]
    references = ["He has 1 + 4 = 5 apples.\n#### 5"] * 3
    logged = {}
    assert own(prompts=[[]] * 3, completions=answers, checks=task_checks, reference=references,
               log_metric=logged.__setitem__) == [1.0, 0.0, None]
    assert logged == {"checks/contains": 0.5, "checks/number": 1.0}
    assert number(prompts=[[]] * 3, completions=answers, checks=task_checks, reference=references) == [1.0, 0.0, 1.0]
    assert own.__name__ == "checks" and number.__name__ == "number"
