"""Chat templates (a base's own, or a file the spec names): rendered by one guarded renderer on every path (prepare,
preference rows, evaluation, the gguf stage's reference prompts, inspect), bounded in time and memory (README,
"Threat model": chat templates)."""
import time

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration


def test_a_chat_template_that_never_ends_is_stopped(tmp_path, make_spec):
    loop = tmp_path / "loop.jinja"
    loop.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                    "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    started_at = time.monotonic()
    result = run_cli("run", make_spec("loop", model={"chat_template": str(loop)}), timeout=300)
    assert result.returncode == 2 and "took more than 5 s" in result.stderr and "model.chat_template" in result.stderr
    assert time.monotonic() - started_at < 120
