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
    answers = [{"answer": a, "checks": checks.run_all(a, {}, prompt="p", stop_reason="end_of_turn")}
               for a in ("Fine.", NOTEBOOK_LEAK)]
    summary = checks.summarize(answers)
    assert summary["leaking_answers"] == 1 and summary["checks"]["leakage"] == 0.5


def test_max_ingredients_without_a_heading_takes_the_first_list():
    assert checks.max_ingredients("1. Olive oil\n2. Garlic\n3. Pasta\n\nBoil and mix.", limit=5)["count"] == 3
    assert not checks.max_ingredients("- a\n- b\n- c\n- d\n- e\n- f", limit=5)["passed"]
