"""How fast the python reward scores sampled answers in the sandbox (docs/grpo.md, "Speed"): honest answers, each in
its own sandboxed interpreter, in batches of 16 and 64.

    python bench/sandbox_rewards.py
"""
import json
import os
import time

from job import settings
from job.evaluation import rewards

CODE = "```python\ndef f(s):\n    return s[::-1]\n```"


def main() -> None:
    settings.init()
    for n in (16, 64):
        answers = [[{"role": "assistant", "content": CODE}] for _ in range(n)]
        _, python = rewards.functions([{"type": "python", "value": [["ab", "ba"], ["abc", "cba"]], "timeout_s": 5}],
                                      rewards.Timing())
        started = time.perf_counter()
        scores = python(prompts=[[]] * n, completions=answers, checks=["[]"] * n, reference=[None] * n,
                        log_metric=lambda *_: None)
        took = time.perf_counter() - started
        print(json.dumps({"answers": n, "seconds": round(took, 2), "answers_per_s": round(n / took, 1),
                          "all_pass": all(s == 1.0 for s in scores), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
