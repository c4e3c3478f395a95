"""Jobspecs in YAML: read by PyYAML's safe loader and validated as JSON ones are, with line numbers in the errors;
anchors and aliases cannot blow the reader up, and neither can a key given twice or a tag that builds objects."""
import json
from pathlib import Path

import pytest

from conftest import events, run_cli
from job.errors import SpecError
from job.specfile import load_spec

TINY_YAML = """\
# A first job, written as YAML: comments are welcome.
name: yamljob
output_dir: {runs}
model:
  base: {model}        # a local model directory
  max_seq_length: 128
  chat_template: llama-3
data:
  source: {data}
lora: {{r: 8, alpha: 16}}
train:
  backend: hf
  max_steps: 3          # a few steps: this is a test
  per_device_batch_size: 2
  gradient_accumulation_steps: 1
  learning_rate: 5.0e-3
  save_steps: 3
"""


def write(tmp_path, text, name="spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_yaml_spec_with_comments_validates_like_its_json(tmp_path, tiny_model, tiny_data):
    path = write(tmp_path, TINY_YAML.format(runs=tmp_path / "runs", model=tiny_model, data=tiny_data))
    spec = load_spec(path)
    assert spec.name == "yamljob" and spec.train.max_steps == 3 and spec.train.learning_rate == 5e-3
    twin = write(tmp_path, json.dumps(spec.model_dump(mode="json")), "spec.json")
    assert load_spec(twin) == spec


def test_errors_of_a_yaml_spec_name_their_lines(tmp_path):
    path = write(tmp_path, "name: bad\nmodel:\n  base: some/model\ntrain:\n  max_stepz: 3\n  learning_rate: fast\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    details = "\n".join(caught.value.details)
    assert "line 5: train.max_stepz: unknown key (did you mean 'max_steps'?)" in details, details
    assert "line 6: train.learning_rate" in details, details
    with pytest.raises(SpecError, match=r"spec.yaml:4:1: invalid YAML: expected .,. or .\]."):
        load_spec(write(tmp_path, "name: bad\nmodel:\n base: [unclosed\n"))


@pytest.mark.parametrize("text,message", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n",
     "expands to more than"),
    ("name: &n [*n]\n", "refers to a value that holds it"),
    ("name: one\nname: two\n", "duplicate key 'name' (first on line 1)"),
    ("name: !!python/object/apply:os.system ['touch /tmp/pwned-by-yaml']\n", "invalid YAML"),
    ("name: x\n" + "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_yaml_bombs_and_tricks_are_refused_with_exit_2(tmp_path, text, message):
    path = write(tmp_path, text)
    result = run_cli("validate", path, timeout=60)
    assert result.returncode == 2, result.stderr[-500:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-500:]
    assert not Path("/tmp/pwned-by-yaml").exists()


@pytest.mark.integration
def test_a_yaml_spec_runs_the_tiny_job_end_to_end(tmp_path, tiny_model, tiny_data):
    path = write(tmp_path, TINY_YAML.format(runs=tmp_path / "runs", model=tiny_model, data=tiny_data))
    result = run_cli("run", path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["stage"] for e in events(result.stdout) if e["event"] == "stage_finished"] == ["prepare", "train"]
    assert (tmp_path / "runs" / "yamljob" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_problem_in_a_set_override_is_named_as_the_set_not_a_line_of_the_file(tmp_path):
    """`--set train.max_step=3` was reported at the train section's line of the YAML file, which holds no such
    key; it is the override's."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nmodel:\n  base: org/model\ndata:\n  source: d.jsonl\nlora: {}\ntrain:\n  max_steps: 3\n"
                    "  learning_rate: -1\n")
    result = run_cli("validate", spec, "--set", "train.max_step=3", "--set", "lora.r=0")
    assert result.returncode == 2
    assert "  --set train.max_step: unknown key (did you mean 'max_steps'?)" in result.stderr.splitlines()
    assert "  --set lora.r: Input should be greater than or equal to 1" in result.stderr.splitlines()
    assert any(line.startswith("  line 9: train.learning_rate:") for line in result.stderr.splitlines())
