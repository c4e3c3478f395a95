"""`peftopt init` writes a commented YAML spec for a data file (its shape detected, the method following from it)
that validates and never overwrites; `peftopt chat` answers prompts with what a run made."""
import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.integration


def test_init_writes_a_valid_commented_spec_for_each_shape(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text((ROOT / "jobspecs" / "data" / "chat-demo.jsonl").read_text())
    made = run_cli("init", chat, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "spec.yaml").read_text()
    assert text.startswith("# Written by `peftopt init`") and "method: sft" in text and "from_data" in text
    assert run_cli("validate", tmp_path / "spec.yaml").returncode == 0

    pairs = tmp_path / "pairs" / "prefs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) + "\n"
                             for i in range(40)))
    made = run_cli("init", pairs, "--model", "some/model", "--name", "prefs")
    assert made.returncode == 0, made.stderr
    text = (pairs.parent / "spec.yaml").read_text()
    assert "method: dpo" in text and "eval_split" in text and 'base: "some/model"' in text

    tasks = tmp_path / "tasks" / "conversions.jsonl"
    tasks.parent.mkdir()
    tasks.write_text((ROOT / "jobspecs" / "data" / "t5-conversions.jsonl").read_text())
    made = run_cli("init", tasks)
    assert made.returncode == 0, made.stderr
    text = (tasks.parent / "spec.yaml").read_text()
    assert "method: grpo" in text and "num_generations: 8" in text and "eval_split" not in text
    assert "from_data: {rows: 30}" in text  # held-out tasks, scored by their own checks
    assert run_cli("validate", tasks.parent / "spec.yaml").returncode == 0

    again = run_cli("init", chat, cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten


def test_init_names_the_columns_of_data_it_cannot_read(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    made = run_cli("init", odd)
    assert made.returncode == 2 and "question, answer" in made.stderr and "Traceback" not in made.stderr
    assert not (tmp_path / "spec.yaml").exists()


def test_chat_answers_with_the_adapter_and_the_gguf(tmp_path, make_spec):
    spec = make_spec("talk", train={"max_steps": 2}, export={"merge": True, "gguf": ["f16"],
                                                             "tokenizer_pre": "llama-bpe", "verify_tokens": 4})
    assert run_cli("run", spec).returncode == 0
    run_dir = tmp_path / "runs" / "talk"
    for target in ("adapter", "gguf"):
        said = run_cli("chat", run_dir, "--target", target, "--prompt", "Say hi.", "--max-new-tokens", "4")
        assert said.returncode == 0, said.stderr[-2000:]
        assert said.stdout.startswith(f"[{'adapter' if target == 'adapter' else 'gguf-f16'}] Say hi.")
    missing = run_cli("chat", run_dir, "--target", "merged-nope", "--prompt", "x")
    assert missing.returncode == 2 and "has no 'merged-nope'" in missing.stderr
