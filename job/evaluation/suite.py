"""Writing a target's answers (`eval/<target>.jsonl`) and keeping `eval/summary.json` up to date."""
from __future__ import annotations

import json

from job.evaluation import checks
from job.rundir import RunDir, atomic_write_bytes, atomic_write_json, read_json


def record(run_dir: RunDir, target: str, suite: list[dict], answers: list[dict]) -> dict:
    by_id = {item["id"]: item for item in suite}
    for answer in answers:
        answer["checks"] = checks.run_all(answer["answer"], by_id.get(answer["id"], {}).get("checks", {}),
                                          prompt=answer["prompt"], stop_reason=answer.get("stop_reason"))
    payload = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers).encode()
    atomic_write_bytes(run_dir.eval_dir / f"{target}.jsonl", payload)
    summary = read_json(run_dir.eval_dir / "summary.json") or {"targets": {}}
    summary["targets"][target] = checks.summarize(answers)
    atomic_write_json(run_dir.eval_dir / "summary.json", summary)
    return summary["targets"][target]


def timing(answers: list[dict], load_s: float, generate_s: float) -> dict:
    """Where an evaluation's time went: loading the model, and generating (tokens per second over the batch)."""
    new_tokens = sum(len(a["token_ids"]) for a in answers)
    return {"load_s": round(load_s, 2), "generate_s": round(generate_s, 2), "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / generate_s, 1) if generate_s > 0 else None}
