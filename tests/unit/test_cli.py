"""Unit: the command line answers without torch, and bad input ends in exit 2 with no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_cli
from job.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = sorted(cli.commands)


def peftopt(*args, env=None):
    return run_cli(*args, env=env, timeout=600)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_fast_commands_do_not_import_torch(tmp_path):
    probe = (
        "import sys, runpy; sys.argv = ['peftopt'] + sys.argv[1:]\n"
        "from job.cli import cli\n"
        "try:\n    cli.main(standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    specs = [str(p) for p in sorted((ROOT / "jobspecs").glob("*.json"))]
    for args in (["--help"], ["validate", *specs], ["schema"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


def test_schema_is_json_schema():
    result = CliRunner().invoke(cli, ["schema"])
    schema = json.loads(result.output)
    assert "properties" in schema and {"model", "train", "push"} <= set(schema["properties"])


@pytest.mark.parametrize("content,needle", [
    ('{"name": "x", "model": {"base": "a"}, "bogus": 1}', "bogus: unknown key"),
    ('{"name": "x", "model": {"base": 5}}', "model.base:"),
    ('{"name": "x", "model": {"base": "a", "max_seq_length": 1}}', "model.max_seq_length:"),
    ('{"name": "x", "model": ', "invalid JSON"),
])
def test_bad_spec_exits_2_naming_the_field_and_writes_nothing(tmp_path, content, needle):
    spec = tmp_path / "bad.json"
    spec.write_text(content)
    out = tmp_path / "runs"
    for args in (["validate", str(spec)], ["run", str(spec), "--output-dir", str(out)]):
        result = peftopt(*args)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_missing_spec_file_and_bad_override(tmp_path):
    result = peftopt("run", str(tmp_path / "nope.json"))
    assert result.returncode == 2 and "no such jobspec file" in result.stderr
    result = peftopt("validate", str(ROOT / "jobspecs/t1.json"), "--set", "lora.r=-1")
    assert result.returncode == 2 and "lora.r:" in result.stderr


def test_push_without_token_fails_before_any_work(tmp_path, make_spec):
    spec = make_spec(push={"adapter_repo": "me/adapter", "token_env": "PEFTOPT_TEST_TOKEN"})
    result = peftopt("run", str(spec), env={"PEFTOPT_TEST_TOKEN": ""})
    assert result.returncode == 2
    assert "PEFTOPT_TEST_TOKEN is not set" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "state.json").exists()


def test_env_reports_versions():
    result = CliRunner().invoke(cli, ["env", "--json"])
    info = json.loads(result.output)
    assert info["versions"]["transformers"] and "cpu_count" in info["hardware"]
    assert "llama_cpp" in info


def test_an_end_of_file_from_the_job_is_a_logged_crash_not_a_silent_exit(tmp_path):
    """Click turns any EOFError into its Abort (exit 1, nothing said): one raised by the job's own work (a truncated
    stream, a child process's pipe) is logged as job_crashed with its traceback, as any other bug."""
    program = ("from job import cli\n"
               "@cli.cli.command('boom')\n"
               "def boom():\n"
               "    raise EOFError('a stream ended early')\n"
               "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", program, "boom"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PEFTOPT_LOG_FORMAT": "json"}, timeout=120)
    assert done.returncode == 1
    crashed = [json.loads(line) for line in done.stdout.splitlines() if '"job_crashed"' in line]
    assert crashed and crashed[0]["error"] == "EOFError: a stream ended early", done.stdout + done.stderr
    assert "EOFError" in json.dumps(crashed[0].get("exception"))
