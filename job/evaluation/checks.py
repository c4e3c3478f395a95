"""Automatic checks on an answer.

Declared checks (`ASSERTIONS`) use promptfoo's assertion names: a suite item's `"assert": [{"type": ...,
"value": ...}, ...]`, each a function `(answer, value, item, **options) -> dict` with `passed` and, on a failure,
a one-line `reason` (what was expected, what was found). Any string type takes a `not-` prefix. Where `value`
is left out, the item's `reference` answer is used. The seed's named checks (`CHECKS`: a prompt's `checks`
object) stay; `leakage` and `degenerate` (`ALWAYS`) look at every answer and fail a prompt only when they fire.

    python -m job.evaluation.checks   # prints the catalog
"""
from __future__ import annotations

import inspect
import json
import math
import re
from typing import Any, Callable

ROLE_HEADER = re.compile(r"(?im)^\s*(system|user|assistant|model)\s*(\n|:$)")
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>|<(start|end)_of_turn>|</?s>|<(bos|eos|pad)>")
SYSTEM_TEXT = re.compile(r"Cutting Knowledge Date|Today Date:", re.I)
LIST_ITEM = re.compile(r"^\s*(?:[-*•+]|\d+[.)]|\(?[a-z]\)|[A-Z][.)])\s+\S", re.M)
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def leakage(answer: str, prompt: str = "", **_) -> dict:
    """Chat-template or system text in the answer, or the prompt echoed back."""
    found = []
    if ROLE_HEADER.search(answer[:200]):
        found.append("role header")
    if SPECIAL_TOKEN.search(answer):
        found.append("special token")
    if SYSTEM_TEXT.search(answer):
        found.append("system text")
    if len(prompt) >= 20 and prompt.strip().lower() in answer.lower():
        found.append("prompt echoed")
    return {"passed": not found, "found": found}


def degenerate(answer: str, stop_reason: str | None = None, **_) -> dict:
    """Empty, cut off by the token limit, or looping."""
    problems = []
    if not answer.strip():
        problems.append("empty")
    if stop_reason == "length":
        problems.append("truncated")
    words = answer.split()
    if len(words) >= 24:
        grams = [" ".join(words[i:i + 6]) for i in range(len(words) - 5)]
        repeated = 1 - len(set(grams)) / len(grams)
        if repeated > 0.3:
            problems.append(f"looping ({repeated:.0%} repeated 6-grams)")
    lines = [ln.strip() for ln in answer.splitlines() if ln.strip()]
    if len(lines) >= 4 and max(lines.count(ln) for ln in set(lines)) >= 3:
        problems.append("looping (a line repeated 3+ times)")
    return {"passed": not problems, "problems": problems}


def _first_sentence(answer: str) -> str:
    for line in answer.strip().splitlines():
        line = line.strip().strip('"“”*').strip()
        if line and not line.lower().startswith(("here", "translation", "sure")):
            return re.sub(r"^(swedish|svenska)\s*:\s*", "", line, flags=re.I).strip('"“” ')
    return answer.strip()


def chrf(answer: str, reference: str, min_score: float = 60.0, **_) -> dict:
    """chrF of the translated sentence against a reference translation (0-100)."""
    from sacrebleu.metrics import CHRF

    candidate = _first_sentence(answer)
    score = CHRF().sentence_score(candidate, [reference]).score
    return {"passed": score >= min_score, "score": round(score, 2), "candidate": candidate}


def python_function(answer: str, cases: list[list[Any]], timeout_s: float = 5.0, code_checks: str = "sandboxed",
                    **_) -> dict:
    """Extracts the Python code and tests each top-level function on `cases` ([[input, expected], ...]) in the
    sandbox (job/evaluation/sandbox.py); passes when one function gets every case right."""
    from job import settings
    from job.evaluation import sandbox

    blocks = CODE_BLOCK.findall(answer)
    code = "\n".join(blocks) if blocks else answer[answer.find("def "):] if "def " in answer else ""
    if "def " not in code:
        return {"passed": False, "reason": "no function in the answer"}
    if code_checks == "off":
        return {"passed": None, "skipped": "evaluate.code_checks is 'off'"}
    outcome = sandbox.run_function_cases(code, cases, timeout_s=timeout_s, mode=code_checks,
                                         tool_env=settings.get().tool_env())
    if outcome.skipped:
        return {"passed": None, "skipped": outcome.skipped}
    return {"passed": bool(outcome.function), "function": outcome.function, "isolated": outcome.isolated,
            "reason": None if outcome.function else (outcome.error or "no function passed")}


def list_items(answer: str, expected: int | None = None, sections: dict[str, int] | None = None, **_) -> dict:
    """Counts list items, overall (`expected`) or under headings containing each of `sections`' words."""
    if sections:
        counts, lower = {}, answer.lower()
        positions = sorted((lower.find(word), word) for word in sections if word in lower)
        for k, (start, word) in enumerate(positions):
            end = positions[k + 1][0] if k + 1 < len(positions) else len(answer)
            counts[word] = len(LIST_ITEM.findall(answer[start:end]))
        passed = all(counts.get(word) == n for word, n in sections.items())
        return {"passed": passed, "counts": counts, "expected": sections}
    count = len(LIST_ITEM.findall(answer))
    if count == 0:  # prose lists: "First, ... Second, ... Third, ..."
        count = len(re.findall(r"\b(first|second|third|fourth|fifth)(ly)?\b", answer, re.I))
    return {"passed": count == expected, "count": count, "expected": expected}


def max_ingredients(answer: str, limit: int = 5, **_) -> dict:
    """Counts the items of the ingredients list (from an 'Ingredients' heading to the next heading)."""
    match = re.search(r"ingredients?\b.*?\n(.*?)(?:\n\s*\n\s*(?:#|\*\*|[A-Z][a-z]+:)|\n\s*(?:#+|\*\*)?\s*"
                      r"(instructions|directions|steps|method|preparation)|\Z)", answer, re.I | re.S)
    if match:
        count = len(LIST_ITEM.findall(match.group(1)))
    else:  # no heading: the answer's first list is taken as the ingredients
        block = re.search(r"((?:^\s*(?:[-*•+]|\d+[.)])\s+\S.*(?:\n|$))+)", answer, re.M)
        if not block:
            return {"passed": False, "count": None, "reason": "no ingredients list"}
        count = len(LIST_ITEM.findall(block.group(1)))
    return {"passed": 0 < count <= limit, "count": count, "limit": limit}


# ------------------------------------------------------------------ declared checks (promptfoo's names)


def _shown(text: Any, limit: int = 60) -> str:
    if not isinstance(text, str):
        shown = json.dumps(text, ensure_ascii=False)
        return shown if len(shown) <= limit else shown[: limit - 1] + "…"
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _result(passed: bool, reason: str, **figures) -> dict:
    return {"passed": passed, **figures, **({} if passed else {"reason": reason})}


def _text_value(value: Any, kind: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{kind}: 'value' is a string")
    return value


def _texts_value(value: Any, kind: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{kind}: 'value' is a non-empty list of strings")
    return value


def assert_equals(answer: str, value: Any, **_) -> dict:
    """the answer (trimmed) is exactly `value`"""
    want = _text_value(value, "equals").strip()
    return _result(answer.strip() == want, f"expected {_shown(want)}, found {_shown(answer.strip())}")


def assert_contains(answer: str, value: Any, **_) -> dict:
    """`value` appears in the answer"""
    want = _text_value(value, "contains")
    return _result(want in answer, f"expected {_shown(want)} in the answer, found {_shown(answer)}")


def assert_icontains(answer: str, value: Any, **_) -> dict:
    """`value` appears in the answer, ignoring case"""
    want = _text_value(value, "icontains")
    return _result(want.lower() in answer.lower(), f"expected {_shown(want)} (any case), found {_shown(answer)}")


def assert_contains_any(answer: str, value: Any, **_) -> dict:
    """at least one of the strings in `value` appears in the answer"""
    wants = _texts_value(value, "contains-any")
    return _result(any(w in answer for w in wants), f"expected one of {_shown(wants)}, found {_shown(answer)}")


def assert_contains_all(answer: str, value: Any, **_) -> dict:
    """every string in `value` appears in the answer"""
    missing = [w for w in _texts_value(value, "contains-all") if w not in answer]
    return _result(not missing, f"missing {_shown(missing)} in {_shown(answer)}")


def assert_starts_with(answer: str, value: Any, **_) -> dict:
    """the answer (trimmed) starts with `value`"""
    want = _text_value(value, "starts-with")
    return _result(answer.strip().startswith(want), f"expected it to start with {_shown(want)}, found {_shown(answer)}")


# A pattern can come from data (a task's checks, a held-out row's reference): one that backtracks without end
# ((a|aa)+$ on a long answer) fails its check after this long instead of holding the job (the `regex` package's
# matcher takes a timeout; the standard library's does not).
PATTERN_TIMEOUT_S = 1.0
LEVENSHTEIN_MAX_CHARS = 10_000  # the distance is quadratic in the texts' lengths


def pattern_search(pattern: str, text: str):
    """`regex.search` under PATTERN_TIMEOUT_S. Raises ValueError for a pattern that is not one or takes too long."""
    import regex

    try:
        return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S)
    except regex.error as exc:
        raise ValueError(f"regex: {pattern[:80]!r} is not a regular expression ({exc})") from None
    except TimeoutError:
        raise ValueError(f"regex: {pattern[:80]!r} took over {PATTERN_TIMEOUT_S:g} s on the answer (a pattern "
                         "that backtracks without end)") from None


def assert_regex(answer: str, value: Any, **_) -> dict:
    """the regular expression `value` matches somewhere in the answer"""
    pattern = _text_value(value, "regex")
    return _result(pattern_search(pattern, answer) is not None, f"no match for /{pattern}/ in {_shown(answer)}")


def _json_text(answer: str) -> str:
    fenced = re.fullmatch(r"\s*```(?:json)?\s*\n(.*?)```\s*", answer, re.S)
    return fenced.group(1) if fenced else answer


def assert_is_json(answer: str, value: Any = None, **_) -> dict:
    """the answer (or its one ```json block) parses as JSON; `value`, when given, is a JSON Schema it must meet"""
    if value is not None:
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(value)
        GuardedValidator = _guarded_validator()
    try:
        parsed = json.loads(_json_text(answer))
    except ValueError as exc:
        return _result(False, f"expected JSON, found {_shown(answer)} ({str(exc).split(':')[0]})")
    except RecursionError:  # an answer of thousands of nested brackets
        return _result(False, f"expected JSON, found {_shown(answer)} (nested too deeply)")
    if value is None:
        return _result(True, "")
    import jsonschema

    try:
        error = jsonschema.exceptions.best_match(GuardedValidator(value).iter_errors(parsed))
    except RecursionError:
        return _result(False, f"JSON nested too deeply to check against the schema: {_shown(answer)}")
    except ValueError as exc:  # a pattern of the schema that backtracks without end
        return _result(False, str(exc))
    where = "/".join(str(p) for p in error.absolute_path) if error else ""
    return _result(error is None, f"JSON does not meet the schema at '{where or '/'}': {error.message if error else ''}"[:300])


def _guarded_validator():
    """JSON Schema 2020-12 with its `pattern` and `patternProperties` matched under PATTERN_TIMEOUT_S (jsonschema's
    own use the standard library's matcher, which a schema from data could hold for ever); no remote `$ref` is ever
    fetched (jsonschema's default registry retrieves nothing)."""
    import jsonschema
    from jsonschema import validators

    def pattern(validator, expected, instance, schema):
        if validator.is_type(instance, "string") and not pattern_search(expected, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {expected!r}"[:300])

    def pattern_properties(validator, patterns, instance, schema):
        if not validator.is_type(instance, "object"):
            return
        for expected, subschema in patterns.items():
            for name, item in instance.items():
                if pattern_search(expected, name):
                    yield from validator.descend(item, subschema, path=name, schema_path=expected)

    return validators.extend(jsonschema.Draft202012Validator,
                             {"pattern": pattern, "patternProperties": pattern_properties})


NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def assert_number(answer: str, value: Any, tolerance: float | str = 0, **_) -> dict:
    """the answer's last number equals `value` (or the last number of a text, such as the reference) within
    `tolerance` (absolute, or relative as "1%")"""
    if isinstance(value, str):  # a reference answer: its last number
        numbers = NUMBER.findall(value)
        if not numbers:
            raise ValueError(f"number: no number in the value {_shown(value)}")
        value = float(numbers[-1].replace(",", ""))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError("number: 'value' is a number (or a text with one)")
    found = NUMBER.findall(answer)
    if not found:
        return _result(False, f"expected {value:g}, found no number in {_shown(answer)}")
    got = float(found[-1].replace(",", ""))
    if isinstance(tolerance, str) and tolerance.strip().endswith("%"):
        allowed = abs(value) * float(tolerance.strip()[:-1]) / 100
    else:
        allowed = float(tolerance)
    within = f" ± {allowed:g}" if allowed else ""
    return _result(abs(got - value) <= allowed, f"expected {value:g}{within}, found {got:g}", number=got)


def assert_chrf(answer: str, value: Any, threshold: float = 60.0, **_) -> dict:
    """chrF (0-100) of the answer against `value` is at least `threshold` (default 60)"""
    from sacrebleu.metrics import CHRF

    reference = _text_value(value, "chrf")
    score = CHRF().sentence_score(answer.strip(), [reference]).score
    return _result(score >= threshold, f"chrF {score:.1f} < {threshold:g} against {_shown(reference)}, found "
                   f"{_shown(answer)}", score=round(score, 2))


def levenshtein_distance(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def assert_levenshtein(answer: str, value: Any, threshold: int = 5, **_) -> dict:
    """the edit distance from the answer (trimmed) to `value` is at most `threshold` (default 5)"""
    want = _text_value(value, "levenshtein")
    if len(want) > LEVENSHTEIN_MAX_CHARS:
        raise ValueError(f"levenshtein: the value is {len(want)} characters; at most {LEVENSHTEIN_MAX_CHARS}")
    distance = levenshtein_distance(answer.strip()[: 4 * len(want) + 64], want)
    return _result(distance <= threshold, f"edit distance {distance} > {threshold} from {_shown(want)}, found "
                   f"{_shown(answer)}", distance=distance)


def assert_python(answer: str, value: Any, timeout_s: float = 5.0, code_checks: str = "sandboxed", **_) -> dict:
    """a function in the answer's Python code maps each input of `value` ([[input, expected], ...]) to its
    expected output, run in the sandbox"""
    if not isinstance(value, list) or not all(isinstance(c, list) and len(c) == 2 for c in value):
        raise ValueError("python: 'value' is a list of [input, expected] cases")
    return python_function(answer, value, timeout_s=timeout_s, code_checks=code_checks)


ASSERTIONS: dict[str, Callable[..., dict]] = {
    "equals": assert_equals, "contains": assert_contains, "icontains": assert_icontains,
    "contains-any": assert_contains_any, "contains-all": assert_contains_all, "starts-with": assert_starts_with,
    "regex": assert_regex, "is-json": assert_is_json, "number": assert_number, "chrf": assert_chrf,
    "levenshtein": assert_levenshtein, "python": assert_python,
}
NEGATABLE = ("equals", "contains", "icontains", "contains-any", "contains-all", "starts-with", "regex", "is-json")
VALUE_OPTIONAL = ("is-json",)  # every other type takes `value`, or else the item's `reference`


def weighed_check(entry: dict) -> dict:
    """The check of a train.rewards entry, without the weight the reward gives it."""
    return {k: v for k, v in entry.items() if k != "weight"}


def assertion_problem(declared: Any, reference: str | None, each_row: bool = False) -> str | None:
    """Why `declared` is not a check this catalog can run (its type, value or options), or None. With
    `each_row` (evaluate.from_data) a check without a value takes each row's reference, which is not known yet."""
    if not isinstance(declared, dict) or not isinstance(declared.get("type"), str):
        return 'a check is {"type": ..., "value": ...} (see `peftopt checks`)'
    kind = declared["type"]
    base = kind[4:] if kind.startswith("not-") and kind[4:] in NEGATABLE else kind
    if base not in ASSERTIONS:
        import difflib

        close = difflib.get_close_matches(kind, [*ASSERTIONS, *(f"not-{k}" for k in NEGATABLE)], n=1, cutoff=0.75)
        meant = f"; did you mean {close[0]!r}?" if close else ""
        return (f"unknown type {kind!r}{meant} (known: {', '.join(ASSERTIONS)}; not-<type> for "
                f"{', '.join(NEGATABLE)})")
    signature = inspect.signature(ASSERTIONS[base])
    options = [k for k in signature.parameters if k not in ("answer", "value", "code_checks", "_")]
    unknown = [k for k in declared if k not in ("type", "value", *options)]
    if unknown:
        return f"{kind}: unknown option(s) {', '.join(unknown)} (takes: value{', ' if options else ''}{', '.join(options)})"
    if "value" not in declared and reference is None and base not in VALUE_OPTIONAL and not each_row:
        return f"{kind}: needs a 'value' (or the item's 'reference')"
    if each_row and "value" not in declared and base not in VALUE_OPTIONAL:
        return None
    try:  # the value's shape, tried on an empty answer
        _assertion(declared, "", reference=reference, code_checks="off")
    except (ValueError, TypeError, re.error) as exc:
        return str(exc)
    except Exception as exc:  # a schema that is not one (jsonschema's SchemaError) and the like
        return f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def run_assertion(declared: dict, answer: str, *, reference: str | None = None,
                  code_checks: str = "sandboxed") -> dict:
    """One declared check's result; a value it cannot use (a reference without a number, for `number`) is a
    failure saying so."""
    try:
        return _assertion(declared, answer, reference=reference, code_checks=code_checks)
    except (ValueError, TypeError, re.error) as exc:
        return {"type": declared.get("type"), "passed": False, "reason": str(exc).splitlines()[0][:300]}


def _assertion(declared: dict, answer: str, *, reference: str | None, code_checks: str) -> dict:
    kind = declared["type"]
    negated = kind.startswith("not-") and kind[4:] in NEGATABLE
    base = kind[4:] if negated else kind
    options = {k: v for k, v in declared.items() if k not in ("type", "value")}
    value = declared.get("value", None if base in VALUE_OPTIONAL else reference)
    extra = {"code_checks": code_checks} if base == "python" else {}
    result = ASSERTIONS[base](answer, value, **options, **extra)
    if negated and result["passed"] is not None:
        passed = not result["passed"]
        result = {k: v for k, v in result.items() if k != "reason"}
        result.update(passed=passed, **({} if passed else {"reason": f"expected no match for {kind[4:]} "
                                                                    f"{_shown(value)}, found {_shown(answer)}"}))
    return {"type": kind, **result}


CHECKS: dict[str, Callable[..., dict]] = {
    "leakage": leakage, "degenerate": degenerate, "chrf": chrf, "python_function": python_function,
    "list_items": list_items, "max_ingredients": max_ingredients,
}
ALWAYS = ("leakage", "degenerate")


CODE_CHECKS = ("python_function",)  # checks that run the answer's code


def settings_problem(name: str, settings: Any) -> str | None:
    """Why `settings` cannot configure check `name` (a missing or unknown parameter), or None."""
    if not isinstance(settings, dict):
        return "settings are an object of parameters"
    signature = inspect.signature(CHECKS[name])
    params = {k: p for k, p in signature.parameters.items()
              if k not in ("answer", "prompt", "stop_reason", "code_checks") and p.kind is not p.VAR_KEYWORD}
    unknown = [k for k in settings if k not in params]
    missing = [k for k, p in params.items() if p.default is p.empty and k not in settings]
    if unknown:
        return f"unknown parameter(s) {', '.join(unknown)} (takes: {', '.join(params) or 'none'})"
    if missing:
        return f"missing parameter(s) {', '.join(missing)}"
    return None


def run_all(answer: str, item: dict, *, prompt: str = "", stop_reason: str | None = None,
            code_checks: str = "sandboxed") -> dict:
    """Every check of a suite item on one answer: {"checks": {name: result} (the sanity checks and the seed's
    named checks), "assert": [result, ...] (the declared checks), "passed": True/False, or None when the item
    declares no check, "failed": [one-line reasons, the sanity checks' when they fire]}. A prompt passes when every declared check passes (a check
    that could not run here is left out) and neither sanity check fires."""
    named = {name: CHECKS[name](answer, prompt=prompt, stop_reason=stop_reason) for name in ALWAYS}
    for name, params in (item.get("checks") or {}).items():
        if name not in CHECKS:
            named[name] = {"passed": False, "reason": f"unknown check {name!r}"}
            continue
        extra = {"code_checks": code_checks} if name in CODE_CHECKS else {}
        named[name] = CHECKS[name](answer, **(params or {}), **extra)
    declared = [run_assertion(d, answer, reference=item.get("reference"), code_checks=code_checks)
                for d in item.get("assert") or []]
    results = [r for n, r in named.items() if n not in ALWAYS] + declared
    ran = [r for r in results if r.get("passed") is not None]
    failed = [f"{r.get('type', n)}: {r.get('reason') or _figures(r)}" for n, r in
              [(n, r) for n, r in named.items() if n not in ALWAYS] + [(r["type"], r) for r in declared]
              if r.get("passed") is False]
    fired = [f"{name}: {', '.join(named[name].get('found') or named[name].get('problems') or [])}"
             for name in ALWAYS if not named[name]["passed"]]
    passed = None if not ran else not failed and not fired
    return {"checks": named, "assert": declared, "passed": passed, "failed": failed + fired}


def _figures(result: dict) -> str:
    """A named check's failure in one line, from what it found (count=5, expected=3)."""
    shown = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in result.items() if k != "passed")
    return shown[:200] or "failed"


def wilson_interval(passed: int, total: int, z: float = 1.96) -> list[float] | None:
    """The 95% Wilson score interval of a pass rate (sound at 0/n and n/n, where the normal one is not)."""
    if not total:
        return None
    p = passed / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, a prompt that changed is fixed or broken with even
    odds, so min(fixed, broken) is binomial(fixed + broken, 1/2)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return round(min(1.0, 2 * tail), 6)


def paired(base: list[dict], other: list[dict]) -> dict:
    """Base against another target on the prompts both checked: fixed (base failed, the other passed), broken
    (the reverse), and whether the difference is more than chance (exact McNemar test)."""
    verdicts = {a["id"]: a.get("passed") for a in base}
    pairs = [(verdicts[a["id"]], a.get("passed")) for a in other
             if verdicts.get(a["id"]) is not None and a.get("passed") is not None]
    fixed = sum(1 for b, o in pairs if not b and o)
    broken = sum(1 for b, o in pairs if b and not o)
    return {"prompts": len(pairs), "fixed": fixed, "broken": broken,
            "both_passed": sum(1 for b, o in pairs if b and o), "both_failed": sum(1 for b, o in pairs if not b and not o),
            "p_value": mcnemar_exact(fixed, broken), "test": "exact McNemar (two-sided)"}


def summarize(answers: list[dict]) -> dict:
    """A target's figures: prompts passed of the prompts with declared checks (and its 95% interval), how often
    each sanity check fired, and each check's own pass rate."""
    per_check: dict[str, list[bool]] = {}
    skipped: dict[str, str] = {}
    for answer in answers:
        results = list(answer.get("checks", {}).items()) + [(r["type"], r) for r in answer.get("assert", [])]
        for name, result in results:
            if result.get("passed") is None:  # not run (no isolation, or code checks off): not a failure
                skipped[name] = result.get("skipped", "not run")
                continue
            per_check.setdefault(name, []).append(bool(result["passed"]))
    checked = [a for a in answers if a.get("passed") is not None]
    passed = sum(1 for a in checked if a["passed"])
    chrf_scores = [a["checks"]["chrf"]["score"] for a in answers if "chrf" in a.get("checks", {})]
    return {
        "prompts": len(answers), "checked": len(checked), "passed": passed,
        "pass_rate": round(passed / len(checked), 4) if checked else None,
        "pass_rate_interval": wilson_interval(passed, len(checked)),
        "sanity": {name: sum(1 for a in answers if not a.get("checks", {}).get(name, {"passed": True})["passed"])
                   for name in ALWAYS},
        "checks": {name: round(sum(v) / len(v), 4) for name, v in per_check.items()},
        "leaking_answers": sum(not a["checks"]["leakage"]["passed"] for a in answers if "checks" in a),
        "chrf": chrf_scores[0] if len(chrf_scores) == 1 else chrf_scores or None,
        **({"skipped_checks": skipped} if skipped else {}),
    }


def catalog() -> str:
    lines = ["Declared checks (a suite item's \"assert\": [{\"type\": ..., \"value\": ...}]; value defaults to "
             "the item's reference):"]
    for name, fn in ASSERTIONS.items():
        options = [k for k in inspect.signature(fn).parameters if k not in ("answer", "value", "code_checks", "_")]
        extra = f" (options: {', '.join(options)})" if options else ""
        lines.append(f"  {name}: {' '.join(fn.__doc__.split())}{extra}")
    lines.append(f"  not-<type>: the opposite, for {', '.join(NEGATABLE)}")
    lines.append("Named checks (a prompt's \"checks\": {name: settings}):")
    for name, fn in CHECKS.items():
        lines.append(f"  {name}: {fn.__doc__.strip().splitlines()[0]}{' (every answer)' if name in ALWAYS else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(catalog())
