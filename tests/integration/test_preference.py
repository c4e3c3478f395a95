"""Integration (CLI, CPU, tiny real model): preference tuning. Each method (dpo, orpo, simpo, kto) trains from every
data shape (TRL's explicit and implicit pairs, OpenAI/Together's preference rows, KTO's unpaired rows); on a handful
of pairs the adapter's implicit reward ranks chosen over rejected and the rejected answers' log-probability falls;
data of the wrong kind is refused before training; a run chains onto an earlier run's merged model; a DPO adapter
merges and exports like an SFT one."""
import json

import pytest

from conftest import events, run_cli, write_tiny_spec

pytestmark = pytest.mark.integration

# The same preference, four ways: TRL's explicit form with strings and with messages, TRL's implicit form, and
# OpenAI's / Together's preference JSONL.
PAIRS = [
    {"prompt": "Translate to Swedish: The water is too cold.", "chosen": "Vattnet är för kallt.",
     "rejected": "Vattnet är för kall."},
    {"prompt": [{"role": "user", "content": "Say hello."}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "system\n\nCutting Knowledge Date: December 2023\nHello!"}]},
    {"chosen": [{"role": "user", "content": "Tell me one thing about the sea."},
                {"role": "assistant", "content": "The sea is calm."}],
     "rejected": [{"role": "user", "content": "Tell me one thing about the sea."},
                  {"role": "assistant", "content": "The sea sea sea sea."}]},
    {"input": {"messages": [{"role": "user", "content": "Tell me one thing about rain."}]},
     "preferred_output": [{"role": "assistant", "content": "Rain is quiet."}],
     "non_preferred_output": [{"role": "assistant", "content": "rain rain rain"}]},
]
UNPAIRED = [
    {"prompt": "Tell me one thing about snow.", "completion": "Snow is white and cold.", "label": True},
    {"prompt": "Tell me one thing about snow.", "completion": "snow snow snow snow", "label": False},
    {"prompt": [{"role": "user", "content": "Say hello."}], "completion": [{"role": "assistant", "content": "Hi!"}],
     "label": True},
    {"prompt": "Say hello.", "completion": "user\n\nSay hello.assistant\n\nHi!", "label": False},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def preference_spec(tmp_path, tiny_model, data, name, method, **train):
    return write_tiny_spec(tmp_path, tiny_model, data, name,
                           train={"method": method, "max_steps": 20, "learning_rate": 5e-3, "save_steps": 10,
                                  **train},
                           evaluate={"prompts": ["Say hello."], "targets": ["adapter"], "max_new_tokens": 6})


@pytest.mark.parametrize("method,rows", [("dpo", PAIRS), ("orpo", PAIRS), ("simpo", PAIRS), ("kto", UNPAIRED),
                                         ("kto", PAIRS)], ids=["dpo", "orpo", "simpo", "kto-unpaired", "kto-pairs"])
def test_each_method_trains_from_every_shape_and_ranks_the_chosen_answers_higher(method, rows, tmp_path, tiny_model):
    data = write_rows(tmp_path / "prefs.jsonl", rows)
    result = run_cli("run", preference_spec(tmp_path, tiny_model, data, method, method))
    assert result.returncode == 0, result.stderr[-3000:]
    log = events(result.stdout)
    chosen = [e for e in log if e["event"] == "backend_chosen"][0]
    assert chosen["backend"] == "hf"
    metrics = json.loads((tmp_path / "runs" / method / "metrics.json").read_text())
    prepared = metrics["prepare"]["train"]
    assert prepared["rows"] == len(rows) * (2 if method == "kto" and rows is PAIRS else 1)
    assert prepared["trainable_tokens"] < prepared["tokens"]  # only the answers count
    assert metrics["train"]["global_step"] == 20 and metrics["train"]["tokens_per_s"] > 0
    scores = metrics["evaluate"]["preferences"]["train"]
    assert scores["reward_accuracy"] > 0.5, scores  # a real learning signal on the training examples
    if "logps_rejected" in scores:
        assert scores["reward_margin"] > 0, scores  # chosen rose against rejected, relative to the reference
        if method != "orpo":  # orpo's NLL term on the chosen answers lifts every answer; the gap still widens
            assert scores["logps_rejected"] < scores["reference_logps_rejected"], scores
    else:
        assert scores["logps_undesirable"] < scores["reference_logps_undesirable"], scores
    finished = [e for e in log if e["event"] == "train_finished"][0]
    assert finished["method"] == method


def test_rows_held_out_are_scored_without_an_evaluate_section(tmp_path, tiny_model):
    """With data.eval_split, the held-out reward accuracy and margin are the run's own figures, whether or not the
    spec asks for answers to a suite."""
    data = write_rows(tmp_path / "prefs.jsonl", PAIRS)
    spec = write_tiny_spec(tmp_path, tiny_model, data, "heldout-dpo", evaluate=None,
                           data={"eval_split": 0.45},
                           train={"method": "dpo", "max_steps": 4, "learning_rate": 5e-3, "save_steps": 4})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["stage"] for e in events(result.stdout) if e["event"] == "stage_started"] == \
        ["prepare", "train", "evaluate"]
    scores = json.loads((tmp_path / "runs" / "heldout-dpo" / "metrics.json").read_text())["evaluate"]["preferences"]
    assert scores["heldout"]["examples"] == 1 and 0 <= scores["heldout"]["reward_accuracy"] <= 1
    assert "reward_margin" in scores["heldout"]
    assert not (tmp_path / "runs" / "heldout-dpo" / "eval" / "summary.json").exists()


def test_a_dpo_adapter_merges_and_exports_as_an_sft_one_does(tmp_path, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_rows(tmp_path / "prefs.jsonl", PAIRS)
    spec = write_tiny_spec(tmp_path, tiny_model, data, "dpo-export",
                           train={"method": "dpo", "max_steps": 10, "learning_rate": 5e-3, "save_steps": 5},
                           export={"merge": True, "gguf": ["f16", "q8_0"], "tokenizer_pre": "llama-bpe",
                                   "verify_prompts": 1, "verify_tokens": 8},
                           push={"adapter_repo": "me/dpo", "token_env": "PEFTOPT_TEST_TOKEN"})
    result = run_cli("run", spec, "--dry-run", env={"PEFTOPT_TEST_TOKEN": "hf_DpoCanary0123456789abcdefghij"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "dpo-export"
    ids = torch.tensor([[1, 5, 9, 42, 77, 100, 3]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(run_dir / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max() < 0.05  # one rounding to bf16
    files = json.loads((run_dir / "metrics.json").read_text())["gguf"]["files"]
    for quant in ("f16", "q8_0"):
        verify = files[quant]["verify"]
        assert verify["tokenizer_match"] and verify["agreement"] == 1.0, (quant, verify)
    from job import card
    from job.rundir import RunDir
    from job.specfile import load_spec

    text = card.render(load_spec(spec), RunDir(run_dir), "me/dpo")
    assert "- Method: dpo (" in text and "beta 0.1)" in text and "prefs.jsonl" in text and "tags: [peftopt, lora, gguf, dpo]" in text


@pytest.mark.parametrize("method,rows,code,needle", [
    ("dpo", "chat", 2, "holds conversations; train.method 'dpo' trains on preference pairs (prompt/chosen"),
    ("sft", "pairs", 2, "holds preference pairs; train.method 'sft' trains on conversations"),
    ("dpo", "mixed", 3, "data row 2: is a conversation, where this method trains on preference pairs"),
    ("kto", "chat", 2, "train.method 'kto' trains on unpaired examples"),
])
def test_data_of_the_wrong_kind_is_refused_before_training(method, rows, code, needle, tmp_path, tiny_model, tiny_data):
    chat = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    content = {"chat": chat, "pairs": PAIRS, "mixed": PAIRS[:2] + chat[:1] + PAIRS[2:]}[rows]
    data = write_rows(tmp_path / f"{rows}.jsonl", content)
    spec = write_tiny_spec(tmp_path, tiny_model, data, "wrong", train={"method": method, "max_steps": 2})
    result = run_cli("run", spec)
    assert result.returncode == code and needle in result.stderr, result.stderr[-2000:]
    assert not [e for e in events(result.stdout) if e["event"] == "stage_started"]


def test_fields_of_another_method_are_refused(tmp_path, tiny_model, tiny_data):
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "fields", train={"beta": 0.2, "max_steps": 2})
    result = run_cli("run", spec)
    assert result.returncode == 2 and "train.beta: applies to dpo, orpo, simpo, kto, grpo, not to method 'sft'" in result.stderr
    result = run_cli("run", spec, "--set", "train.method=orpo", "--set", "train.dpo_loss=ipo")
    assert result.returncode == 2 and "train.dpo_loss: applies to dpo, not to method 'orpo'" in result.stderr


def test_a_run_chains_onto_an_earlier_runs_merged_model(tmp_path, tiny_model, tiny_data):
    sft = write_tiny_spec(tmp_path, tiny_model, tiny_data, "first", train={"max_steps": 4},
                          export={"merge": True})
    data = write_rows(tmp_path / "prefs.jsonl", PAIRS)
    dpo = write_tiny_spec(tmp_path, "run:first", data, "second", train={"method": "dpo", "max_steps": 4},
                          evaluate={"prompts": ["Say hello."], "targets": ["base", "adapter"], "max_new_tokens": 4})
    early = run_cli("run", dpo)
    assert early.returncode == 2 and "model.base: 'run:first': there is no run 'first'" in early.stderr
    assert run_cli("run", sft, "--stages", "prepare,train").returncode == 0
    unfinished = run_cli("run", dpo)
    assert unfinished.returncode == 2 and "has not merged its adapter yet" in unfinished.stderr
    assert run_cli("run", sft).returncode == 0
    result = run_cli("run", dpo)
    assert result.returncode == 0, result.stderr[-3000:]
    merged_first = str(tmp_path / "runs" / "first" / "merged")
    train = json.loads((tmp_path / "runs" / "second" / "adapter" / "adapter_config.json").read_text())
    assert train["base_model_name_or_path"] == merged_first  # trained on the earlier run's merged model
    # the chained run's fingerprint covers that merged model: redoing the first run makes the second stale
    assert run_cli("run", sft, "--set", "train.learning_rate=0.001", "--restart").returncode == 0
    stale = run_cli("run", dpo)
    assert stale.returncode == 2 and "--restart" in stale.stderr
