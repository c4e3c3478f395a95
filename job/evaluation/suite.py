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
