"""Data shapes beyond chat (job/shapes.py): alpaca, prompt/completion, raw text, CSV and TSV with renamed columns, and
tool calls. Which tokens train is asserted token by token on the tiny tokenizer; every example spec in
jobspecs/examples/ trains end to end on the tiny model; refusals name the row or the file; `peftopt inspect` shows
the masks without torch."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, events, run_cli
from job import data
from job.specfile import validate_data
from job.stages import prepare
from job.templates import CHATML, LLAMA_3

EXAMPLES = ROOT / "jobspecs" / "examples"


def spec_for(tiny_model, **data_section):
    return validate_data({"name": "s", "model": {"base": str(tiny_model), "chat_template": "llama-3",
                                                 "max_seq_length": 2048},
                          "data": {"source": "x.jsonl", **data_section}, "lora": {}, "train": {"max_steps": 1}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = LLAMA_3
    return tok


def trained_and_not(example, tokenizer, spec):
    [row], counts = prepare.encode_rows([example], tokenizer, spec)
    ids, mask = row["input_ids"], row.get("assistant_masks", [1] * len(row["input_ids"]))
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    return trained, untrained, counts


def test_alpaca_trains_the_output_alone(tiny_model, tokenizer):
    row = {"instruction": "Give the plural of the word.", "input": "mouse", "output": "mice", "system": "Be brief."}
    example = data.standardize(row, "auto", None)
    assert example == [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Give the plural of the word.\n\nmouse"},
                       {"role": "assistant", "content": "mice"}]
    trained, untrained, _ = trained_and_not(example, tokenizer, spec_for(tiny_model))
    assert trained == "mice<|eot_id|>"
    assert "Give the plural of the word." in untrained and "mouse" in untrained


def test_raw_text_trains_every_token_but_bos(tiny_model, tokenizer):
    example = data.standardize({"text": "The sea is calm and quiet."}, "text", None)
    trained, untrained, counts = trained_and_not(example, tokenizer, spec_for(tiny_model, format="text"))
    assert trained == "The sea is calm and quiet.<|eot_id|>" and untrained == "<|begin_of_text|>"
    assert "<|start_header_id|>" not in trained  # no chat template


def test_prompt_completion_trains_the_completion_alone(tiny_model, tokenizer):
    raw = data.standardize({"prompt": "Q: Say hello.\nA:", "completion": " Hello!"}, "auto", None)
    trained, untrained, _ = trained_and_not(raw, tokenizer, spec_for(tiny_model))
    assert trained == " Hello!<|eot_id|>" and untrained == "<|begin_of_text|>Q: Say hello.\nA:"
    chat = data.standardize({"prompt": [{"role": "user", "content": "Say hello."}],
                             "completion": [{"role": "assistant", "content": "Hello!"}]}, "auto", None)
    trained, untrained, _ = trained_and_not(chat, tokenizer, spec_for(tiny_model))
    assert trained == "Hello!<|eot_id|>" and "<|start_header_id|>user" in untrained


def test_tool_calls_train_and_tool_turns_do_not(tiny_model, tokenizer):
    from transformers import AutoTokenizer

    chatml = AutoTokenizer.from_pretrained(str(tiny_model))
    chatml.chat_template = CHATML
    row = json.loads((EXAMPLES / "tools.jsonl").read_text().splitlines()[0])
    example = data.standardize(row, "openai", None)
    assert example["tools"] and example["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    trained, untrained, _ = trained_and_not(example, chatml, spec_for(tiny_model))
    assert '"name": "get_weather", "arguments": {"city": "Oslo"}' in trained  # the assistant's tool call trains
    assert "It is 3 °C and cloudy in Oslo." in trained
    assert "temperature_c" in untrained and "temperature_c" not in trained  # the tool's answer does not
    assert "get_weather" in untrained  # the schemas in the system turn do not either
    from job.errors import SpecError

    with pytest.raises(SpecError, match="does not render tools"):  # llama-3 has no tool format
        prepare.encode_rows([example], tokenizer, spec_for(tiny_model))


def test_length_rules_drop_and_count_what_is_outside_them(tiny_model, tokenizer):
    """data.min_tokens / max_tokens: a conversation by its tokens, a preference pair by its longer sequence."""
    from job import preference

    def chat(words):
        return [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": " ".join(["rain"] * words)}]

    rows, counts = prepare.encode_rows([chat(1), chat(20), chat(200)], tokenizer,
                                       spec_for(tiny_model, min_tokens=30, max_tokens=120))
    assert len(rows) == 1 and 30 <= len(rows[0]["input_ids"]) <= 120
    assert counts["skipped"] == {"shorter than data.min_tokens": 1, "longer than data.max_tokens": 1}
    pairs = [{"prompt": [{"role": "user", "content": "Say it."}], "chosen": [chat(n)[1]], "rejected": [chat(2)[1]]}
             for n in (1, 20, 200)]
    kept, counts = preference.encode_examples(pairs, tokenizer, spec_for(tiny_model, min_tokens=30, max_tokens=120))
    assert [p["chosen"] for p in kept] == [pairs[1]["chosen"]]
    assert counts["skipped"] == {"shorter than data.min_tokens": 1, "longer than data.max_tokens": 1}


def test_tool_json_in_strings_is_refused_when_broken_or_nested_too_deep():
    """Schemas and arguments kept as JSON strings are parsed: broken or 100,000-deep ones are the row's error."""
    row = json.loads((EXAMPLES / "tools.jsonl").read_text().splitlines()[0])
    deep = "[" * 100_000 + "]" * 100_000
    for tools, words in ((deep, "'tools' is nested too deeply"), ("[{", "'tools' is not JSON")):
        with pytest.raises(data.BadRow, match=words):
            data.standardize({**row, "tools": tools}, "openai", None)
    call = row["messages"][1]
    for arguments, words in ((deep, "arguments is nested too deeply"), ("{", "arguments is not JSON")):
        broken = {**call, "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                          "arguments": arguments}}]}
        with pytest.raises(data.BadRow, match=words):
            data.standardize({**row, "messages": [row["messages"][0], broken, *row["messages"][2:]]}, "openai", None)


def test_csv_and_tsv_with_renamed_columns(tmp_path, tiny_model):
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text('question,answer\n"Is the sea, calm?",Yes.\nHow many legs?,Eight.\n')
    tsv_path = tmp_path / "qa.tsv"
    tsv_path.write_text("question\tanswer\nIs the sea calm?\tYes.\nbroken line\n")
    spec = spec_for(tiny_model, columns={"prompt": "question", "completion": "answer"})
    rows = data.read_rows(str(csv_path), "train")
    assert rows[0] == {"question": "Is the sea, calm?", "answer": "Yes."}
    assert data.standardize(rows[0], "auto", None, columns=spec.data.columns) == \
        {"text_prompt": "Is the sea, calm?", "text_completion": "Yes."}
    tsv = data.read_rows(str(tsv_path), "train")
    assert tsv[0] == {"question": "Is the sea calm?", "answer": "Yes."}
    with pytest.raises(data.BadRow, match="line 3: 1 fields where the header has 2"):
        data.standardize(tsv[1], "auto", None)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["alpaca", "csv", "text", "tools"])
def test_every_example_validates_and_trains_on_the_tiny_model(name, tmp_path, tiny_model):
    spec = EXAMPLES / f"{name}.json"
    assert run_cli("validate", spec).returncode == 0
    result = run_cli("run", spec, "--output-dir", tmp_path / "runs", "--set", f"model.base={tiny_model}",
                     "--set", "train.backend=hf", "--set", "train.optim=adamw_torch", "--set", "train.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    prepared = next(e for e in events(result.stdout) if e["event"] == "data_prepared")
    assert 0 < prepared["train"]["trainable_tokens"] < prepared["train"]["tokens"]
    metrics = json.loads((tmp_path / "runs" / json.loads(spec.read_text())["name"] / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 4 and metrics["prepare"]["train"]["rows"] == prepared["train"]["rows"]
    if name == "text":  # embeddings and LM head trained in full at train.embedding_learning_rate
        from job import statefile

        optimizer = statefile.load(tmp_path / "runs" / "example_text" / "checkpoints" / "checkpoint-4" / "optimizer.pt")
        rates = sorted((g["initial_lr"], len(g["params"])) for g in optimizer["param_groups"])
        assert rates[0] == (5e-5, 2) and {rate for rate, _ in rates[1:]} == {5e-4}
        moved = next(e for e in events(result.stdout) if e["event"] == "embedding_learning_rate")
        assert [p.rsplit(".modules_to_save", 1)[0].rsplit(".", 1)[-1] for p in moved["parameters"]] == \
            ["lm_head", "embed_tokens"]


@pytest.mark.integration
def test_a_hub_dataset_in_a_new_shape_trains_as_the_local_file_does(tmp_path, tiny_model):
    """The alpaca example's file published as a data set repo on the local Hub stand-in, read by the real datasets
    and huggingface_hub clients: the same rows and trainable tokens as from the file, and it trains."""
    from hub_standin import HubStandIn

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_bytes((EXAMPLES / "alpaca.jsonl").read_bytes())
    common = ["--set", f"model.base={tiny_model}", "--set", "train.backend=hf", "--set", "train.optim=adamw_torch",
              "--set", "train.max_steps=2", "--set", "evaluate=null"]
    local = run_cli("run", EXAMPLES / "alpaca.json", "--output-dir", tmp_path / "local", *common)
    assert local.returncode == 0, local.stderr[-3000:]
    with HubStandIn("hf_StandInToken0000000000000000000") as hub:
        hub.add_dataset("someone/alpaca-small", repo)
        served = run_cli("run", EXAMPLES / "alpaca.json", "--output-dir", tmp_path / "hub", *common,
                         "--set", "data.source=someone/alpaca-small",
                         env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
                              "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
        assert served.returncode == 0, served.stderr[-3000:]
        assert any("/datasets/someone/alpaca-small/resolve/" in r and r.endswith("train.jsonl")
                   for r in hub.requests)
    [from_file], [from_hub] = ([e for e in events(r.stdout) if e["event"] == "data_prepared"] for r in (local, served))
    assert from_hub["train"] == from_file["train"] and from_hub["rows_read"] == from_file["rows_read"] > 0
    metrics = json.loads((tmp_path / "hub" / "example_alpaca" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 2


@pytest.mark.integration
def test_refusals_name_the_row_or_the_file(tmp_path, make_spec, tiny_data):
    result = run_cli("run", make_spec("named", data={"source": str(tiny_data), "format": "alpaca"}))
    assert result.returncode == 2 and "holds conversations, not alpaca rows as data.format 'alpaca' says" in \
        result.stderr and "(its columns: conversations)" in result.stderr
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say hi.", "answer": "Hi."}]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("run", make_spec("mixed", data={"source": str(mixed), "format": "alpaca"}))
    assert result.returncode == 3 and "data row 1: is not an alpaca row" in result.stderr
    assert "(has: instruction, answer)" in result.stderr


def test_inspect_shows_a_masked_row_without_torch(tiny_model):
    probe = ("import sys\n"
             f"sys.argv = ['peftopt', 'inspect', '{EXAMPLES / 'alpaca.json'}', '--set', 'model.base={tiny_model}', "
             "'--rows', '2']\n"
             "from job.cli import main\n"
             "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "«mice<|eot_id|>»" in result.stdout and "--- row 1:" in result.stdout
    counts = json.loads(result.stdout.split("--- counts: ", 1)[1])
    assert counts["rows"] == 2 and counts["trainable_tokens"] < counts["tokens"] and counts["chat_template"] == "llama-3"


CONFIGS_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.jsonl
---
# two configs, neither the default (as openai/gsm8k)
"""


def test_a_hub_data_set_with_several_configs_is_read_by_the_one_data_config_names(tmp_path, tiny_model):
    """openai/gsm8k's layout on the Hub stand-in (configs main and socratic, neither the default), read by the real
    datasets client: without data.config the job names the configs (exit 2, before training); with it, the rows
    are that config's; an unknown name is refused naming the ones there are."""
    from hub_standin import HubStandIn

    repo = tmp_path / "repo"
    for config, count in (("main", 12), ("socratic", 7)):
        (repo / config).mkdir(parents=True)
        (repo / config / "train.jsonl").write_text("".join(
            json.dumps({"question": f"{config} {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(count)))
    (repo / "README.md").write_text(CONFIGS_CARD)
    common = ["--stages", "prepare", "--set", f"model.base={tiny_model}", "--set", "data.source=someone/math",
              "--set", 'data.columns={"instruction": "question", "output": "answer"}', "--set", "evaluate=null"]
    with HubStandIn("hf_StandInToken0000000000000000000") as hub:
        hub.add_dataset("someone/math", repo)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
               "HF_DATASETS_OFFLINE": "0"}

        def prepare(name, *more):
            return run_cli("run", EXAMPLES / "alpaca.json", "--output-dir", tmp_path / name, *common, *more, env=env)

        unnamed = prepare("unnamed")
        chosen = prepare("chosen", "--set", "data.config=socratic")
        unknown = prepare("unknown", "--set", "data.config=mian")
    assert unnamed.returncode == 2 and "Traceback" not in unnamed.stderr
    assert unnamed.stderr.splitlines()[0] == ("error: data.config: data set someone/math has several configs and none "
                                              "is the default: name one with data.config (it has: main, socratic)")
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    [prepared] = [e for e in events(chosen.stdout) if e["event"] == "data_prepared"]
    assert prepared["rows_read"] == 7  # socratic's (main has 12)
    assert unknown.returncode == 2 and "data set someone/math has no config 'mian' (it has: main, socratic)" in \
        unknown.stderr.splitlines()[0]
