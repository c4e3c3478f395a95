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
    odd.write_text(json.dumps({"left": "2+2?", "right": "4"}) + "\n")
    made = run_cli("init", odd)
    assert made.returncode == 2 and "Traceback" not in made.stderr
    assert made.stderr.splitlines()[-1].endswith(
        "fit no shape peftopt trains on (its columns: left, right); a column under another name is mapped with "
        'data.columns ({"<field>": "<your column>"})')
    assert not (tmp_path / "spec.yaml").exists()


def test_question_answer_columns_are_read_as_alpaca_rows_by_init_validate_and_run(tmp_path, tiny_model):
    """A CSV with GSM8K's columns (Question, Answer): validate names the data.columns that read it, init writes
    them into the spec, and the spec trains and answers its held-out questions on the tiny model."""
    data = tmp_path / "qa.csv"
    data.write_text("Question,Answer\n" + "".join(f'"What is {i} plus {i}?","{2 * i}"\n' for i in range(40)))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"name": "bare", "model": {"base": str(tiny_model)}, "data": {"source": "qa.csv"},
                                "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2}}))
    refused = run_cli("validate", bare)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert 'with data.columns {"instruction": "Question", "output": "Answer"}' in refused.stderr

    made = run_cli("init", data, "--model", str(tiny_model))
    assert made.returncode == 0, made.stderr
    assert "40 rows of alpaca (data.columns: Question as instruction, Answer as output)" in made.stdout
    text = (tmp_path / "spec.yaml").read_text()
    assert 'columns: {"instruction": "Question", "output": "Answer"}' in text
    ran = run_cli("run", tmp_path / "spec.yaml", "--output-dir", tmp_path / "runs", "--set", "train.max_steps=2",
                  "--set", "train.backend=hf", "--set", "train.optim=adamw_torch", "--set", "export=null",
                  "--set", "evaluate.targets=[\"adapter\"]", "--set", "evaluate.max_new_tokens=4",
                  "--set", "model.chat_template=chatml")
    assert ran.returncode == 0, ran.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "runs" / "qa" / "eval" / "adapter.jsonl").read_text()
               .splitlines()]
    assert len(answers) == 4 and all(a["prompt"].startswith("What is ") for a in answers)


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
