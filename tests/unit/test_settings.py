"""Unit: the environment is read once, into job/settings.py's Settings: a bad value is exit 2 naming the
variable, docs/reference/settings.md (generated) lists every variable with its default, no other module reads os.environ, and
library logging is routed once (when each library's logging module is imported, whenever that is)."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli
from job import settings


def test_defaults_and_parsing():
    current = settings.load({})
    assert (current.hub_retries, current.hub_backoff_s, current.liger, current.nproc) == (5, 2.0, True, "1")
    parsed = settings.load({"PEFTOPT_HUB_RETRIES": "3", "PEFTOPT_LIGER": "off", "PEFTOPT_NPROC": "auto",
                            "JOB_COMPLETION_INDEX": "2", "PEFTOPT_LOG_FORMAT": "JSON"})
    assert (parsed.hub_retries, parsed.liger, parsed.nproc, parsed.array_index(), parsed.log_format) == \
        (3, False, "auto", ("JOB_COMPLETION_INDEX", 2), "json")


def test_bad_values_are_all_named_at_once():
    with pytest.raises(settings.SpecError) as failure:
        settings.load({"PEFTOPT_HUB_RETRIES": "many", "PEFTOPT_RANK_WAIT_S": "-1", "PEFTOPT_LIGER": "maybe"})
    text = " ".join(failure.value.details)
    assert "PEFTOPT_HUB_RETRIES='many': expected an integer >= 1" in text
    assert "PEFTOPT_RANK_WAIT_S" in text and "PEFTOPT_LIGER" in text


def test_a_bad_value_is_exit_2_naming_the_variable(tmp_path, make_spec):
    result = run_cli("run", make_spec(), env={"PEFTOPT_HUB_BACKOFF_S": "soon"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == "error: PEFTOPT_HUB_BACKOFF_S='soon': expected a number >= 0"
    assert not (tmp_path / "runs").exists()


def test_secrets_are_stripped_and_only_said_to_be_set():
    current = settings.load({"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz\n", "MY_TOKEN": " tok-1234 "})
    assert current.secret("MY_TOKEN") == "tok-1234" and current.secret("NOPE") is None
    assert current.described() == {"HF_TOKEN": "set"}
    assert "abcdefghij" not in repr(current)
    assert {"hf_abcdefghijklmnopqrstuvwxyz\n", "hf_abcdefghijklmnopqrstuvwxyz"} <= set(current.secrets(["MY_TOKEN"]))


def test_tool_environments_hold_no_secret():
    env = settings.load({}).tool_env()
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["HF_HUB_OFFLINE"] == "1"


def test_the_settings_page_lists_every_variable_with_its_default():
    text = (ROOT / "docs" / "reference" / "settings.md").read_text()
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", text, re.M)}
    for variable in settings.VARIABLES:
        assert variable.name in rows, variable.name
        shown = rows[variable.name].strip("`")
        assert shown == (variable.default if variable.default is not None else "unset"), variable.name


def test_no_module_but_settings_reads_the_environment():
    """Outside job/settings.py, `os.environ` appears only as a write (an assignment or a pop), for a library
    or a child process that reads it, with a comment saying so on that line or just above."""
    found = []
    for path in sorted((ROOT / "job").rglob("*.py")):
        if path.name == "settings.py":
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "environ" and getattr(node.value, "id", None) == "os":
                parent = parents.get(node)
                write = (isinstance(parent, ast.Subscript) and isinstance(parent.ctx, (ast.Store, ast.Del))) or \
                    (isinstance(parent, ast.Attribute) and parent.attr == "pop")
                nearby = "\n".join(lines[max(node.lineno - 6, 0):node.lineno])
                if not write or "#" not in nearby:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert found == []


def test_library_logging_is_routed_once_whenever_the_library_loads():
    probe = (
        "import logging, sys\n"
        "from job import settings\n"
        "from job.log import configure\n"
        "configure(json_output=True, settings=settings.init())\n"
        "assert 'transformers' not in sys.modules\n"
        "import transformers.utils.logging as tl\n"
        "tl.get_logger('x')\n"
        "import datasets\n"
        "for name in ('transformers', 'datasets', 'huggingface_hub'):\n"
        "    lib = logging.getLogger(name)\n"
        "    own = [h for h in lib.handlers if not getattr(h, '_peftopt', False)]\n"
        "    assert lib.propagate and not own, (name, lib.handlers)\n"
        "print('routed')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "routed" in result.stdout, result.stderr[-2000:]
