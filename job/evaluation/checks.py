"""Automatic checks on an answer. Each check is a small function `(answer, **params) -> dict` with at
least `passed: bool`; a prompt's `checks` object in its suite names which apply and with what params.
`leakage` and `degenerate` apply to every answer.

    python -m job.evaluation.checks   # prints the registered checks
"""
from __future__ import annotations

import inspect
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


def run_all(answer: str, configured: dict[str, dict], *, prompt: str = "", stop_reason: str | None = None,
            code_checks: str = "sandboxed") -> dict:
    results = {name: CHECKS[name](answer, prompt=prompt, stop_reason=stop_reason) for name in ALWAYS}
    for name, params in configured.items():
        if name not in CHECKS:
            results[name] = {"passed": False, "reason": f"unknown check {name!r}"}
            continue
        extra = {"code_checks": code_checks} if name in CODE_CHECKS else {}
        results[name] = CHECKS[name](answer, **(params or {}), **extra)
    return results


def summarize(answers: list[dict]) -> dict:
    per_check: dict[str, list[bool]] = {}
    skipped: dict[str, str] = {}
    for answer in answers:
        for name, result in answer.get("checks", {}).items():
            if result.get("passed") is None:  # not run (no isolation, or code checks off): not a failure
                skipped[name] = result.get("skipped", "not run")
                continue
            per_check.setdefault(name, []).append(bool(result["passed"]))
    scores = {name: round(sum(v) / len(v), 4) for name, v in per_check.items()}
    all_results = [ok for v in per_check.values() for ok in v]
    chrf_scores = [a["checks"]["chrf"]["score"] for a in answers if "chrf" in a.get("checks", {})]
    return {
        "prompts": len(answers), "pass_rate": round(sum(all_results) / len(all_results), 4) if all_results else None,
        "checks": scores, "leaking_answers": sum(not a["checks"]["leakage"]["passed"] for a in answers if "checks" in a),
        "chrf": chrf_scores[0] if len(chrf_scores) == 1 else chrf_scores or None,
        **({"skipped_checks": skipped} if skipped else {}),
    }


if __name__ == "__main__":
    for check_name, fn in CHECKS.items():
        print(f"{check_name}: {fn.__doc__.strip().splitlines()[0]}")
