"""Integration: GRPO (train.method grpo) on the tiny model: it learns what its checks reward, resumes after a stop to
the uninterrupted run's adapter, and refuses tasks it could not reward before any work."""
import json
import os
import signal
import subprocess
import sys

import pytest

import tiny
from conftest import ROOT, assert_documented_events, events, run_cli, write_tiny_spec

pytestmark = pytest.mark.integration

GRPO = {"method": "grpo", "max_steps": 30, "per_device_batch_size": 8, "learning_rate": 2e-2, "save_steps": 10,
        "num_generations": 4, "max_completion_length": 12}


def tasks(path, checks=({"type": "contains", "value": "fox"},)):
    """Prompts about the tiny data's topics; every answer is rewarded for naming the fox (a word the tiny model's
    vocabulary has, which its random weights sample in about one answer of twenty)."""
    rows = [{"id": f"t{i}", "prompt": f"Tell me one thing about {topic}.", "assert": list(checks)}
            for i, topic in enumerate(tiny.TOPICS * 2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def grpo_spec(tmp_path, tiny_model, name="grpo", runs="runs", data=None, evaluate=None, **train):
    spec = write_tiny_spec(tmp_path, tiny_model, data or tasks(tmp_path / "tasks.jsonl"), name,
                           train={**GRPO, **train}, **({"evaluate": evaluate} if evaluate else {}))
    if runs != "runs":
        content = json.loads(spec.read_text())
        content["output_dir"] = str(tmp_path / runs)
        spec = tmp_path / f"{name}-{runs}.json"
        spec.write_text(json.dumps(content))
    return spec


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_the_mean_reward_rises_and_a_stopped_run_resumes_to_the_same_adapter(tmp_path, tiny_model):
    """30 steps of 2 prompts x 4 answers: the share of answers that pass the check rises well above where it
    starts; each step's reward, pass rate per check and answer length are in the progress events, the reward curve
    and where the time went in metrics.json. A copy stopped by SIGTERM after step 8 exits 75, and its rerun ends
    with the uninterrupted run's adapter and reward curve."""
    held_out = {"from_data": {"rows": 4}, "targets": ["base", "adapter"], "max_new_tokens": 12}
    result = run_cli("run", grpo_spec(tmp_path, tiny_model, evaluate=held_out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert_documented_events(result.stdout.splitlines())
    progress = [e for e in events(result.stdout) if e["event"] == "train_progress"]
    assert len(progress) == 30
    assert {"reward", "reward_std", "rewards", "pass_rates", "completion_length"} <= set(progress[0])
    assert progress[0]["rewards"].keys() == {"checks"} and progress[0]["pass_rates"].keys() == {"contains"}
    first, last = [e["reward"] for e in progress[:10]], [e["reward"] for e in progress[-5:]]
    assert sum(first) / 10 < 0.2 and sum(last) / 5 >= sum(first) / 10 + 0.3, (first, last)

    run_dir = tmp_path / "runs" / "grpo"
    # 4 tasks held out of training, asked with their own checks: the adapter names the fox more than the base does
    scored = {e["target"]: e for e in events(result.stdout) if e["event"] == "target_evaluated"}
    assert scored["base"]["prompts"] == scored["adapter"]["prompts"] == 4
    assert scored["adapter"]["checks"]["contains"] > scored["base"]["checks"]["contains"], scored
    figures = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert [point["reward"] for point in figures["reward_curve"]] == [e["reward"] for e in progress]
    split = figures["time_split"]
    assert split["sampling_s"] > 0 and split["training_s"] > 0 and split["scoring_s"] >= 0
    assert figures["tokens"] > 0 and figures["method"] == "grpo"
    report = run_cli("report", run_dir, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "report" / "plots" / "rewards.png").stat().st_size > 0
    assert "Reward, last step" in (tmp_path / "report" / "report.md").read_text()

    spec = grpo_spec(tmp_path, tiny_model, runs="stopped", evaluate=held_out)
    proc = subprocess.Popen([sys.executable, "-m", "job", "run", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"})
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "train_progress" and event["step"] >= 8:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-2000:]
    rerun = run_cli("run", spec)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    stopped_dir = tmp_path / "stopped" / "grpo"
    resumed = json.loads((stopped_dir / "metrics.json").read_text())["train"]
    assert resumed["sessions"][0]["interrupted"] and resumed["sessions"][1]["from_step"] >= 8
    assert [p["reward"] for p in resumed["reward_curve"]] == [p["reward"] for p in figures["reward_curve"]]
    want, got = adapter(run_dir), adapter(stopped_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] - got[key]).abs().max().item() <= 1e-6, key


@pytest.mark.parametrize("rows, needle", [
    ([{"prompt": "Hi.", "assert": [{"type": "contains-some", "value": "x"}]}],
     "data row 0: assert[0]: unknown type 'contains-some'"),
    ([{"prompt": "Hi.", "assert": [{"type": "number", "value": "many"}]}], "data row 0: assert[0]: number: no number"),
    ([{"prompt": "Hi."}], "data row 0: the task has no checks ('assert') and train.rewards names none"),
    ([{"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}],
     "trains on tasks (prompts and their checks)"),
])
def test_a_task_that_cannot_be_rewarded_is_refused_before_training(tmp_path, tiny_model, rows, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    result = run_cli("run", grpo_spec(tmp_path, tiny_model, data=data))
    assert result.returncode in (2, 3), result.stdout[-2000:]
    assert needle in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-1000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "grpo" / "adapter").exists()
    assert not any(e["event"] == "stage_started" and e["stage"] == "train" for e in events(result.stdout))


def test_inspect_shows_each_task_as_the_trainer_sees_it(tmp_path, tiny_model):
    """`peftopt inspect` on a grpo spec: each prompt rendered with the chat template's generation prompt, its
    checks and its reference; no answer (the trainer samples them)."""
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({"prompt": "Convert 2 hours to minutes.", "reference": "120 minutes",
                                "assert": [{"type": "number", "value": 120}]}) + "\n")
    result = run_cli("inspect", grpo_spec(tmp_path, tiny_model, data=data), "--rows", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Convert 2 hours to minutes." in result.stdout and "prompt tokens" in result.stdout
    assert '[checks] [{"type": "number", "value": 120}]' in result.stdout
    assert "[reference] 120 minutes" in result.stdout and '"examples": "task"' in result.stdout


def test_two_ranks_sample_and_train_alike_whole_or_sharded(tmp_path, tiny_model):
    """GRPO on 2 CPU ranks: each samples its share of the answers; under fsdp the model is sharded and sampling
    gathers the root's own weights around each generation. Both end with the same adapter and rewards."""
    ends = {}
    for parallel in ("ddp", "fsdp"):
        spec = grpo_spec(tmp_path, tiny_model, name=f"ranks-{parallel}", max_steps=4, save_steps=2, parallel=parallel)
        result = run_cli("run", spec, "--nproc", "2")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        progress = [e for e in events(result.stdout) if e["event"] == "train_progress"]
        assert len(progress) == 4 and all("reward" in e for e in progress)
        ends[parallel] = ([e["reward"] for e in progress], adapter(tmp_path / "runs" / f"ranks-{parallel}"))
    assert ends["ddp"][0] == ends["fsdp"][0]
    for key, tensor in ends["ddp"][1].items():
        assert (tensor - ends["fsdp"][1][key]).abs().max().item() <= 1e-6, key


def test_the_continuous_sampler_samples_a_model_that_trains_with_peftopts_own_attention(tiny_model):
    """PEFTOPT_SAMPLER=continuous on the GPU: transformers' continuous batching asks for the paged variant of the
    model's attention, which does not exist for the hf backend's packed `peftopt_varlen` (the H200 run crashed with
    exit 1 on it). Sampling runs with paged sdpa, and the model trains with its own attention afterwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    from job.backends import attention
    from job.backends.trainer import paged_attention_for_sampling

    name = attention.register()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), LoraConfig(r=4, target_modules="all-linear"))
    model.get_base_model().set_attn_implementation(name)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with pytest.raises(ValueError, match="paged"):
        model.generate_batch([[1, 5, 7]], generation_config=config, progress_bar=False)
    with paged_attention_for_sampling(model):
        out = model.generate_batch([[1, 5, 7], [2, 9]], generation_config=config, progress_bar=False)
    assert sorted(len(o.generated_tokens) for o in out.values()) == [4, 4]
    assert model.get_base_model().config._attn_implementation == name


def test_grpo_trains_a_4bit_base_qlora(tmp_path, tiny_model):
    """QLoRA: the base loaded in 4-bit (bitsandbytes nf4, which runs on this CPU too), answers sampled from it and
    the LoRA trained on their rewards; the adapter it saves holds only LoRA weights."""
    spec = grpo_spec(tmp_path, tiny_model, name="qlora", max_steps=3, save_steps=3)
    content = json.loads(spec.read_text())
    content["model"]["load_in_4bit"] = True
    spec.write_text(json.dumps(content))
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    started = next(e for e in events(result.stdout) if e["event"] == "train_started")
    assert started["base_weights"].startswith("nf4"), started
    progress = [e for e in events(result.stdout) if e["event"] == "train_progress"]
    assert [e["step"] for e in progress] == [1, 2, 3] and all("reward" in e for e in progress)
    weights = adapter(tmp_path / "runs" / "qlora")
    assert weights and all("lora_" in key for key in weights)
