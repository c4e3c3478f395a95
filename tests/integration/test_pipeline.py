"""Integration: the whole job on a tiny real Llama on CPU, through the real CLI in a subprocess."""
import csv
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from conftest import events, run_cli
from job import llamacpp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]




def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, tiny_data):
    """One complete run with every stage but push: (run_dir, stdout events, base digest before)."""
    out = tmp_path_factory.mktemp("full")
    spec = {
        "name": "full", "output_dir": str(out / "runs"),
        "model": {"base": str(tiny_model), "max_seq_length": 128, "chat_template": "llama-3"},
        "data": {"source": str(tiny_data), "eval_split": 0.1},
        "lora": {"r": 8, "alpha": 16},
        "train": {"backend": "hf", "max_steps": 12, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                  "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_steps": 0, "optim": "adamw_torch",
                  "save_steps": 4, "seed": 0},
        "evaluate": {"prompts": ["Tell me one thing about coffee.", "Say hello.", "And why?"], "max_new_tokens": 12,
                     "targets": ["base", "adapter", "merged", "gguf"]},
        "export": {"merge": True, "gguf": ["f16", "q8_0", "q4_k_m"], "tokenizer_pre": "llama-bpe",
                   "verify_prompts": 3, "verify_tokens": 12},
    }
    path = out / "full.json"
    path.write_text(json.dumps(spec))
    base_digest = sha(tiny_model / "model.safetensors")
    result = run_cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "runs" / "full", events(result.stdout), base_digest, path


def test_logs_state_and_metrics(full_run):
    from conftest import assert_documented_events

    run_dir, stdout_events, _, _ = full_run
    file_events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert_documented_events((run_dir / "events.jsonl").read_text().splitlines())
    assert {"job_started", "stage_finished", "train_progress", "job_finished"} <= {e["event"] for e in stdout_events}
    assert len(file_events) >= len(stdout_events)
    progress = [e for e in stdout_events if e["event"] == "train_progress"]
    assert progress and all({"step", "max_steps", "loss", "tokens_per_s", "eta_s"} <= set(e) for e in progress)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "done"
    assert all(state["stages"][s]["status"] == "done" for s in ("prepare", "train", "evaluate", "merge", "gguf"))
    for info in state["stages"].values():
        for artifact in info.get("artifacts", []):
            assert (run_dir / artifact).exists(), artifact
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = metrics["train"]
    for key in ("runtime_s", "tokens_per_s", "final_loss", "loss_curve", "peak_rss_gb", "global_step", "backend"):
        assert train[key] is not None, key
    assert train["global_step"] == 12 and len(train["loss_curve"]) == 12
    assert train["tokens"] > 0 and train["tokens_per_s"] > 0
    assert {"prepare", "train", "evaluate", "merge", "gguf"} <= set(metrics["stages"])
    assert metrics["run"]["versions"]["transformers"] and metrics["run"]["hardware"]["cpu_count"]
    assert metrics["evaluate"]["heldout"]["adapter"]["loss"] < metrics["evaluate"]["heldout"]["base"]["loss"]
    with open(run_dir.parent / "experiments_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["run_name"] == "full" and rows[-1]["r"] == "8" and float(rows[-1]["final_loss"]) > 0
    assert {"peak_gpu_gb", "lora_gpu_gb", "tokens_per_s", "runtime_s"} <= set(rows[-1])


def test_base_unchanged_and_adapter_moved(full_run, tiny_model):
    run_dir, _, base_digest, _ = full_run
    assert sha(tiny_model / "model.safetensors") == base_digest
    tensors = adapter_tensors(run_dir)
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero


def test_merged_logits_equal_adapter_logits(full_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from job.specfile import load_spec
    from job.rundir import RunDir
    from job.stages import merge

    run_dir, _, _, spec_path = full_run
    spec = load_spec(spec_path)
    ids = torch.tensor([[1, 5, 9, 42, 77, 100, 3]])
    base = AutoModelForCausalLM.from_pretrained(spec.model.base, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    merged = merge.merge(spec, RunDir(run_dir), str(run_dir / "adapter")).eval()
    saved = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = adapted(ids).logits
        assert torch.allclose(merged(ids).logits, want, atol=1e-4)
        assert (saved(ids).logits - want).abs().max() < 0.05  # one rounding to bfloat16


def test_every_gguf_loads_and_answers_and_f16_matches_merged(full_run):
    run_dir, _, _, _ = full_run
    metrics = json.loads((run_dir / "metrics.json").read_text())["gguf"]
    assert set(metrics["files"]) == {"f16", "q8_0", "q4_k_m"}
    f16 = metrics["files"]["f16"]["verify"]
    assert f16["tokenizer_match"] and f16["agreement"] == 1.0
    assert all(p["gguf_tokens"] == p["merged_tokens"] for p in f16["prompts"])
    tools = llamacpp.find()
    for quant, info in metrics["files"].items():
        path = run_dir / "gguf" / info["file"]
        assert info["sha256"] == sha(path) and info["size_bytes"] == path.stat().st_size
        assert 0 <= info["verify"]["agreement"] <= 1
        answer = llamacpp.generate(tools, path, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                   "Say hello.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 8)
        assert answer.prompt_ids and (answer.token_ids or answer.stop_reason == "end_of_turn")
        assert (run_dir / "eval" / f"gguf-{quant}.jsonl").exists()
    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    assert "FROM ./full-q8_0.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert {"base", "adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"} <= set(summary["targets"])


def test_second_run_of_a_finished_spec_does_no_work(full_run):
    run_dir, _, _, spec_path = full_run
    before = (run_dir / "state.json").read_text()
    result = run_cli("run", str(spec_path))
    assert result.returncode == 0, result.stderr
    names = [e["event"] for e in events(result.stdout)]
    assert "stage_started" not in names and names.count("stage_skipped") == 5
    assert json.loads(before)["stages"] == json.loads((run_dir / "state.json").read_text())["stages"]


def test_training_lowers_the_loss_on_a_repeated_batch(tmp_path, make_spec):
    data = tmp_path / "one.jsonl"
    row = {"conversations": [{"from": "human", "value": "Tell me one thing about the sea."},
                             {"from": "gpt", "value": "Here is one thing: the sea is calm and quiet."}]}
    data.write_text((json.dumps(row) + "\n") * 8)
    spec = make_spec("repeat", data={"source": str(data)}, train={"max_steps": 10, "packing": False})
    assert run_cli("run", str(spec)).returncode == 0
    curve = json.loads((tmp_path / "runs" / "repeat" / "metrics.json").read_text())["train"]["loss_curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]


def test_batches_collated_in_a_worker_process_train_and_count_as_in_the_loop(tmp_path, make_spec):
    """PEFTOPT_BATCH_WORKERS (1 on CUDA): the same losses, and the same tokens counted, with the batches made in
    a worker process as in the training loop, and nothing of the count reaches the model."""
    figures = {}
    for workers in ("0", "1"):
        spec = make_spec(f"workers{workers}", train={"max_steps": 4, "save_steps": 4, "packing": True})
        result = run_cli("run", str(spec), "--stages", "prepare,train", env={"PEFTOPT_BATCH_WORKERS": workers})
        assert result.returncode == 0, result.stderr[-3000:]
        train = json.loads((tmp_path / "runs" / f"workers{workers}" / "metrics.json").read_text())["train"]
        assert train["batch_workers"] == int(workers)
        figures[workers] = ([round(p["loss"], 5) for p in train["loss_curve"]], train["session_tokens"])
    assert figures["0"][1] > 0
    assert figures["1"] == figures["0"]


def test_changed_spec_is_refused_unless_restart(tmp_path, make_spec):
    spec = make_spec("change", train={"max_steps": 4})
    assert run_cli("run", str(spec)).returncode == 0
    refused = run_cli("run", str(spec), "--set", "lora.r=4")
    assert refused.returncode == 2
    assert "lora.r" in refused.stderr and "--restart" in refused.stderr and "Traceback" not in refused.stderr
    redone = run_cli("run", str(spec), "--set", "lora.r=4", "--restart")
    assert redone.returncode == 0, redone.stderr
    config = json.loads((tmp_path / "runs" / "change" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    # settings that do not change the result (grace period, backend choice) are not refused
    assert run_cli("run", str(spec), "--set", "lora.r=4", "--set", "train.grace_period_s=5").returncode == 0


def test_the_refusal_names_only_the_stages_whose_inputs_changed_and_what_changed(tmp_path, make_spec):
    """An evaluation setting changed: only evaluate holds stale work, and the message says which field. A data
    file edited: prepare names the file, and the stages after it say they use the one before."""
    spec = make_spec("stale", train={"max_steps": 2},
                     evaluate={"prompts": ["Say hi."], "max_new_tokens": 4, "targets": ["adapter"]})
    assert run_cli("run", str(spec)).returncode == 0
    refused = run_cli("run", str(spec), "--set", "evaluate.max_new_tokens=5")
    assert refused.returncode == 2
    message = refused.stderr.strip().splitlines()[-1]
    assert "evaluate (evaluate.max_new_tokens)" in message, message
    assert "prepare" not in message and "train" not in message, message

    data = json.loads(spec.read_text())["data"]["source"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text(Path(data).read_text() + Path(data).read_text().splitlines(keepends=True)[0])
    moved = json.loads(spec.read_text())
    moved["data"]["source"] = str(edited)
    spec.write_text(json.dumps(moved))
    assert run_cli("run", str(spec), "--restart", "--stages", "prepare,train").returncode == 0
    edited.write_text(edited.read_text() + Path(data).read_text().splitlines(keepends=True)[1])
    refused = run_cli("run", str(spec))
    message = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and f"prepare (data file {edited})" in message, message
    assert "train (uses prepare)" in message, message


def test_sigterm_exits_75_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path, make_spec):
    settings = {"max_steps": 40, "save_steps": 10}
    straight = make_spec("straight", train=settings)
    assert run_cli("run", str(straight)).returncode == 0

    stopped = make_spec("stopped", train=settings)
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(stopped)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    signalled_at = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "train_progress" and event["step"] >= 7 and signalled_at is None:
            proc.send_signal(signal.SIGTERM)
            signalled_at = event["step"]
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    run_dir = tmp_path / "runs" / "stopped"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted" and state["stages"]["train"]["status"] == "interrupted"
    recorded = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["exit_code"] for e in recorded if e["event"] == "job_interrupted"] == [75]  # in the run's own log
    assert not (run_dir / "adapter").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved and signalled_at <= saved[-1] < 40

    resumed = run_cli("run", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert any(e["event"] == "train_resumed" for e in events(resumed.stdout))
    train = json.loads((run_dir / "metrics.json").read_text())["train"]  # both sessions' time and tokens count
    first, second = train["sessions"]
    assert first["interrupted"] and first["to_step"] >= signalled_at and second["from_step"] == saved[-1]
    assert train["runtime_s"] == pytest.approx(first["runtime_s"] + second["runtime_s"], abs=1e-3)
    assert train["tokens"] == first["tokens"] + second["tokens"]
    import torch

    want, got = adapter_tensors(tmp_path / "runs" / "straight"), adapter_tensors(run_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-6), key


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("sent_to", ["the process group", "each process"])
def test_sigterm_with_a_batch_worker_is_one_stop_request(tmp_path, make_spec, sent_to):
    """A SIGTERM sent to the job's whole process group (`kill -- -PGID`, Ctrl-C, tini -g) reaches the training
    process alone (a batch worker has a group of its own); one sent to each process by name (`pkill -f`) ends the
    worker too. Either way it is one stop request: exit 75 after a checkpoint, state.json says interrupted, the rerun
    resumes; not a crash (exit 1) nor a disk error."""
    spec = make_spec("group", train={"max_steps": 200, "save_steps": 5})
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_BATCH_WORKERS": "1"})
    workers = []
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "train_progress" and event["step"] >= 3:
            workers = _children(proc.pid)
            if sent_to == "the process group":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                for pid in [proc.pid, *workers]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
            break
    after = proc.stdout.read()
    assert proc.wait(timeout=120) == 75, after[-3000:] + proc.stderr.read()[-2000:]
    assert workers, "the job had no batch worker to signal"
    events = [json.loads(line)["event"] for line in after.splitlines()]
    assert "job_crashed" not in events and events[-1] == "job_interrupted", events
    state = json.loads((tmp_path / "runs" / "group" / "state.json").read_text())
    assert state["status"] == "interrupted"


def test_ctrl_c_in_prepare_stops_at_once_and_records_the_interruption(tmp_path, make_spec):
    """A stage without checkpoints has nothing to save: a stop request ends it where it is (exit 75 at once, not at
    the end of the grace period), state.json says interrupted, and the run's own log holds the events."""
    import time

    many = tiny.write_data(tmp_path / "many.jsonl", 40_000)
    spec = make_spec("ctrlc", data={"source": str(many)}, train={"grace_period_s": 30})
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    signalled_at = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "stage_started" and event["stage"] == "prepare":
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            signalled_at = time.monotonic()
            break
    assert signalled_at is not None
    code = proc.wait(timeout=60)
    took = time.monotonic() - signalled_at
    rest = proc.stdout.read()
    assert code == 75, proc.stderr.read()[-2000:]
    assert took < 2.0, took
    assert "Traceback" not in proc.stderr.read()
    run_dir = tmp_path / "runs" / "ctrlc"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted" and state["stages"]["prepare"]["status"] == "interrupted", state
    recorded = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "stop_requested" in recorded and recorded[-1] == "job_interrupted", recorded[-5:]
    assert "checkpoint" not in rest  # nothing claims a checkpoint that prepare never makes
    assert not (run_dir / "data").exists() or not any((run_dir / "data").iterdir())


def test_qlora_from_a_prequantized_4bit_base_merges_into_its_dequantized_weights(tmp_path, make_spec, tiny_model):
    """The seed's base is a *-bnb-4bit checkpoint: train on it, merge without downloading a 16-bit copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    prequantized = tmp_path / "tiny-bnb-4bit"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=quant, device_map={"": "cpu"})
    model.save_pretrained(str(prequantized))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(prequantized))
    spec = make_spec("from4bit", model={"base": str(prequantized), "load_in_4bit": True},
                     train={"max_steps": 3}, export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpe",
                                                     "verify_tokens": 4})
    result = run_cli("run", str(spec))
    assert result.returncode == 0, result.stdout[-3000:]
    run_dir = tmp_path / "runs" / "from4bit"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["merge"]["merged_into"] == "dequantized-4bit"
    assert "quantization_config" not in json.loads((run_dir / "merged" / "config.json").read_text())
    assert metrics["gguf"]["files"]["q8_0"]["verify"]["prompts"]


def test_sigterm_in_a_later_stage_exits_75_within_grace_and_the_rerun_redoes_only_that_stage(tmp_path, make_spec):
    import time

    prompts = [f"Tell me one thing about item {i}." for i in range(40)]
    spec = make_spec("later", train={"max_steps": 2, "grace_period_s": 20},
                     evaluate={"prompts": prompts, "max_new_tokens": 48, "targets": ["base", "adapter"]})
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    signalled = None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "stage_started" and event["stage"] == "evaluate" and signalled is None:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
    code = proc.wait(timeout=60)
    assert code == 75 and time.monotonic() - signalled < 20, proc.stderr.read()[-2000:]
    state = json.loads((tmp_path / "runs" / "later" / "state.json").read_text())
    assert state["stages"]["train"]["status"] == "done" and state["stages"]["evaluate"]["status"] == "interrupted"
    rerun = run_cli("run", str(spec))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    started = [e["stage"] for e in events(rerun.stdout) if e["event"] == "stage_started"]
    skipped = [e["stage"] for e in events(rerun.stdout) if e["event"] == "stage_skipped"]
    assert started == ["evaluate"] and skipped == ["prepare", "train"]


def test_batched_answers_equal_one_at_a_time(full_run, tiny_model):
    """transformers in one left-padded batch, and llama.cpp decoding the prompts together, give the greedy
    tokens each gives one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from job import modelsrc
    from job.evaluation import generate
    from job.specfile import load_spec

    run_dir, _, _, spec_path = full_run
    spec = load_spec(spec_path)
    from job.evaluation import suite as suites

    suite = suites.load(spec.evaluate) + [
        {"id": "long", "prompt": "Tell me one thing about the library, the market and a small robot.", "checks": {}}]
    tokenizer, _ = modelsrc.load_tokenizer(str(run_dir / "merged"), spec)
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=torch.float32)
    together = generate.generate_hf(model, tokenizer, suite, spec.evaluate)
    alone = [generate.generate_hf(model, tokenizer, [item], spec.evaluate)[0] for item in suite]
    assert [a["token_ids"] for a in together] == [a["token_ids"] for a in alone]
    assert {a["batch_size"] for a in together} == {len(suite)}

    tools = llamacpp.find()
    texts = [generate.render(tokenizer, item["prompt"], spec.evaluate) for item in suite]
    gguf = run_dir / "gguf" / "full-f16.gguf"
    many = llamacpp.generate_many(tools, gguf, texts, 12)
    for text, result in zip(texts, many):
        single = llamacpp.generate(tools, gguf, text, 12)
        assert (result.prompt_ids, result.token_ids, result.stop_reason) == \
            (single.prompt_ids, single.token_ids, single.stop_reason)


@pytest.mark.parametrize("variant", [{"use_rslora": True}, {"use_dora": True, "init": "gaussian",
                                                            "modules_to_save": ["lm_head"]}])
def test_lora_variants_train_merge_and_export(variant, tmp_path_factory, tiny_model, tiny_data):
    """rsLoRA and DoRA (with a gaussian init and a fully trained LM head) train, merge to the adapter's logits,
    and convert to a GGUF that llama.cpp loads and answers with the merged model's greedy tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("variant")
    spec = {"name": "variant", "output_dir": str(out / "runs"),
            "model": {"base": str(tiny_model), "max_seq_length": 128, "chat_template": "llama-3"},
            "data": {"source": str(tiny_data)}, "lora": {"r": 8, "alpha": 16, **variant},
            "train": {"backend": "hf", "max_steps": 6, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                      "learning_rate": 5e-3, "optim": "adamw_torch", "save_steps": 3, "seed": 0},
            "export": {"merge": True, "gguf": ["f16"], "tokenizer_pre": "llama-bpe", "verify_tokens": 8}}
    path = out / "variant.json"
    path.write_text(json.dumps(spec))
    result = run_cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = out / "runs" / "variant"
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert all(config[k] == v for k, v in variant.items() if k in config) and \
        config.get("use_rslora") == variant.get("use_rslora", False) and config.get("use_dora") == variant.get("use_dora", False)
    ids = torch.tensor([[1, 5, 9, 42, 77, 100, 3]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = adapted(ids).logits
        assert (merged(ids).logits - want).abs().max() < 0.05  # bf16 rounding of the saved merge
    verify = json.loads((run_dir / "metrics.json").read_text())["gguf"]["files"]["f16"]["verify"]
    assert verify["tokenizer_match"] and verify["agreement"] == 1.0 and all(p["gguf_tokens"] for p in verify["prompts"])
