"""Unit: every event name peftopt logs is in job/events.py (docs/reference/events.md), and a library's line is `library_log` with its
logger, level and text, never an event name of its own. (Integration runs check their events.jsonl too:
tests/integration/test_pipeline.py, tests/image/test_image.py.)"""
import ast
import io
import json
import logging
from pathlib import Path

from conftest import assert_documented_events, documented_events

ROOT = Path(__file__).resolve().parents[2]
LEVELS = ("debug", "info", "warning", "error", "exception", "critical")


def test_every_event_name_in_the_code_is_documented():
    used = set()
    for path in (ROOT / "job").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                used.add(node.args[0].value)
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "event" for t in node.targets) \
                    and isinstance(node.value, ast.Constant):
                used.add(node.value.value)  # the exception family's event names
    assert used and used <= documented_events(), sorted(used - documented_events())


def test_library_lines_are_library_log_events():
    from job import log

    stream = io.StringIO()
    log.configure(json_output=True)
    log.events_to_stderr()
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_peftopt", False))
    handler.setStream(stream)
    # loggers of their own: a library may have disabled existing ones (logging.config) earlier in the session
    logging.getLogger("peftopt_test_library.modeling_utils").warning("JAX version 0.11.2 available.")
    logging.getLogger("peftopt_test_library.unsloth").warning("==((====))==  Unsloth 2026.10.9: Fast Llama patching.\n   \\\\   /|  GPU: H100")
    log.get_logger("peftopt").info("stage_started", stage="train")
    lines = stream.getvalue().splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["library_log", "library_log", "stage_started"]
    assert events[0]["logger"] == "peftopt_test_library.modeling_utils" and events[0]["level"] == "warning"
    assert events[0]["message"] == "JAX version 0.11.2 available." and "Unsloth" in events[1]["message"]
    assert_documented_events(lines)
