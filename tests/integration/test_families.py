"""Model families: the built-in chat templates (Llama 3, Gemma, ChatML, Mistral, Phi-3, Qwen 3), their Ollama
templates, thinking turns, masking through a tokenizer's template that has no generation markers, and tiny random
Qwen 3, Mistral, Phi-3 and Gemma 2 models made on the spot that each train, merge, convert to GGUF that llama.cpp
loads and answers with, and get a Modelfile whose template writes what the chat template writes."""
import json
import os
import re
import sys

import pytest

import gotemplate
from conftest import events, run_cli
from job import templates
from job.spec import EvaluateSpec
from job.specfile import validate_data
from job.stages import prepare

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."},
     {"role": "assistant", "content": "It is calm."}, {"role": "user", "content": "And why?"},
     {"role": "assistant", "content": "Because it is."}, {"role": "user", "content": "Thanks."}],
]


def jinja(template: str, messages: list[dict], bos: str = "<BOS>", **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template([messages], chat_template=template, add_generation_prompt=True, bos_token=bos,
                                     eos_token="</s>", **kwargs)[0][0]
    return rendered.removeprefix(bos)  # llama.cpp adds BOS itself; Ollama templates leave it out


@pytest.mark.parametrize("name", list(templates.BUILTIN))
def test_ollama_template_writes_what_the_chat_template_writes(name):
    for messages in CONVERSATIONS:
        assert gotemplate.render(templates.OLLAMA[name], messages) == jinja(templates.BUILTIN[name], messages)


def test_the_renderer_keeps_go_trimming_rules():
    """`{{- end }}` after a turn's newline trims it, as Go does: the Modelfiles before this change did that."""
    trimmed = '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{- end }}<|im_start|>assistant\n'
    assert gotemplate.render(trimmed, CONVERSATIONS[1]) == \
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    assert gotemplate.render(trimmed, CONVERSATIONS[1]) != jinja(templates.CHATML, CONVERSATIONS[1])


def test_thinking_off_is_the_same_in_jinja_ollama_and_evaluation(tiny_model):
    from transformers import AutoTokenizer

    messages = CONVERSATIONS[0]
    off = jinja(templates.QWEN_3, messages, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert jinja(templates.QWEN_3, messages).endswith("<|im_start|>assistant\n")
    assert gotemplate.render(templates.ollama_template("qwen3", False), messages) == off
    from job.evaluation import generate

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.chat_template = templates.QWEN_3
    assert generate.render(tokenizer, "Hi", EvaluateSpec(enable_thinking=False)) == off
    assert generate.render(tokenizer, "Hi", EvaluateSpec()) == jinja(templates.QWEN_3, messages)


def spec_for(tiny_model, **data_section):
    return validate_data({"name": "f", "model": {"base": str(tiny_model), "max_seq_length": 2048},
                          "data": {"source": "x.jsonl", **data_section}, "lora": {}, "train": {"max_steps": 1}})


def trained_text(tokenizer, spec, example) -> str:
    [row], _ = prepare.encode_rows([example], tokenizer, spec)
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])


@pytest.mark.parametrize("thinking", ["keep", "drop"])
def test_thinking_in_training_data_is_kept_or_dropped(tiny_model, thinking):
    from transformers import AutoTokenizer

    from job import data

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.chat_template = templates.QWEN_3
    spec = spec_for(tiny_model, thinking=thinking)
    inline = {"messages": [{"role": "user", "content": "Why?"},
                           {"role": "assistant", "content": "<think>\nThe sky scatters blue.\n</think>\n\nLight."}]}
    beside = {"messages": [{"role": "user", "content": "Why?"},
                           {"role": "assistant", "content": "Light.", "reasoning_content": "The sky scatters blue."}]}
    for row in (inline, beside):
        [example] = data.mixture(spec, [[row]])[0]
        expected = "<think>\nThe sky scatters blue.\n</think>\n\nLight.<|im_end|>\n" if thinking == "keep" \
            else "<think>\n\n</think>\n\nLight.<|im_end|>\n"  # Qwen 3's empty block: an answer without thinking
        assert trained_text(tokenizer, spec, example) == expected


@pytest.mark.parametrize("name", list(templates.BUILTIN))
def test_a_tokenizer_template_without_generation_markers_masks_the_assistant_turns(tiny_model, name):
    """prepare finds assistant turns by rendering prefixes, so a tokenizer's template needs no {% generation %}: its
    mask equals the one transformers derives from the same template with the markers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    marked = templates.BUILTIN[name]
    tokenizer.chat_template = re.sub(r"\{% (end)?generation %\}", "", marked)
    assert "{% generation %}" not in tokenizer.chat_template
    spec = spec_for(tiny_model)
    conversation = CONVERSATIONS[3][:-1]
    [row], _ = prepare.encode_rows([conversation], tokenizer, spec)
    reference = tokenizer.apply_chat_template(conversation, chat_template=marked, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert row["input_ids"] == reference["input_ids"]
    assert row["assistant_masks"] == reference["assistant_masks"] and sum(row["assistant_masks"]) > 0


FAMILY_TEMPLATE = {"qwen3": "qwen3", "mistral": "mistral", "phi3": "phi-3", "gemma2": "gemma"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    import tiny

    made = {}

    def make(family):
        if family not in made:
            made[family] = tiny.make_model(tmp_path_factory.mktemp(family) / "model", family=family)
        return made[family]

    return make


@pytest.mark.integration
@pytest.mark.parametrize("family", list(FAMILY_TEMPLATE))
def test_a_tiny_model_of_each_family_trains_merges_and_answers_from_gguf(family, family_models, tiny_data, tmp_path):
    base = family_models(family)
    assert json.loads((base / "tokenizer_config.json").read_text()).get("chat_template") is None
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "name": f"family_{family}", "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(base), "max_seq_length": 256, "chat_template": "auto"},
        "data": {"source": str(tiny_data)}, "lora": {"r": 8, "alpha": 16},
        # the GPU machine runs these on unsloth too: PEFTOPT_TEST_BACKEND=unsloth
        "train": {"backend": os.environ.get("PEFTOPT_TEST_BACKEND", "hf"), "max_steps": 3, "optim": "adamw_torch",
                  "per_device_batch_size": 4,
                  "learning_rate": 0.001},
        "export": {"merge": True, "gguf": ["f16", "q8_0"], "tokenizer_pre": "llama-bpe", "verify_tokens": 8}}))
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / f"family_{family}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["prepare"]["chat_template"] == FAMILY_TEMPLATE[family]  # chosen by architecture
    assert 0 < metrics["prepare"]["train"]["trainable_tokens"] < metrics["prepare"]["train"]["tokens"]
    verified = {e["type"]: e for e in events(result.stdout) if e["event"] == "gguf_verified"}
    assert set(verified) == {"f16", "q8_0"}
    assert verified["f16"]["agreement"] == 1.0 and verified["f16"]["tokenizer_match"]  # the merged model's tokens
    assert verified["q8_0"]["tokenizer_match"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "merged"))
    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    bos = tokenizer.bos_token or ""
    for messages in CONVERSATIONS:
        written = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert gotemplate.render(template, messages) == written.removeprefix(bos)
    stops = re.findall(r"PARAMETER stop (.*)", modelfile)
    assert stops and all(json.loads(s) in written or json.loads(s) == tokenizer.eos_token for s in stops)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
