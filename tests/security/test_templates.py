"""Chat templates (a base's own, or a file the spec names): rendered by one guarded renderer on every path (prepare,
preference rows, evaluation, the gguf stage's reference prompts, inspect), bounded in time and memory (README,
"Threat model": chat templates)."""
import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_tiny_spec

pytestmark = pytest.mark.integration


def test_a_chat_template_that_never_ends_is_stopped(tmp_path, make_spec):
    loop = tmp_path / "loop.jinja"
    loop.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                    "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    started_at = time.monotonic()
    result = run_cli("run", make_spec("loop", model={"chat_template": str(loop)}), timeout=300)
    assert result.returncode == 2 and "took more than 5 s" in result.stderr and "model.chat_template" in result.stderr
    assert time.monotonic() - started_at < 120


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE = "{% set s = 'x' * 3000000000 %}{{ s | length }}"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"


def bomb_base(tmp_path, tiny_model, bomb: str, when: str = "always") -> Path:
    """The tiny model with a chat template of its own that loops for 10^10 steps or builds a 3 GB string, always or
    only when asked for an answer (add_generation_prompt: evaluation and preference prompts alone)."""
    base = tmp_path / f"bomb-{abs(hash((bomb, when)))}"
    shutil.copytree(tiny_model, base)
    body = {"always": bomb + PLAIN, "answer": "{% if add_generation_prompt %}" + bomb + "{% endif %}" + PLAIN}[when]
    (base / "chat_template.jinja").write_text(body)
    return base


def assert_bounded(result, began: float, *needles: str) -> None:
    assert result.returncode == 3, result.stderr[-2000:]
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: model.chat_template: rendering") and all(n in first for n in needles), first
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 120


@pytest.mark.parametrize("bomb,needle", [(LOOP, "took more than 5 s"), (HUGE, "needed more than")])
def test_a_base_template_bomb_is_bounded_in_prepare(bomb, needle, tmp_path, tiny_model, tiny_data):
    base = bomb_base(tmp_path, tiny_model, bomb)
    began = time.monotonic()
    result = run_cli("run", write_tiny_spec(tmp_path, base, tiny_data, "bomb-prepare", model={"chat_template": "auto"}),
                     "--stages", "prepare", timeout=300)
    assert_bounded(result, began, "data row 0", needle)


@pytest.mark.parametrize("bomb,needle", [(LOOP, "took more than 5 s"), (HUGE, "needed more than")])
def test_a_base_template_bomb_is_bounded_when_an_evaluate_only_run_asks_it(bomb, needle, tmp_path, tiny_model):
    """T0-style: no training, the base answers the suite; its template only explodes for a generation prompt."""
    base = bomb_base(tmp_path, tiny_model, bomb, when="answer")
    spec = write_tiny_spec(tmp_path, base, tmp_path / "unused", "bomb-evaluate", model={"chat_template": "auto"},
                           data=None, lora=None, train=None,
                           evaluate={"prompts": ["Say hi."], "targets": ["base"], "max_new_tokens": 2})
    began = time.monotonic()
    assert_bounded(run_cli("run", spec, timeout=300), began, "the prompt 'Say hi.'", needle)


def test_a_base_template_bomb_is_bounded_for_preference_rows(tmp_path, tiny_model):
    base = bomb_base(tmp_path, tiny_model, HUGE, when="answer")
    pairs = tmp_path / "pairs.jsonl"
    pair = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go."}]}
    pairs.write_text((json.dumps(pair) + "\n") * 8)
    spec = write_tiny_spec(tmp_path, base, pairs, "bomb-pairs", model={"chat_template": "auto"},
                           data={"format": "preference"}, train={"method": "dpo", "max_steps": 1})
    began = time.monotonic()
    assert_bounded(run_cli("run", spec, "--stages", "prepare", timeout=300), began, "data row 0", "needed more than")


def test_a_base_template_bomb_is_bounded_in_inspect(tmp_path, tiny_model, tiny_data):
    base = bomb_base(tmp_path, tiny_model, LOOP)
    spec = write_tiny_spec(tmp_path, base, tiny_data, "bomb-inspect", model={"chat_template": "auto"})
    began = time.monotonic()
    assert_bounded(run_cli("inspect", spec, "--rows", "1", timeout=300), began, "data row 0", "took more than 5 s")
