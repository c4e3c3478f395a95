"""Data sets (local files and Hub data sets, and every row in them): read only from where the spec says, as
regular files of bounded size, each row bounded in size and depth; a bad row is exit 3 naming it, or skipped and
counted (docs/security.md: data sets)."""
import json
import os
import time

import pytest

from conftest import events, run_cli, write_tiny_spec
from hub_standin import HubStandIn
from security.canary import CANARY, ENV, assert_no_canary

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


HOSTILE_CARD = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {path}\n---\n# rows\n"
HONEST_ROW = {"conversations": [{"from": "human", "value": "Tell me about rain."}, {"from": "gpt", "value": "It is wet."}]}


@pytest.mark.parametrize("target", ["absolute", "url", "other-repo", "dotdot"])
def test_a_hub_data_set_card_cannot_make_the_job_read_anything_but_the_repos_own_files(target, tmp_path, tiny_model):
    """A data set repo's card names its data files (`configs[].data_files`), which datasets takes as they are: a
    mounted secret, a metadata endpoint's URL, another (private) repo read with the job's token. Served by the Hub
    stand-in through the real datasets client: each is refused (exit 3 naming the pattern) before a byte of it is
    read, and no row of it reaches anything written."""
    secret_rows = tmp_path / "mounted-secret.jsonl"
    secret_row = {"conversations": [{"from": "human", "value": f"the key is {CANARY}"}, {"from": "gpt", "value": "ok"}]}
    secret_rows.write_text(json.dumps(secret_row) + "\n")
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.jsonl").write_text(json.dumps(secret_row) + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(json.dumps(HONEST_ROW) + "\n")
    with HubStandIn(CANARY) as hub:
        path = {"absolute": str(secret_rows), "url": f"{hub.url}/datasets/victim/private/resolve/main/secret.jsonl?.jsonl",
                "other-repo": "hf://datasets/victim/private@main/secret.jsonl", "dotdot": "../../victim/private/secret.jsonl"}[target]
        (repo / "README.md").write_text(HOSTILE_CARD.format(path=json.dumps(path)))
        hub.add_dataset("someone/rows", repo)
        hub.add_dataset("victim/private", private, private=True)
        spec = write_tiny_spec(tmp_path, tiny_model, tmp_path / "unused.jsonl", "card", data={"source": "someone/rows"},
                               train={"max_steps": 2})
        result = run_cli("run", spec, env={**ENV, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
                                           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
        requests = list(hub.requests)
    assert result.returncode == 3, result.stderr[-2000:]
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: data.source: data set someone/rows's card names data file") and "not a file of the repo" in first
    assert "Traceback" not in result.stderr
    assert not any("victim/private" in r and "secret.jsonl" in r and "/resolve/" in r for r in requests), requests
    assert_no_canary(result.stdout, result.stderr, dirs=[tmp_path / "runs", tmp_path / "hf-home"])


def test_a_hub_data_set_reads_the_files_its_card_names_in_the_repo(tmp_path, tiny_model):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "part-0.jsonl").write_text(json.dumps(HONEST_ROW) + "\n")
    (repo / "data" / "part-1.jsonl").write_text(json.dumps(HONEST_ROW) + "\n")
    (repo / "ignored.jsonl").write_text(json.dumps(HONEST_ROW) + "\n")
    (repo / "README.md").write_text(HOSTILE_CARD.format(path='"data/part-*.jsonl"'))
    with HubStandIn(CANARY) as hub:
        hub.add_dataset("someone/parts", repo)
        spec = write_tiny_spec(tmp_path, tiny_model, tmp_path / "unused.jsonl", "parts", data={"source": "someone/parts"},
                               train={"max_steps": 1})
        result = run_cli("run", spec, "--stages", "prepare", env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                                                                  "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    [prepared] = [e for e in events(result.stdout) if e["event"] == "data_prepared"]
    assert prepared["rows_read"] == 2


def test_line_separators_in_rows_break_no_reader_on_any_retry(tmp_path, make_spec):
    """U+2028, U+2029 and U+0085 are text to JSON but line breaks to str.splitlines: rows holding them went into
    data/*.jsonl as they were and broke the readers after training (evaluate's held-out loss, on every retry)."""
    rows = tmp_path / "separators.jsonl"
    odd = ["line\u2028separator", "para\u2029graph", "next\x85line", "form\x0cfeed", "group\x1dsep"]
    rows.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {text} {i}."},
                                                          {"from": "gpt", "value": f"{text} {i}."}]}) + "\n"
                            for i, text in enumerate(odd * 8)))
    spec = make_spec("separators", data={"source": str(rows), "eval_split": 0.25}, train={"max_steps": 2},
                     evaluate={"prompts": ["Say line\u2028separator."], "targets": ["adapter"],
                               "max_new_tokens": 4})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "separators" / "metrics.json").read_text())
    assert metrics["evaluate"]["heldout"]["adapter"]["loss"] is not None
    for part in ("train", "eval"):
        text = (tmp_path / "runs" / "separators" / "data" / f"{part}.jsonl").read_text()
        assert "\u2028" not in text and "\x85" not in text
        assert all(json.loads(line) for line in text.splitlines())  # any reader's idea of a line is a record


def _nested(levels: int) -> str:
    """A JSON schema nested `levels` objects deep, as text (json.dumps itself recurses)."""
    return '{"type": "object", "properties": {"x": ' * (levels // 2) + '{"type": "string"}' + "}}" * (levels // 2)


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("as_text", [False, True])
def test_a_row_nested_deep_enough_to_parse_but_not_to_render_is_a_bad_row(policy, as_text, tmp_path, make_spec):
    """Tool schemas 900 levels deep parse (JSON's own limit is higher) and then broke prepare with a RecursionError
    (exit 1) even under bad_rows 'skip'; as a JSON string inside the row, too."""
    tools = '[{"type": "function", "function": {"name": "deep", "description": "d", "parameters": ' + _nested(900) + "}}]"
    good = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}
    deep = json.dumps(good)[:-1] + ', "tools": ' + (json.dumps(tools) if as_text else tools) + "}"
    rows = tmp_path / "deep.jsonl"
    rows.write_text("".join(line + "\n" for line in [json.dumps(good)] * 6 + [deep] + [json.dumps(good)] * 6))
    result = run_cli("run", make_spec(f"deep-{policy}-{as_text}", data={"source": str(rows), "bad_rows": policy},
                                      train={"max_steps": 1}), "--stages", "prepare")
    assert "Traceback" not in result.stderr
    if policy == "error":
        assert result.returncode == 3 and "row 6: nested more than 64 levels deep" in result.stderr.splitlines()[0]
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        name = f"deep-{policy}-{as_text}"
        source = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["prepare"]["sources"][0]
        assert source["skipped"] == {"nested more than 64 levels deep": 1}, source


def test_a_huge_field_name_makes_a_short_error_line(tmp_path, make_spec):
    rows = tmp_path / "wide.jsonl"
    rows.write_text(json.dumps({"x" * 20_000_000: "value"}) + "\n")
    result = run_cli("run", make_spec("wide", data={"source": str(rows)}), "--stages", "prepare")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert len(result.stderr) < 5000, len(result.stderr)


HOSTILE_CHECKS = {
    "a pattern that backtracks without end": {"type": "regex", "value": "(a|aa)+$"},
    "a schema pattern that backtracks without end": {"type": "is-json", "value": {
        "type": "object", "properties": {"k": {"type": "string", "pattern": "(a|aa)+$"}}}},
    "a schema property pattern that backtracks without end": {"type": "is-json", "value": {
        "type": "object", "patternProperties": {"(a|aa)+$": {"type": "integer"}}}},
}


@pytest.mark.parametrize("attack", list(HOSTILE_CHECKS))
def test_a_tasks_own_check_cannot_hold_the_training_process(attack):
    """A task's checks come from the data (a Hub data set anyone could have written) and GRPO scores every sampled
    answer with them in the training process: a pattern that backtracks without end fails its check after its time
    limit (checks.PATTERN_TIMEOUT_S) and scoring goes on. Run in a child process, so that a hold would end the
    test at its timeout instead of the suite."""
    program = (
        "import json, sys\n"
        "from job.evaluation import rewards\n"
        "check = json.loads(sys.argv[1])\n"
        "answer = '{\"k\": \"' + 'a' * 60 + '!\"}' if check['type'] == 'is-json' else 'a' * 60 + '!'\n"
        "if 'patternProperties' in json.dumps(check):\n"
        "    answer = json.dumps({'a' * 60 + '!': 1})\n"
        "own, = rewards.functions([], rewards.Timing())\n"
        "print(json.dumps(own(prompts=[[]], completions=[answer], checks=[json.dumps([check])], reference=[None])))\n")
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", program, json.dumps(HOSTILE_CHECKS[attack])], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [0.0]


@pytest.mark.parametrize("data_dir", ["../../victim/private", "/etc", "hf://datasets/victim/private"])
def test_a_hub_data_set_cards_data_dir_cannot_lead_out_of_the_repo(data_dir, tmp_path, tiny_model):
    """A config's data_dir, with no data_files, is read by datasets as given: refused (exit 3) before anything is
    read, as a data file pattern out of the repo is."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.jsonl").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": f"the key is {CANARY}"}, {"from": "gpt", "value": "ok"}]}) + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text(json.dumps(HONEST_ROW) + "\n")
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_dir: {json.dumps(data_dir)}\n---\n")
    with HubStandIn(CANARY) as hub:
        hub.add_dataset("someone/rows", repo)
        hub.add_dataset("victim/private", private, private=True)
        spec = write_tiny_spec(tmp_path, tiny_model, tmp_path / "unused.jsonl", "dir", data={"source": "someone/rows"},
                               train={"max_steps": 1})
        result = run_cli("run", spec, "--stages", "prepare", env={
            **ENV, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0"})
        requests = list(hub.requests)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[0].startswith(
        f"error: data.source: data set someone/rows's card names data_dir {data_dir!r}, which is not a folder")
    assert not any("victim/private" in r for r in requests), requests
    assert_no_canary(result.stdout, result.stderr, dirs=[tmp_path / "runs", tmp_path / "hf-home"])
