"""On a terminal (a real pseudo-terminal), training shows one line updated in place (step/max, loss, learning
rate, tokens/s, time left) instead of an event line and the Trainer's dict per step, prepare shows its count, and
no library warning or bar reaches the screen; the run's events file still gets every step as JSON."""
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import write_tiny_spec

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run_in_a_terminal(*args: str, timeout: float = 600) -> str:
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal of 160 columns
    env = {k: v for k, v in os.environ.items() if k != "PEFTOPT_LOG_FORMAT"}
    proc = subprocess.Popen([sys.executable, "-m", "job", *args], stdin=secondary, stdout=secondary,
                            stderr=secondary, cwd=ROOT, env=env, close_fds=True)
    os.close(secondary)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(main)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_training_on_a_terminal_is_one_line_updated_in_place(tmp_path, tiny_model, tiny_data):
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "tty", train={"max_steps": 6, "save_steps": 3,
                                                                          "optim": "auto"})
    screen = run_in_a_terminal("run", str(spec), "--stages", "prepare,train")
    assert re.search(r"prepare \d+(/\d+)? rows", screen), screen[-3000:]  # prepare's own count line
    # the default spec on a CPU, and no library's warnings or bars: they are muted in one place (job/log.py)
    for noise in ("optimizer_substituted", "library_log", "cross-contamination", "Padding-free", "Writing model",
                  "Warning", "warn("):
        assert noise not in screen, (noise, screen[-3000:])
    updates = re.findall(r"train (\d)/6 \|.*?loss [\d.]+, lr [\d.e+-]+, [\d,]+ tok/s", screen)
    assert updates[-1] == "6" and len(set(updates)) >= 3, screen[-3000:]
    assert "\r" in screen  # the same line, rewritten
    assert "train_progress" not in screen and "'loss':" not in screen  # no event line nor Trainer dict per step
    assert "stage_finished" in screen  # other events still print, above the bar
    recorded = [json.loads(line) for line in (tmp_path / "runs" / "tty" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in recorded if e["event"] == "train_progress"] == [1, 2, 3, 4, 5, 6]
