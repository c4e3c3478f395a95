"""The run directory and the other writers of a shared volume: every path peftopt hands a library or reads back is
a regular file or directory of its own, checked without following links, at every level; nothing is written
outside it; push uploads only its own regular files (README, "Threat model": the volume)."""
import json

import pytest

from conftest import run_cli, write_tiny_spec
from security.canary import CANARY, started

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("entry", [".lock", "events.jsonl", "checkpoints", "state.json"])
def test_a_link_in_place_of_a_run_file_is_refused_and_nothing_outside_changes(entry, tmp_path, make_spec):
    spec = make_spec("victim", train={"max_steps": 2})
    run_dir = tmp_path / "runs" / "victim"
    run_dir.mkdir(parents=True)
    target = tmp_path / "precious"
    if entry == "checkpoints":
        target.mkdir()
        (target / "checkpoint-1").mkdir()
        (target / "checkpoint-1" / "keep.txt").write_text("keep")
    else:
        target.write_text("keep")
    (run_dir / "state.json").write_text(json.dumps({"stages": {}}))  # a run directory, as another job left it
    if entry == "state.json":
        (run_dir / "state.json").unlink()
    (run_dir / entry).symlink_to(target)
    result = run_cli("run", spec)
    assert result.returncode == 2 and "symbolic link" in result.stderr and entry in result.stderr
    assert not started(result)
    if entry == "checkpoints":
        assert (target / "checkpoint-1" / "keep.txt").read_text() == "keep"
    else:
        assert target.read_text() == "keep"


def test_a_linked_experiments_log_is_refused(tmp_path, make_spec):
    target = tmp_path / "someone-elses.csv"
    target.write_text("precious\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "experiments_log.csv").symlink_to(target)
    result = run_cli("run", make_spec("csv", train={"max_steps": 2}))
    assert result.returncode == 2 and "experiments_log.csv is a symbolic link" in result.stderr
    assert target.read_text() == "precious\n"


def test_a_directory_without_a_run_is_refused_and_only_peftopts_scratch_is_cleaned(tmp_path, make_spec):
    spec = make_spec("adopt", train={"max_steps": 2})
    foreign = tmp_path / "runs" / "adopt"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "draft.tmp-123").write_text("mine")
    result = run_cli("run", spec)
    assert result.returncode == 2 and "holds no peftopt run" in result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.tmp-123", "thesis.tex"]

    # in a real run directory, names that look like scratch but are not peftopt's are kept
    own = make_spec("own", train={"max_steps": 2})
    assert run_cli("run", own).returncode == 0
    run_dir = tmp_path / "runs" / "own"
    (run_dir / "notes.tmp-123").write_text("mine")
    (run_dir / "model.old-7").mkdir()
    (run_dir / ".state.json.tmp-999").write_text("half-written by a killed peftopt")
    assert run_cli("run", own).returncode == 0
    assert (run_dir / "notes.tmp-123").exists() and (run_dir / "model.old-7").exists()
    assert not (run_dir / ".state.json.tmp-999").exists()


def test_push_uploads_regular_files_inside_the_run_directory_only(tmp_path, tiny_model, tiny_data):
    from job.rundir import RunDir
    from job.specfile import load_spec
    from job.stages import push

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text(CANARY)
    spec_path = write_tiny_spec(tmp_path, tiny_model, tiny_data, "walk", push={"adapter_repo": "me/x"})
    run_dir = RunDir(tmp_path / "runs" / "walk")
    (run_dir.adapter_dir / "nested").mkdir(parents=True)
    (run_dir.adapter_dir / "adapter_model.safetensors").write_bytes(b"weights")
    (run_dir.adapter_dir / "planted.txt").symlink_to(outside / "secret.txt")
    (run_dir.adapter_dir / "nested" / "dir").symlink_to(outside)
    planned = {in_repo for _, path, in_repo in push.uploads(load_spec(spec_path), run_dir)}
    assert planned == {"adapter_model.safetensors", "README.md"}


def test_a_cut_short_experiments_log_line_does_not_swallow_the_next_row(tmp_path, make_spec):
    import csv

    (tmp_path / "runs").mkdir()
    log = tmp_path / "runs" / "experiments_log.csv"
    from job.metrics import EXPERIMENT_COLUMNS

    log.write_text(",".join(EXPERIMENT_COLUMNS) + "\nhalf-written-run,mod")  # a full disk cut the last write
    assert run_cli("run", make_spec("after", train={"max_steps": 2})).returncode == 0
    with open(log) as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["run_name"] == "after" and rows[-1]["r"] == "8" and len(rows) == 2


def test_a_restarted_runs_result_reaches_the_experiments_log(tmp_path, make_spec):
    import csv

    spec = make_spec("again", train={"max_steps": 2})
    assert run_cli("run", spec).returncode == 0
    assert run_cli("run", spec, "--set", "lora.r=4", "--restart").returncode == 0
    with open(tmp_path / "runs" / "experiments_log.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["run_name"] == "again"]
    assert [r["r"] for r in rows] == ["8", "4"]
