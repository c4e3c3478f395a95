"""Integration (CLI, CPU): a stage is one declaration. A toy stage added as one module and one registry line is
known to the runner, fingerprints, preflight, `--stages` and `--restart`; every file a spec names counts by its
content, and changing one reruns exactly the stages downstream of it."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, events, run_cli

pytestmark = pytest.mark.integration

TOY = '''"""A toy stage for tests/integration/test_stages.py: writes the spec's description and the train stage's fingerprint."""
from job.stages.base import RunContext, Stage, StageResult


def check(spec, scope):
    return ["description: the toy stage refuses the word 'forbidden'"] if "forbidden" in spec.description else []


def run(ctx: RunContext) -> StageResult:
    (ctx.run_dir.root / "toy").mkdir(exist_ok=True)
    (ctx.run_dir.root / "toy" / "out.txt").write_text(ctx.spec.description + " " + ctx.fingerprints["train"])
    return StageResult(artifacts=("toy/out.txt",), metrics={"length": len(ctx.spec.description)})


STAGE = Stage(name="toy", doc="writes the description", enabled=lambda spec: True, run=run, check=check,
              fields=("description",), needs=lambda spec: ("train",), artifacts=("toy",))
'''


def started(result) -> list[str]:
    return [e["stage"] for e in events(result.stdout) if e["event"] == "stage_started"]


def skipped(result) -> list[str]:
    return [e["stage"] for e in events(result.stdout) if e["event"] == "stage_skipped"]


def test_a_toy_stage_is_one_module_and_one_registry_line(tmp_path, make_spec):
    code = tmp_path / "code"
    shutil.copytree(ROOT / "job", code / "job", ignore=shutil.ignore_patterns("__pycache__"))
    (code / "job" / "stages" / "toy.py").write_text(TOY)
    registry = code / "job" / "stages" / "__init__.py"
    text = registry.read_text()
    assert text.count('    "train",\n') == 1
    registry.write_text(text.replace('    "train",\n', '    "train",\n    "toy",\n'))  # the one registry line

    spec = make_spec("toy", description="first", train={"max_steps": 2})
    first = run_cli("run", spec, cwd=code)
    assert first.returncode == 0, first.stderr[-2000:]
    assert started(first) == ["prepare", "train", "toy"]
    run_dir = tmp_path / "runs" / "toy"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"]["toy"]["status"] == "done" and state["stages"]["toy"]["fingerprint"]
    assert (run_dir / "toy" / "out.txt").read_text() == "first " + state["stages"]["train"]["fingerprint"]
    assert json.loads((run_dir / "metrics.json").read_text())["toy"] == {"length": 5}

    # preflight: the toy's own check refuses before any work, listed with the other problems
    refused = run_cli("run", spec, "--set", "description=forbidden", "--output-dir", tmp_path / "other", cwd=code)
    assert refused.returncode == 2 and "toy stage refuses" in refused.stderr and not started(refused)
    assert not (tmp_path / "other").exists()

    # fingerprints: a field only the toy reads makes only the toy stale; --restart redoes it alone
    changed = run_cli("run", spec, "--set", "description=second", cwd=code)
    assert changed.returncode == 2 and "toy" in changed.stderr and "--restart" in changed.stderr
    redone = run_cli("run", spec, "--set", "description=second", "--restart", cwd=code)
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert started(redone) == ["toy"] and skipped(redone) == ["prepare", "train"]
    assert (run_dir / "toy" / "out.txt").read_text().startswith("second ")

    # --stages knows it, and what it needs
    fresh = make_spec("toy-fresh", description="x", train={"max_steps": 2})
    alone = run_cli("run", fresh, "--stages", "toy", cwd=code)
    assert alone.returncode == 2 and "toy needs train done first" in alone.stderr
    unknown = run_cli("run", fresh, "--stages", "toys", cwd=code)
    assert unknown.returncode == 2 and "toy" in unknown.stderr.split("stages are")[1]
    # and the repository's own registry does not
    assert run_cli("run", fresh, "--stages", "toy").returncode == 2


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs_run(tmp_path_factory, tiny_model, tiny_data):
    """A run whose every input is a file of its own (base model copy, data, template, suite, check file)."""
    from conftest import write_tiny_spec
    from job.templates import LLAMA_3

    work = tmp_path_factory.mktemp("inputs")
    shutil.copytree(tiny_model, work / "model")
    shutil.copy(tiny_data, work / "data.jsonl")
    (work / "chat.jinja").write_text(LLAMA_3)
    (work / "checks").mkdir()
    (work / "checks" / "items.json").write_text(json.dumps({"expected": 0}))
    (work / "suite.json").write_text(json.dumps({"prompts": [
        {"id": "hello", "prompt": "Say hello."},
        {"id": "list", "prompt": "List three colours.", "checks": {"list_items": "checks/items.json"}},
        {"id": "sea", "prompt": "Tell me one thing about the sea."}]}))
    spec = write_tiny_spec(work, work / "model", work / "data.jsonl", "inputs",
                           model={"chat_template": str(work / "chat.jinja")}, train={"max_steps": 2, "save_steps": 2},
                           evaluate={"prompts": str(work / "suite.json"), "max_new_tokens": 4,
                                     "targets": ["base", "adapter", "gguf"]},
                           export={"merge": True, "gguf": ["f16"], "tokenizer_pre": "llama-bpe", "verify_prompts": 1,
                                   "verify_tokens": 4})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-2000:]
    assert started(result) == ["prepare", "train", "merge", "gguf", "evaluate"]
    return work, spec, work / "runs" / "inputs"


EVERYTHING = ["prepare", "train", "merge", "gguf", "evaluate"]


def _edit_suite_prompt(work):
    data = json.loads((work / "suite.json").read_text())
    data["prompts"][2]["prompt"] = "Tell me one thing about the moon."
    (work / "suite.json").write_text(json.dumps(data))


def _edit_check_file(work):
    (work / "checks" / "items.json").write_text(json.dumps({"expected": 3}))  # the tiny model writes no list


def _edit_template(work):
    text = (work / "chat.jinja").read_text()
    assert "<|end_header_id|>\n\n" in text
    (work / "chat.jinja").write_text(text.replace("<|end_header_id|>\n\n", "<|end_header_id|>\n"))


def _edit_data(work):
    rows = (work / "data.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    row["conversations"][-1]["value"] = "Something else entirely, said differently."
    (work / "data.jsonl").write_text("\n".join([json.dumps(row)] + rows[1:]) + "\n")


def _edit_config(work):
    config = json.loads((work / "model" / "config.json").read_text())
    config["rms_norm_eps"] = 0.1  # what every layer computes
    (work / "model" / "config.json").write_text(json.dumps(config))


def _edit_tokenizer(work):
    config = json.loads((work / "model" / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|end_of_text|>"  # the template writes it first in every row
    (work / "model" / "tokenizer_config.json").write_text(json.dumps(config))


# (what is edited, the stages that must run again, the artifact that must change, the one that must not)
EDITS = [
    ("a later prompt of the suite", _edit_suite_prompt, ["evaluate"], "eval/adapter.jsonl", "gguf/inputs-f16.gguf"),
    ("a check file", _edit_check_file, ["evaluate"], "eval/summary.json", "adapter/adapter_model.safetensors"),
    ("the chat template file", _edit_template, EVERYTHING, "data/train.jsonl", None),
    ("the data file", _edit_data, EVERYTHING, "data/train.jsonl", None),
    ("the base model's config", _edit_config, EVERYTHING, "adapter/adapter_model.safetensors", None),
    ("the base model's tokenizer", _edit_tokenizer, EVERYTHING, "data/train.jsonl", None),
]


@pytest.mark.parametrize("what,edit,rerun,changes,stays", EDITS, ids=[e[0] for e in EDITS])
def test_an_edited_input_reruns_exactly_its_dependent_stages(inputs_run, what, edit, rerun, changes, stays):
    work, spec, run_dir = inputs_run
    before = {rel: digest(run_dir / rel) for rel in (changes, stays) if rel}
    edit(work)
    refused = run_cli("run", spec)
    assert refused.returncode == 2 and "--restart" in refused.stderr, (what, refused.stderr[-1000:])
    redone = run_cli("run", spec, "--restart")
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert started(redone) == rerun, what
    assert skipped(redone) == [s for s in EVERYTHING if s not in rerun], what
    assert digest(run_dir / changes) != before[changes], what
    if what == "a check file":  # the check now wants three items where the answer has none
        answers = [json.loads(line) for line in (run_dir / "eval" / "adapter.jsonl").read_text().splitlines()]
        listed = next(a for a in answers if a["id"] == "list")["checks"]["list_items"]
        assert listed["expected"] == 3 and not listed["passed"]
    if stays:
        assert digest(run_dir / stays) == before[stays], what
    again = run_cli("run", spec)
    assert again.returncode == 0 and not started(again), what  # the new inputs are now the run's own


def test_restart_after_a_change_to_export_gguf_redoes_gguf_and_what_uses_it(inputs_run):
    work, spec, run_dir = inputs_run
    adapter = digest(run_dir / "adapter" / "adapter_model.safetensors")
    redone = run_cli("run", spec, "--set", 'export.gguf=["f16", "q8_0"]', "--restart")
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert started(redone) == ["gguf", "evaluate"] and skipped(redone) == ["prepare", "train", "merge"]
    assert (run_dir / "gguf" / "inputs-q8_0.gguf").is_file() and (run_dir / "eval" / "gguf-q8_0.jsonl").is_file()
    assert digest(run_dir / "adapter" / "adapter_model.safetensors") == adapter
