"""Evaluate's work moved off the job's critical path on a GPU, run here on the CPU with the real pieces: the base
and adapter targets answered by a thread while merge and gguf run (evaluate.AnswersAhead), and the GGUF answered
by llama.cpp's CUDA build with its fall-back to the CPU build when that fails. The answers must be the ones the
stage makes in its turn."""
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import events, run_cli, write_tiny_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model, tiny_data):
    """A whole run whose suite is answered by base, adapter and a q8_0 GGUF: (spec path, run dir, answers by
    target as the stage made them in turn)."""
    out = tmp_path_factory.mktemp("ahead")
    path = write_tiny_spec(out, tiny_model, tiny_data, "ahead", train={"max_steps": 4},
                           evaluate={"prompts": ["Say hello.", "Name a colour.", "Tell me one thing about coffee."],
                                     "max_new_tokens": 10, "targets": ["base", "adapter", "gguf"]},
                           export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpe", "verify_tokens": 6})
    done = run_cli("run", path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = out / "runs" / "ahead"
    import torch

    if torch.cuda.is_available():  # the gpu tier: the job itself answered ahead, and the GGUF with the CUDA build
        assert "target_answered_ahead" in {e["event"] for e in events(done.stdout)}
        timing = json.loads((run_dir / "metrics.json").read_text())["evaluate"]["gguf-q8_0"]["timing"]
        assert timing["device"] == "cuda", timing
    return path, run_dir, {name: token_ids(run_dir, name) for name in ("base", "adapter", "gguf-q8_0")}


def token_ids(run_dir: Path, target: str) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in (run_dir / "eval" / f"{target}.jsonl").read_text().splitlines()]


def context(spec_path: Path, run_dir: Path):
    from job import settings
    from job.rundir import RunDir
    from job.specfile import load_spec
    from job.stages.base import RunContext

    return RunContext(spec=load_spec(spec_path), run_dir=RunDir(run_dir), settings=settings.init())


def test_targets_answered_ahead_are_the_answers_made_in_turn(evaluated_run):
    from job.stages import evaluate

    spec_path, run_dir, made_in_turn = evaluated_run
    ctx = context(spec_path, run_dir)
    ahead = evaluate.AnswersAhead(ctx, ["base", "adapter"], room=lambda spec, run_dir: True)
    with capture_logs() as logged:
        ahead.thread.start()
        for stage in ("prepare", "train"):  # as the runner marks them, while merge and gguf would run
            ctx.done[stage].set()
        ahead.thread.join(timeout=300)
        assert set(ahead.answers) == {"base", "adapter"}
        ctx.warm["evaluate"] = ahead
        result = evaluate.run(ctx)
    assert [e["target"] for e in logged if e["event"] == "target_answered_ahead"] == ["base", "adapter"]
    assert ahead.answers == {}  # each taken by the stage, none answered twice
    for target in ("base", "adapter", "gguf-q8_0"):
        assert token_ids(run_dir, target) == made_in_turn[target], target
    assert result.metrics["adapter"]["timing"]["new_tokens"] == sum(map(len, made_in_turn["adapter"]))


def test_a_needed_stage_this_job_does_not_run_leaves_the_answers_to_the_stage(evaluated_run):
    """`--stages evaluate`: train is never marked done in this job; the waiting thread is stopped, not waited on."""
    from job.stages import evaluate

    spec_path, run_dir, made_in_turn = evaluated_run
    ctx = context(spec_path, run_dir)
    ahead = evaluate.AnswersAhead(ctx, ["base", "adapter"], room=lambda spec, run_dir: True)
    ctx.done["prepare"].set()
    with capture_logs() as logged:
        ahead.thread.start()
        ctx.warm["evaluate"] = ahead
        started = time.monotonic()
        evaluate.run(ctx)
    assert not ahead.thread.is_alive() and time.monotonic() - started < 120
    assert not [e for e in logged if e["event"] == "target_answered_ahead"]
    assert token_ids(run_dir, "adapter") == made_in_turn["adapter"]


def test_no_room_on_the_gpu_and_a_stop_leave_the_answers_to_the_stage(evaluated_run):
    from job.stages import evaluate

    spec_path, run_dir, made_in_turn = evaluated_run
    ctx = context(spec_path, run_dir)
    for stage in ("prepare", "train"):
        ctx.done[stage].set()
    cramped = evaluate.AnswersAhead(ctx, ["adapter"], room=lambda spec, run_dir: False)
    cramped.thread.start()
    cramped.thread.join(timeout=60)
    assert cramped.result("adapter") is None
    stopped = evaluate.AnswersAhead(ctx, ["adapter"], room=lambda spec, run_dir: True)
    stopped.stop.set()  # the job ended (a failure or a stop request) before the thread got to answer
    stopped.thread.start()
    stopped.thread.join(timeout=120)
    assert not stopped.thread.is_alive() and stopped.result("adapter") is None


def test_the_gpu_build_failing_falls_back_to_the_cpu_build_with_the_same_answers(evaluated_run, tmp_path,
                                                                               monkeypatch):
    """A CUDA build of peftopt-generate that fails (here: a GPU its kernels were not built for, played by a program
    that says so and exits 1) costs a warning, not the stage: the GGUF answers on the CPU as it does without one."""
    from job import llamacpp, settings
    from job.evaluation import suite
    from job.stages import evaluate

    spec_path, run_dir, made_in_turn = evaluated_run
    prefix = tmp_path / "llama.cpp"
    shutil.copytree(llamacpp.find().prefix, prefix)
    cuda = prefix / "bin" / "peftopt-generate-cuda"
    cuda.write_text("#!/bin/sh\necho 'ggml_cuda_compute_forward: no kernel image is available for execution' >&2\n"
                    "exit 1\n")
    cuda.chmod(0o755)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(prefix))
    settings.init()
    ctx = context(spec_path, run_dir)
    prompts = suite.load(ctx.spec.evaluate, run_dir)
    with capture_logs() as logged:
        answers = evaluate.gguf_answers(ctx.spec, ctx.run_dir, prompts, gpu={"CUDA_VISIBLE_DEVICES": "0"},
                                        stop=threading.Event())
    failed = [e for e in logged if e["event"] == "gguf_gpu_failed"]
    assert len(failed) == 1 and "no kernel image" in failed[0]["error"]
    made, _, device = answers["gguf-q8_0"]
    on_cpu, _, _ = evaluate.gguf_answers(ctx.spec, ctx.run_dir, prompts)["gguf-q8_0"]
    assert device == "cpu" and [a["token_ids"] for a in made] == [a["token_ids"] for a in on_cpu]
    # Without a usable GPU, or with PEFTOPT_GGUF_GPU=0, the CUDA build is never chosen.
    import torch

    if not torch.cuda.is_available():
        assert llamacpp.gpu_generation(llamacpp.find()) is None
    monkeypatch.setenv("PEFTOPT_GGUF_GPU", "0")
    assert settings.init().gguf_gpu is False and llamacpp.gpu_generation(llamacpp.find()) is None
