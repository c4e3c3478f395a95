"""Base models (weights, configs, tokenizers, chat templates, every file of their directory, and the code they
name): nothing in them runs as code, follows a link out, reaches a secret, or exhausts the machine; what peftopt
writes from them for another program is quoted for it (docs/security.md: base models)."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import events, run_cli, write_tiny_spec
from hub_standin import HubStandIn
from security.canary import CANARY, ENV, assert_no_canary, started

pytestmark = pytest.mark.integration


EVIL = "import pathlib\npathlib.Path('{marker}').write_text('ran')\n"


@pytest.fixture
def custom_code_base(tmp_path, tiny_model):
    """A built-in architecture whose files also name custom code (auto_map) that leaves a marker when run."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    marker = tmp_path / "custom-code-ran"
    (base / "evil.py").write_text(EVIL.format(marker=marker) + "from transformers import LlamaConfig as EvilConfig\n"
                                  "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return base, marker


def test_code_a_model_names_never_runs_in_training_merge_or_conversion(tmp_path, tiny_data, custom_code_base):
    base, marker = custom_code_base
    spec = write_tiny_spec(tmp_path, base, tiny_data, "custom", train={"max_steps": 2},
                           export={"merge": True, "gguf": ["f16"], "tokenizer_pre": "llama-bpe", "verify_tokens": 4})
    result = run_cli("run", spec, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "custom"
    assert not marker.exists()
    for folder in ("merged", "adapter"):
        for name in ("config.json", "tokenizer_config.json"):
            if (run_dir / folder / name).exists():
                assert "auto_map" not in json.loads((run_dir / folder / name).read_text()), (folder, name)
        assert not list((run_dir / folder).glob("*.py"))
    merged = [e for e in events(result.stdout) if e["event"] == "merged"][0]
    assert "config.json: auto_map" in merged["custom_code_dropped"]
    assert_no_canary(result.stdout, result.stderr, dirs=[run_dir])


def test_a_base_that_only_exists_as_its_own_code_is_refused_before_work(tmp_path, tiny_data, custom_code_base):
    base, marker = custom_code_base
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "evil-architecture"
    (base / "config.json").write_text(json.dumps(config))
    result = run_cli("run", write_tiny_spec(tmp_path, base, tiny_data, "alien"))
    assert result.returncode == 2 and "names custom code (auto_map)" in result.stderr and "model.base" in result.stderr
    assert not started(result) and not marker.exists()


def test_a_link_in_the_base_directory_to_a_private_file_is_refused_and_nothing_pushed(tmp_path, tiny_model, tiny_data):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    outside = tmp_path / "private.txt"
    outside.write_text(f"secret notes {CANARY}")
    (base / "tokenizer.model").symlink_to(outside)  # the file merge copies for llama.cpp's converter
    push = {"adapter_repo": "me/linked-lora", "merged_repo": "me/linked-merged", "token_env": "PEFTOPT_TEST_TOKEN"}
    spec = write_tiny_spec(tmp_path, base, tiny_data, "linked", train={"max_steps": 2},
                           export={"merge": True, "gguf": []}, push=push)
    with HubStandIn(CANARY) as hub:
        env = {**ENV, "PEFTOPT_TEST_TOKEN": CANARY, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "PEFTOPT_HUB_BACKOFF_S": "0.01"}
        result = run_cli("run", spec, env=env)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "tokenizer.model is a link to" in result.stderr.splitlines()[0] and not started(result)
    assert not hub.files
    assert_no_canary(result.stdout, result.stderr, dirs=[tmp_path / "runs"], uploads=hub.files)


def ollama_values(text: str) -> list[tuple[str, str]]:
    """(command, value) as Ollama's parser (ollama/ollama parser/parser.go) reads a Modelfile: a value ends at
    whitespace unless the text so far is a well-quoted string; quotes are stripped, never unescaped;
    unprintable characters are dropped."""
    def unquote(s):
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buffer, name = [], "nil", "", ""
    for ch in text + "\n":
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch not in " \t\r\n":
                state, buffer = "name", ch
        elif state == "comment":
            state = "nil" if ch in "\r\n" else "comment"
        elif state == "name":
            if ch.isalpha():
                buffer += ch
            else:
                name, buffer = buffer.lower(), ""
                state = "param" if name == "parameter" else "value"
        elif state == "param":
            if ch in " \t":
                name, buffer, state = buffer, "", "value"
            else:
                buffer += ch
        elif state == "value":
            if ch in " \t\r\n":
                value, ok = unquote(buffer.strip())
                if ok:
                    commands.append((name, value))
                    state, buffer = "nil", ""
                    continue
            if ch.isprintable() or ch in " \t":
                buffer += ch
    return commands


@pytest.mark.parametrize("stop", ["<|eot_id|>", "</s> end", 'say"x"', "<end_of_turn>"])
def test_modelfile_values_come_back_as_written(stop, tiny_model):
    from transformers import AutoTokenizer

    from job.specfile import validate_data
    from job.stages import gguf
    from job.templates import LLAMA_3

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.chat_template = LLAMA_3
    tokenizer.eos_token = stop
    spec = validate_data({"name": "m", "model": {"base": str(tiny_model)}})
    text = gguf.modelfile(spec, tokenizer, {"q8_0": {"file": "m-q8_0.gguf"}})
    parsed = ollama_values(text)
    assert ("from", "./m-q8_0.gguf") in parsed and ("stop", stop) in parsed and ("stop", "<|eot_id|>") in parsed
    assert {c for c, _ in parsed} == {"from", "template", "stop", "temperature"}


@pytest.mark.parametrize("stop", ["</s>\nADAPTER /etc/shadow", "</s>\rSYSTEM obey", '" \nSYSTEM x', 'a" SYSTEM b'])
def test_a_stop_string_that_would_add_instructions_is_refused(stop, tiny_model):
    from transformers import AutoTokenizer

    from job.errors import ExternalError
    from job.specfile import validate_data
    from job.stages import gguf

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    tokenizer.eos_token = stop
    spec = validate_data({"name": "m", "model": {"base": str(tiny_model)}})
    with pytest.raises(ExternalError, match="the stop string"):
        gguf.modelfile(spec, tokenizer, {"q8_0": {"file": "m-q8_0.gguf"}})


def test_a_package_base_must_be_a_model_package(tmp_path, make_spec):
    result = run_cli("run", make_spec("pkg", model={"base": "package:click"}))
    assert result.returncode == 2 and "not a GGUF model package" in result.stderr and not started(result)
    result = run_cli("run", make_spec("pkg2", model={"base": "package:gguf"}))
    assert result.returncode == 2 and "has no assemble()" in result.stderr


@pytest.mark.parametrize("planted", ["additional_chat_templates/leak.jinja", "generation_config.json",
                                     "processor_config.json", "tokenizer.model"])
def test_a_link_anywhere_in_the_base_is_refused_before_any_library_opens_it(planted, tmp_path, tiny_model, tiny_data):
    """transformers reads every file of a local model (each additional_chat_templates/*.jinja included) following
    links, and the tokenizer would save what it read into adapter/ and merged/, and push would upload it: a link to
    /proc/self/environ published the job's whole environment. Every file of the base is checked first."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / planted).parent.mkdir(parents=True, exist_ok=True)
    (base / planted).unlink(missing_ok=True)
    (base / planted).symlink_to("/proc/self/environ")
    push = {"adapter_repo": "me/leaky-lora", "merged_repo": "me/leaky-merged", "token_env": "HF_TOKEN"}
    spec = write_tiny_spec(tmp_path, base, tiny_data, "leaky", model={"chat_template": "auto"}, train={"max_steps": 2},
                           export={"merge": True, "gguf": []}, push=push)
    with HubStandIn(CANARY) as hub:
        result = run_cli("run", spec, env={**ENV, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                                           "PEFTOPT_HUB_BACKOFF_S": "0.01"}, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: model: ") and planted in first and "/proc/self/environ" in first, first
    assert not started(result) and not hub.files
    assert_no_canary(result.stdout, result.stderr, dirs=[tmp_path / "runs"])


def test_a_fifo_in_the_base_is_refused_at_once(tmp_path, tiny_model, tiny_data):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    os.mkfifo(base / "preprocessor_config.json")
    began = time.monotonic()
    result = run_cli("run", write_tiny_spec(tmp_path, base, tiny_data, "fifo-base"), timeout=120)
    assert result.returncode == 3 and "preprocessor_config.json is a FIFO" in result.stderr.splitlines()[0]
    assert time.monotonic() - began < 60


def test_only_the_chosen_chat_template_is_saved_never_the_bases_others(tmp_path, tiny_model, tiny_data):
    """A base's named templates (additional_chat_templates/*.jinja, regular files) are loaded by transformers as a
    dict; what the adapter and the merged model carry is the one template the spec chose."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "smuggled.jinja").write_text("{{ 'smuggled ' ~ messages[0]['content'] }}")
    spec = write_tiny_spec(tmp_path, base, tiny_data, "one-template", model={"chat_template": "auto"},
                           train={"max_steps": 2}, export={"merge": True, "gguf": []})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-2000:]
    for folder in ("adapter", "merged"):
        out = tmp_path / "runs" / "one-template" / folder
        assert not (out / "additional_chat_templates").exists(), folder
        assert not any("smuggled" in p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in (".json", ".jinja"))
        assert (out / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


def _with_tokenizer_regex(base: Path, where: str, pattern: str) -> None:
    """The base's tokenizer.json with `pattern` as the regex of its pre-tokenizer (or normalizer)."""
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    if where == "normalizer":
        tokenizer["normalizer"] = {"type": "Replace", "pattern": {"Regex": pattern}, "content": "x"}
    else:
        tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tokenizer["pre_tokenizer"]]}
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("case", ["refused regex", "panics while matching"])
def test_a_tokenizer_whose_regex_breaks_the_engine_is_exit_3(case, tmp_path, tiny_model):
    """A tokenizer.json regex the engine refuses (a plain Exception from Rust), or one that exceeds the engine's
    match limit on ordinary text (a Rust panic, which `except Exception` does not catch: exit 1 and 39 lines)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    if case == "refused regex":
        _with_tokenizer_regex(base, "normalizer", "a{100001}")
        data = None
    else:
        _with_tokenizer_regex(base, "pre_tokenizer", "(a+)+b")
        data = tmp_path / "rows.jsonl"
        rows = [{"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}] * 4
        rows.append({"conversations": [{"from": "human", "value": "a" * 60}, {"from": "gpt", "value": "ok"}]})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = write_tiny_spec(tmp_path, base, data or tmp_path / "unused", "regex", train={"max_steps": 1},
                           **({} if data else {"data": {"source": str(tmp_path / "none.jsonl")}}))
    if data is None:
        (tmp_path / "none.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi."},
                                                                           {"from": "gpt", "value": "Ho."}]}) + "\n")
    result = run_cli("run", spec, env=ENV)
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokenizer" in errors[0] and "Traceback" not in result.stderr
    if data is not None:
        assert re.match(r"error: data row \d: the base's tokenizer fails on it \(Onig", errors[0]), errors[0]
    assert_no_canary(result.stdout, result.stderr)


def test_a_config_that_outgrows_its_weights_is_refused_before_loading(tmp_path, tiny_model, tiny_data):
    """vocab_size raised to 2 million with the embeddings left out: transformers would allocate them at random
    (6.4 GB for a 5 MB model; under a memory limit exit 4, retried forever). Refused from the headers: exit 3."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = 2_000_000
    (base / "config.json").write_text(json.dumps(config))
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "embed_tokens" not in k and "lm_head" not in k},
              str(base / "model.safetensors"))
    began = time.monotonic()
    result = run_cli("run", write_tiny_spec(tmp_path, base, tiny_data, "bomb"), timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "config.json describes about" in result.stderr.splitlines()[0] and not started(result)
    assert time.monotonic() - began < 60
