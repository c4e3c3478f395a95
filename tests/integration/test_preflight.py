"""Integration (CLI, CPU): everything a jobspec names is checked before any work. A missing or malformed prompt
suite, chat template, data file, base model directory or llama.cpp pre-tokenizer ends `peftopt run` with exit
2 (3 for a bad data row) and one line naming the field and the file, before any stage starts and with nothing
written; `peftopt validate` finds the same in files shipped beside the jobspec."""
import json
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def peftopt(*args):
    return run_cli(*args, timeout=300)


def refused(result, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not any(json.loads(line)["event"] == "stage_started" for line in result.stdout.splitlines() if line)
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and all(n in result.stderr for n in needles), result.stderr


@pytest.fixture
def evaluating(make_spec, tmp_path):
    def make(name, prompts, **sections):
        return make_spec(name, evaluate={"prompts": prompts, "targets": ["adapter"], "max_new_tokens": 4}, **sections)
    return make


def test_missing_prompt_suite(evaluating, tmp_path):
    missing = tmp_path / "nowhere" / "suite.json"
    result = peftopt("run", str(evaluating("p1", str(missing))))
    refused(result, 2, "evaluate.prompts", str(missing))
    assert not (tmp_path / "runs").exists()  # nothing written


def test_malformed_prompt_suite_and_unknown_check(evaluating, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompts": [ {"prompt": "hi"}, ]}')
    refused(peftopt("run", str(evaluating("p2", str(broken)))), 2, "evaluate.prompts", str(broken))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"prompts": [{"id": "q", "prompt": "hi", "checks": {"spelling": {}}}]}))
    refused(peftopt("run", str(evaluating("p3", str(odd)))), 2, "evaluate.prompts", "unknown check 'spelling'")
    bad_settings = tmp_path / "settings.json"
    bad_settings.write_text(json.dumps({"prompts": [{"id": "q", "prompt": "hi", "checks": {"chrf": {"refrence": "x"}}}]}))
    refused(peftopt("run", str(evaluating("p4", str(bad_settings)))), 2, "check 'chrf'")


def test_missing_or_broken_chat_template(make_spec, tmp_path):
    missing = tmp_path / "chat.jinja"
    refused(peftopt("run", str(make_spec("t1", model={"chat_template": str(missing)}))), 2,
            "model.chat_template", str(missing))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }")
    refused(peftopt("run", str(make_spec("t2", model={"chat_template": str(broken)}))), 2,
            "model.chat_template", str(broken), "does not render")


def test_missing_data_file_is_2_and_a_bad_row_is_3(make_spec, tmp_path, tiny_data):
    missing = tmp_path / "gone.jsonl"
    refused(peftopt("run", str(make_spec("d1", data={"source": str(missing)}))), 2, "data.source", str(missing))
    rows = tiny_data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:3] + ['{"conversations": [{"from": "gpt", "value": "hi"}]}'] + rows[3:]) + "\n")
    refused(peftopt("run", str(make_spec("d2", data={"source": str(bad)}))), 3, "data row 3", str(bad))
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(rows[0] + "\n{not json\n")
    refused(peftopt("run", str(make_spec("d3", data={"source": str(garbled)}))), 3, "line 2", str(garbled))


def test_base_model_directory_without_a_tokenizer(make_spec, tmp_path, tiny_model):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model / "config.json").read_text())
    refused(peftopt("run", str(make_spec("m1", model={"base": str(bare)}))), 2, "model.base", "tokenizer")


def test_pre_tokenizer_unknown_to_the_pinned_converter(make_spec):
    spec = make_spec("g1", export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpf"})
    refused(peftopt("run", str(spec)), 2, "export.tokenizer_pre", "llama-bpf")


def test_every_problem_at_once(make_spec, tmp_path):
    spec = make_spec("all", model={"chat_template": str(tmp_path / "x.jinja")},
                     evaluate={"prompts": str(tmp_path / "y.json"), "targets": ["adapter"]},
                     export={"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "nope"})
    result = peftopt("run", str(spec))
    refused(result, 2, "3 problems", "model.chat_template", "evaluate.prompts", "export.tokenizer_pre")


def test_validate_checks_the_files_shipped_beside_the_spec(tmp_path):
    spec = json.loads((ROOT / "jobspecs" / "smoke.json").read_text())
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "seed10.json").write_text('{"prompts": "not a list"}')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat-demo.jsonl").write_text((ROOT / "jobspecs" / "data" / "chat-demo.jsonl").read_text())
    (tmp_path / "smoke.json").write_text(json.dumps(spec))
    result = peftopt("validate", str(tmp_path / "smoke.json"))
    assert result.returncode == 2 and "evaluate.prompts" in result.stderr and "no 'prompts' list" in result.stderr
    (tmp_path / "prompts" / "seed10.json").write_text((ROOT / "jobspecs" / "prompts" / "seed10.json").read_text())
    (tmp_path / "data" / "chat-demo.jsonl").write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n')
    result = peftopt("validate", str(tmp_path / "smoke.json"))
    assert result.returncode == 3 and "data row 0" in result.stderr and "no assistant turn" in result.stderr
    (tmp_path / "data" / "chat-demo.jsonl").write_text((ROOT / "jobspecs" / "data" / "chat-demo.jsonl").read_text())
    assert peftopt("validate", str(tmp_path / "smoke.json")).returncode == 0
    # an absolute path elsewhere depends on the machine: validate leaves it to `run`
    spec["evaluate"]["prompts"] = "/nonexistent/suite.json"
    (tmp_path / "abs.json").write_text(json.dumps(spec))
    assert peftopt("validate", str(tmp_path / "abs.json")).returncode == 0
