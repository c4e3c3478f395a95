"""The README's "Your first job", exactly as written: its files are written where it says, its commands run in
order (on the tiny model, which the spec's base is swapped for, since this machine trains the 270M demo model for
minutes), and the job ends with the report the README promises. A README edit that breaks the walk-through fails
here."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def first_job() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Your first job\n", 1)[1].split("\n## ", 1)[0]


def blocks(section: str):
    """(kind, path, body) for each fenced block: files after a `<!-- file: PATH -->` line, shell, console."""
    for match in re.finditer(r"(?:<!-- file: (?P<path>\S+) -->\n)?```(?P<kind>\w+)\n(?P<body>.*?)```", section, re.S):
        yield match["kind"], match["path"], match["body"]


def test_the_readme_is_a_guide_of_at_most_300_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_your_first_job_as_written_ends_with_the_report(tmp_path, tiny_model):
    (tmp_path / "jobspecs").symlink_to(ROOT / "jobspecs")
    env = {**os.environ, "PEFTOPT_LOG_FORMAT": "json", "PEFTOPT_BASE_CACHE": str(tmp_path / "bases")}
    written, ran = [], []
    for kind, path, body in blocks(first_job()):
        if path:
            target = tmp_path / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
            written.append(path)
            if path.endswith("spec.json"):  # the one change: the tiny model instead of the 270M demo model
                spec = json.loads(body)
                spec["model"].update(base=str(tiny_model), chat_template="llama-3", max_seq_length=128)
                spec.setdefault("export", {})["tokenizer_pre"] = "llama-bpe"
                target.write_text(json.dumps(spec))
        elif kind == "sh":
            for line in body.strip().splitlines():
                result = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, env=env)
                assert result.returncode == 0, (line, result.stderr)
                ran.append(line)
        elif kind == "console":
            commands = re.findall(r"^\$ (.+)$", body, re.M)
            for command, expected in zip(commands, re.split(r"^\$ .+$\n?", body, flags=re.M)[1:]):
                argv = shlex.split(command)
                assert argv[0] == "peftopt", command
                result = subprocess.run([sys.executable, "-m", "job", *argv[1:]], cwd=tmp_path, capture_output=True,
                                        text=True, env=env, timeout=1200)
                assert result.returncode == 0, (command, result.stderr[-3000:])
                if argv[1] == "validate":  # what the README says it prints
                    assert result.stdout.strip() == expected.strip(), result.stdout
                if argv[1] == "inspect":
                    assert "--- row 0:" in result.stdout and "trained ---" in result.stdout
                ran.append(command)
    assert written == ["myjob/spec.json", "myjob/suite.jsonl"]
    assert [c.split()[1] for c in ran if c.startswith("peftopt")] == ["validate", "inspect", "run", "report"]

    run_dir = tmp_path / "runs" / "first"
    for artifact in ("adapter/adapter_model.safetensors", "merged/config.json", "gguf/first-q8_0.gguf",
                     "gguf/Modelfile", "metrics.json", "events.jsonl", "state.json"):
        assert (run_dir / artifact).is_file(), artifact  # what the README says the run directory holds
    report = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.html").is_file()
    for prompt in ("garden", "candle", "Where is the bus?"):  # each suite prompt, with its checks' outcome
        assert prompt in report, prompt
    assert "passed" in report.lower() and "held-out" in report.lower()
