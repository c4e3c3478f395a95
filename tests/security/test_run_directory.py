"""The run directory and the other writers of a shared volume: every path peftopt hands a library or reads back is
a regular file or directory of its own, checked without following links, at every level; nothing is written
outside it; push uploads only its own regular files (docs/security.md: the volume)."""
import json
import os
import time
from pathlib import Path

import pytest

from conftest import events, run_cli, write_tiny_spec
from security.canary import CANARY, ENV, assert_no_canary, started

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


def _outside_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.rglob("*")) == ["untouched.txt"], sorted(outside.rglob("*"))


def test_links_below_the_top_level_are_never_written_through(tmp_path, make_spec):
    """A library cache the train stage hands to datasets (one level down), checkpoints/ and eval/ entries: another
    writer plants links there to make the job write into a directory of its choice. The caches are made fresh per
    attempt and every read-back is checked: no byte lands outside the run directory."""
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "untouched.txt").write_text("keep")
    run = tmp_path / "runs" / "planted"
    (run / ".cache").mkdir(parents=True)
    (run / ".cache" / "datasets-rank0").symlink_to(outside)
    (run / ".cache" / "datasets-0-fixed").symlink_to(outside)
    (run / "state.json").write_text(json.dumps({"name": "planted", "stages": {}}))
    result = run_cli("run", make_spec("planted", train={"max_steps": 2, "save_steps": 1}), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    _outside_untouched(outside)
    assert_no_canary(result.stdout, result.stderr, dirs=[run])


def test_a_fifo_or_link_in_place_of_finished_work_redoes_the_stage(tmp_path, make_spec):
    """After prepare and train finished, another writer swaps data/train.jsonl for a FIFO (which hung the trainer,
    then exit 1 with a traceback) and adapter/tokenizer.json for a link to the job's environment: the next run sees
    that the stages' work is not what they wrote and does it again, within a bounded time, and nothing leaks."""
    spec = make_spec("swapped", train={"max_steps": 2}, export={"merge": True, "gguf": []})
    first = run_cli("run", spec, "--stages", "prepare,train")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "swapped"
    (run / "data" / "train.jsonl").unlink()
    os.mkfifo(run / "data" / "train.jsonl")
    (run / "adapter" / "tokenizer.json").unlink()
    (run / "adapter" / "tokenizer.json").symlink_to("/proc/self/environ")
    began = time.monotonic()
    result = run_cli("run", spec, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - began < 240
    redone = [e for e in events(result.stdout) if e["event"] == "artifact_missing"]
    assert {e["stage"] for e in redone} == {"prepare", "train"}
    assert any("train.jsonl (not a regular file" in m or "FIFO" in m for e in redone for m in e["missing"])
    assert not (run / "data" / "train.jsonl").is_fifo() and not (run / "adapter" / "tokenizer.json").is_symlink()
    assert_no_canary(result.stdout, result.stderr, dirs=[run])


def test_a_link_planted_where_a_stage_reads_back_its_own_file_is_refused(tmp_path, make_spec):
    """eval/summary.json is read and rewritten as each target is recorded: a link there to the job's environment
    would have been read into it. Refused with exit 2 naming it, nothing leaks."""
    spec = make_spec("summary-link", train={"max_steps": 2},
                     evaluate={"prompts": ["Say hi."], "targets": ["adapter"], "max_new_tokens": 2})
    first = run_cli("run", spec, "--stages", "prepare,train")
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "runs" / "summary-link"
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").symlink_to("/proc/self/environ")
    result = run_cli("run", spec, env=ENV)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "summary.json" in result.stderr.splitlines()[0] and "Traceback" not in result.stderr
    assert_no_canary(result.stdout, result.stderr, dirs=[run])


@pytest.mark.parametrize("state", ["[1, 2]", '{"stages": []}', '{"stages": {"merge": "done"}}', "\x00\xff garbage",
                                   "link", "fifo"])
def test_a_malformed_state_of_an_earlier_run_is_a_clear_refusal(state, tmp_path, make_spec):
    """`model.base: run:NAME` reads that run's state.json, which another writer may have replaced: exit 2 naming it,
    never a crash in preflight."""
    earlier = tmp_path / "runs" / "sft"
    (earlier / "merged").mkdir(parents=True)
    (earlier / "merged" / "config.json").write_text("{}")
    path = earlier / "state.json"
    if state == "link":
        path.symlink_to("/proc/self/environ")
    elif state == "fifo":
        os.mkfifo(path)
    else:
        path.write_text(state)
    result = run_cli("run", make_spec(f"after-{abs(hash(state))}", model={"base": "run:sft"}), env=ENV, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.base: 'run:sft'" in result.stderr.splitlines()[0] and "Traceback" not in result.stderr
    assert_no_canary(result.stdout, result.stderr)


def test_a_gguf_name_in_metrics_that_climbs_out_is_refused_by_evaluate_and_chat(tmp_path, make_spec):
    """metrics.json is on the volume: the GGUF files evaluate and chat hand to llama.cpp are plain names of
    regular files in gguf/, never a path another writer put there (one run, each hostile name in turn)."""
    spec = make_spec("climb", train={"max_steps": 1}, export={"merge": True, "gguf": ["f16"],
                                                              "tokenizer_pre": "llama-bpe", "verify_tokens": 2},
                     evaluate={"prompts": ["Hi"], "max_new_tokens": 2, "targets": ["gguf"]})
    assert run_cli("run", spec, "--stages", "prepare,train,merge,gguf").returncode == 0
    run_dir = tmp_path / "runs" / "climb"
    outside = tmp_path / "outside.gguf"
    outside.write_bytes((run_dir / "gguf" / "climb-f16.gguf").read_bytes())
    honest = (run_dir / "metrics.json").read_text()
    for name in ("../../outside.gguf", "/etc/passwd", "sub/dir.gguf", ".hidden.gguf"):
        metrics = json.loads(honest)
        metrics["gguf"]["files"]["f16"]["file"] = name
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        for argv in (("run", spec, "--stages", "evaluate"), ("chat", run_dir, "--target", "gguf", "--prompt", "Hi")):
            refused = run_cli(*argv)
            assert refused.returncode == 2, (name, argv, refused.stderr[-1500:])
            assert "not a GGUF file of" in refused.stderr and "Traceback" not in refused.stderr
