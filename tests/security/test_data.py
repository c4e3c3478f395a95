"""Data sets (local files and Hub data sets, and every row in them): read only from where the spec says, as
regular files of bounded size, each row bounded in size and depth; a bad row is exit 3 naming it, or skipped and
counted (README, "Threat model": data sets)."""
import json
import os
import time

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration


def test_a_fifo_a_device_or_a_huge_file_is_refused_at_once(tmp_path, make_spec):
    fifo = tmp_path / "suite.json"
    os.mkfifo(fifo)
    started_at = time.monotonic()
    result = run_cli("run", make_spec("fifo", evaluate={"prompts": str(fifo), "targets": ["adapter"]}), timeout=120)
    assert result.returncode == 2 and "is a FIFO, not a regular file" in result.stderr
    assert time.monotonic() - started_at < 60  # nothing waited for a writer
    result = run_cli("run", make_spec("dev", model={"chat_template": "/dev/zero.jinja"}), timeout=120)
    assert result.returncode == 2 and "model.chat_template" in result.stderr
    device = tmp_path / "zero.jinja"
    device.symlink_to("/dev/zero")
    result = run_cli("run", make_spec("dev2", model={"chat_template": str(device)}), timeout=120)
    assert result.returncode == 2 and "is a device, not a regular file" in result.stderr
    huge = tmp_path / "big-suite.json"
    with open(huge, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    result = run_cli("run", make_spec("huge", evaluate={"prompts": str(huge), "targets": ["adapter"]}), timeout=120)
    assert result.returncode == 2 and "more than the" in result.stderr and "allowed" in result.stderr


def test_a_huge_row_is_cut_before_rendering_and_counted(tmp_path, make_spec, tiny_data):
    data = tmp_path / "huge-row.jsonl"
    giant = {"conversations": [{"from": "human", "value": "Tell me one thing about the sea."},
                               {"from": "gpt", "value": "the sea is calm " * 1_300_000}]}  # a 20 MB row
    data.write_text(tiny_data.read_text() + json.dumps(giant) + "\n")
    result = run_cli("run", make_spec("giant", data={"source": str(data)}, train={"max_steps": 2}))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "giant" / "metrics.json").read_text())["prepare"]
    assert metrics["sources"][0]["chars_capped"] == 1 and metrics["train"]["truncated"] >= 1
    assert json.loads((tmp_path / "runs" / "giant" / "metrics.json").read_text())["train"]["peak_rss_gb"] < 3


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_row_that_breaks_the_parser_is_a_bad_row(policy, tmp_path, make_spec, tiny_data):
    data = tmp_path / "nested.jsonl"
    rows = tiny_data.read_text().splitlines()
    nested = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data.write_text("\n".join(rows[:5] + [nested] + rows[5:]) + "\n")
    result = run_cli("run", make_spec(f"nested-{policy}", data={"source": str(data), "bad_rows": policy},
                                      train={"max_steps": 2}))
    assert "Traceback" not in result.stderr
    if policy == "error":
        assert result.returncode == 3 and "data row 5: line 6: nested too deeply" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        source = json.loads((tmp_path / "runs" / "nested-skip" / "metrics.json").read_text())["prepare"]["sources"][0]
        assert source["skipped"] == {"nested too deeply": 1}
