"""`evaluate.harness`: standard benchmarks through EleutherAI's lm-evaluation-harness, for the base and the adapter
with the same settings (tasks, limit, few-shot examples, batch size, dtype).

The harness runs in a child process (`python -m job.harness`): its imports (scikit-learn and the rest, which
transformers picks up when it finds them) stay out of the job's process, and the image keeps it in a directory of
its own (`PEFTOPT_HARNESS_DIR`) that only that child has on its path. The child prints one JSON line.

    python -m job.harness tasks '{"tasks": ["minutes"], "include_path": "tasks"}'
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from job.errors import ExternalError, SpecError
from job.log import get_logger

log = get_logger("peftopt.harness")


def _child(action: str, payload: dict, settings, what: str, timeout: float | None = None) -> dict:
    """Runs `python -m job.harness ACTION PAYLOAD`, and returns its JSON line. Raises ExternalError (the child
    failed: its last line), Interrupted (a stop request ended it)."""
    from job import interrupt

    proc = subprocess.Popen([sys.executable, "-m", "job.harness", action, json.dumps(payload)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=settings.harness_env())
    out, err = interrupt.wait_for(proc, what, timeout=timeout)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExternalError(f"{what} failed (exit {proc.returncode}): {tail[0][:300]}")
    return json.loads(line)


def problems(harness, settings) -> list[str]:
    """Preflight: the harness is installed here and knows every task the spec names."""
    payload = {"tasks": harness.tasks, "include_path": harness.include_path}
    if harness.include_path and not Path(harness.include_path).is_dir():
        return [f"evaluate.harness.include_path: {harness.include_path} is not a directory"]
    try:
        found = _child("tasks", payload, settings, "lm-evaluation-harness (listing its tasks)", timeout=600)
    except ExternalError as exc:
        return [f"evaluate.harness: {exc.message}"]
    if found.get("missing_harness"):
        return ["evaluate.harness: lm-evaluation-harness is not installed here (the image has it; for a venv: "
                "pip install 'peftopt[harness]')"]
    return [f"evaluate.harness.tasks: unknown task {name!r} (not one of the harness's, nor defined under "
            f"include_path)" for name in found["unknown"]]


def score(spec, run_dir, device: str, settings) -> dict[str, Any]:
    """{target: {task: {metric: value, metric_stderr: value}}} for the base and the adapter."""
    from job import modelsrc

    harness = spec.evaluate.harness
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(modelsrc.dtype_for(spec, device)).replace("torch.", ""), "auto")
    common = {"tasks": harness.tasks, "include_path": harness.include_path, "limit": harness.limit,
              "num_fewshot": harness.num_fewshot, "batch_size": harness.batch_size, "device": device,
              "model": str(modelsrc.model_location(spec, run_dir)), "dtype": dtype,
              "load_in_4bit": bool(spec.model.load_in_4bit), "seed": spec.evaluate.seed}
    out = {}
    for target, adapter in (("base", None), ("adapter", str(run_dir.adapter_dir))):
        started = time.perf_counter()
        result = _child("score", {**common, "peft": adapter}, settings, f"lm-evaluation-harness on the {target}")
        out[target] = result["scores"]
        log.info("harness_scored", target=target, scores=result["scores"],
                 seconds=round(time.perf_counter() - started, 1))
    return out


# ------------------------------------------------------------------------------------------- the child


def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _tasks(payload: dict) -> dict:
    try:
        manager = _task_manager(payload.get("include_path"))
    except ImportError:
        return {"missing_harness": True}
    known = set(manager.all_tasks)
    return {"unknown": [name for name in payload["tasks"] if name not in known]}


def _score(payload: dict) -> dict:
    import lm_eval

    model_args: dict[str, Any] = {"pretrained": payload["model"], "dtype": payload["dtype"]}
    if payload.get("peft"):
        model_args["peft"] = payload["peft"]
    if payload.get("load_in_4bit"):
        model_args["load_in_4bit"] = True
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=payload["tasks"], limit=payload.get("limit"),
        num_fewshot=payload.get("num_fewshot"), batch_size=payload["batch_size"], device=payload["device"],
        task_manager=_task_manager(payload.get("include_path")), random_seed=payload["seed"],
        numpy_random_seed=payload["seed"], torch_random_seed=payload["seed"], fewshot_random_seed=payload["seed"],
        log_samples=False)
    scores = {}
    for task, figures in results["results"].items():
        scores[task] = {key.split(",")[0]: value for key, value in figures.items()
                        if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}
        scores[task]["examples"] = (results.get("n-samples") or {}).get(task, {}).get("effective")
    return {"scores": scores}


def main(argv: list[str]) -> int:
    action, payload = argv[0], json.loads(argv[1])
    # The harness and its libraries print freely: stdout carries only the answer line, at the end.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        answer = {"tasks": _tasks, "score": _score}[action](payload)
    except SpecError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
