"""Integration (CPU) and gpu: the training step's Triton kernels compiled ahead by a child process
(job/backends/kernels_ahead.py). On the CPU: when a job asks for it, the child's plumbing (its own cache
directory, its answer, the clean-up) with a child that cannot import unsloth here, and hf's made-up steps through
the job's own trainer on a model of one layer. On a GPU: a t1-shaped run's first step finds the kernels compiled."""
import json
import os
from pathlib import Path

import pytest
import torch

from job.backends import kernels_ahead
from job.rundir import RunDir
from job.settings import load
from job.specfile import validate_data


def _spec(tiny_model, **train):
    return validate_data({"name": "k", "model": {"base": str(tiny_model), "chat_template": "llama-3"},
                          "data": {"source": "x.jsonl"}, "lora": {}, "train": {"max_steps": 1, **train}})


@pytest.mark.parametrize("train,device,environ,wanted", [
    ({}, "cuda", {}, True),
    ({"backend": "unsloth"}, "cuda", {}, True),
    ({}, "cpu", {}, False),
    ({"backend": "hf"}, "cuda", {}, True),
    ({"backend": "hf", "method": "dpo"}, "cuda", {}, False),
    ({"backend": "hf"}, "cpu", {}, False),
    ({}, "cuda", {"PEFTOPT_KERNELS_AHEAD": "0"}, False),
    ({}, "cuda", {"WORLD_SIZE": "2"}, False),
    ({"method": "dpo"}, "cuda", {}, False),
])
def test_when_a_job_compiles_ahead(tiny_model, train, device, environ, wanted):
    assert kernels_ahead.wanted(_spec(tiny_model, **train), load(environ), device) is wanted


def test_a_gguf_base_is_made_by_prepare_and_not_compiled_ahead(tmp_path):
    spec = validate_data({"name": "k", "model": {"base": str(tmp_path / "m.gguf"), "chat_template": "llama-3"},
                          "data": {"source": "x.jsonl"}, "lora": {}, "train": {"max_steps": 1}})
    assert not kernels_ahead.wanted(spec, load({}), "cuda")


@pytest.mark.parametrize("train,steps", [({}, len(kernels_ahead.STEPS)),
                                         ({"backend": "hf"}, kernels_ahead.TRAINER_STEPS)])
def test_the_child_answers_and_its_cache_is_the_jobs_alone(tmp_path, tiny_model, monkeypatch, capsys, train, steps):
    """Without a GPU the child cannot compile (unsloth does not import, hf finds no GPU) and answers with the error
    (on a GPU it compiles: unsloth's made-up steps, or hf's through the job's trainer); either way
    the job's Triton cache directory was made for it (0700) and is gone afterwards, and TRITON_CACHE_DIR is as it
    was."""
    import torch

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    from job import log

    log.configure(json_output=True)
    with kernels_ahead.started(_spec(tiny_model, **train), RunDir(tmp_path / "run"), load(dict(os.environ))) as child:
        cache = Path(os.environ["TRITON_CACHE_DIR"])
        assert cache.is_dir() and (cache.stat().st_mode & 0o777) == 0o700
        child.wait(timeout=300)
    assert not cache.exists() and "TRITON_CACHE_DIR" not in os.environ
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    outcome = [e for e in logged if e["event"] == "kernels_compiled_ahead"]
    assert len(outcome) == 1 and outcome[0]["seconds"] >= 0, logged
    if torch.cuda.is_available():
        assert outcome[0].get("steps") == steps, outcome
    else:
        assert outcome[0]["error"], outcome


@pytest.mark.parametrize("train,backend", [
    ({}, "unsloth"), ({"backend": "unsloth"}, "unsloth"), ({"backend": "hf"}, "hf"), ({"method": "dpo"}, None),
])
def test_which_backends_kernels_the_child_compiles(tiny_model, train, backend):
    assert kernels_ahead.backend_of(_spec(tiny_model, **train)) == backend


def test_hf_made_up_steps_run_through_the_jobs_trainer_on_one_layer(tiny_model):
    """hf's steps are the job's own trainer's (trl's collator and loss head, the LoRA wrapping, the optimizer) on
    the model cut to one layer: here on the CPU, where no kernel is compiled, the steps all run."""
    from transformers import AutoConfig

    from job.backends import hf

    spec = validate_data({"name": "k", "model": {"base": str(tiny_model), "chat_template": "llama-3",
                                                  "max_seq_length": 64},
                          "data": {"source": "x.jsonl"}, "lora": {"r": 4},
                          "train": {"backend": "hf", "max_steps": 600, "per_device_batch_size": 2,
                                    "optim": "adamw_torch"}})
    settings = load({})
    config = AutoConfig.from_pretrained(tiny_model)
    plan = hf.plan(spec, config, "cpu", settings)
    steps = kernels_ahead.trainer_steps(spec, str(tiny_model), config, plan, settings, "cpu")
    assert steps == kernels_ahead.TRAINER_STEPS


def test_the_childs_model_has_a_layer_of_each_kind_and_loads_from_the_whole_checkpoint(tiny_model):
    """The kernels are compiled per shape: one decoder layer of each kind (Gemma 3: sliding and full attention) has
    them all, and the checkpoint's other layers are left unread."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

    gemma = kernels_ahead.few_layers(Gemma3TextConfig(num_hidden_layers=12))
    assert gemma.num_hidden_layers == 2 and gemma.layer_types == ["sliding_attention", "full_attention"]
    config = AutoConfig.from_pretrained(tiny_model)
    small = kernels_ahead.few_layers(config)
    assert config.num_hidden_layers > 1 and small.num_hidden_layers == 1
    whole = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, config=small)
    assert len(model.model.layers) == 1
    assert model.model.layers[0].mlp.up_proj.weight.equal(whole.model.layers[0].mlp.up_proj.weight)


@pytest.mark.gpu
def test_a_run_on_unsloth_with_kernels_ahead_does_not_wait_for_the_child(tmp_path, make_spec):
    """A tiny job can finish before the child has compiled (on the H200: the child's steps on the tiny model take
    longer than its four): it ends the child, says so, and leaves no cache directory behind. (A child that finishes:
    test_the_child_answers_and_its_cache_is_the_jobs_alone on a GPU.)"""
    import tempfile

    from conftest import events, run_cli

    before = set(Path(tempfile.gettempdir()).glob("peftopt-triton-*"))
    spec = make_spec("ahead", train={"backend": "unsloth", "max_steps": 4, "save_steps": 4}, evaluate=None,
                     export={"merge": False, "gguf": []}, push=None)
    result = run_cli("run", spec, env={"PEFTOPT_KERNELS_AHEAD": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = [e for e in events(result.stdout) if e["event"] == "kernels_compiled_ahead"]
    assert len(outcome) == 1, outcome
    assert outcome[0].get("steps") == len(kernels_ahead.STEPS) or outcome[0].get("error") == "still running: ended"
    assert set(Path(tempfile.gettempdir()).glob("peftopt-triton-*")) == before


@pytest.mark.parametrize("line,outcome", [
    (b'{"seconds": 3.5, "steps": 2}\n', {"seconds": 3.5, "steps": 2}),
    (b'{"seconds": 1.0, "skipped": "no room", "other": 1}\n', {"seconds": 1.0, "skipped": "no room"}),
    (b'{"seconds": 9.0, "steps": 1, "timeline": {"imported": 5.0, "model": 6.5, "step1": 9.0}}\n',
     {"seconds": 9.0, "steps": 1, "timeline": {"imported": 5.0, "model": 6.5, "step1": 9.0}}),
    (b"", {"error": "ended without an answer"}),
    (b"Unsloth: banner\n", {"error": "ended without an answer"}),
])
def test_what_the_job_logs_of_the_childs_answer(line, outcome):
    assert kernels_ahead._outcome(line) == outcome


@pytest.mark.parametrize("fill,kept_mod_16", kernels_ahead.STEPS)
def test_the_made_up_steps_keep_labels_in_each_class_the_loss_kernels_are_specialized_on(fill, kept_mod_16):
    row, micro = 2048, 8
    tokens = max(int(micro * row * fill) // 16 * 16 - (1 if fill < 1 else 0), 17)
    ids, positions, labels = kernels_ahead._packed(tokens, row, 1000, kept_mod_16, device="cpu")
    assert ids.shape == positions.shape == labels.shape == (1, tokens)
    kept = int((labels != -100).sum())
    if kept_mod_16 is None:
        assert kept == tokens and tokens % 16  # a row the job would not pad, every label kept
    else:
        assert tokens % 16 == 0 and kept % 16 == kept_mod_16 and 0.5 < kept / tokens < 0.7
        assert (labels[positions == 0] == -100).all()  # each conversation's start, as the shifted loss has it
        assert torch.equal(labels[labels != -100], ids[labels != -100])
