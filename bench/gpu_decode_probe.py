"""On the GPU machine, after a finished t1 run: the adapter target's decode loop (as the evaluate stage runs it)
timed with its thread free, on the first CPU (where the stage's answers-ahead thread is pinned) and on the last,
in one fresh process, each pass after a warm-up pass; the answers must be the same.

    python bench/gpu_decode_probe.py RUN_DIR SPEC.json OUT.json [--set KEY=VALUE ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from job.backends import unsloth

    unsloth.import_library()  # as the job: before transformers
    from job import llamacpp
    from job.evaluation import generate, suite
    from job.rundir import RunDir
    from job.specfile import load_spec
    from job.stages import evaluate as stage

    run_dir = RunDir(Path(sys.argv[1]))
    spec = load_spec(sys.argv[2], [a for a in sys.argv[4:] if a != "--set"])
    prompts = suite.load(spec.evaluate)
    model, tokenizer = stage.load_target("adapter", spec, run_dir)
    cpus = sorted(os.sched_getaffinity(0))
    out: dict = {"cpus": len(cpus)}
    answers = {}
    for name, pinned in (("warm-up", None), ("free", None), ("first_cpu", [cpus[0]]), ("last_cpu", [cpus[-1]]),
                         ("free_again", None)):
        started = time.perf_counter()
        if pinned:
            with llamacpp.this_thread_on(pinned):
                answers[name] = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
        else:
            answers[name] = generate.generate_hf(model, tokenizer, prompts, spec.evaluate)
        out[name + "_s"] = round(time.perf_counter() - started, 2)
    tokens = {n: [a["token_ids"] for a in rows] for n, rows in answers.items()}
    out["same_answers"] = all(t == tokens["free"] for t in tokens.values())
    out["new_tokens"] = sum(len(t) for t in tokens["free"])
    Path(sys.argv[3]).write_text(json.dumps(out))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
