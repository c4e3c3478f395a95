"""The fast tier's one end-to-end run (`make test-fast`): the tiny real model through every stage but push, in
one CLI process: prepare, train, merge, a verified f16 and q8_0 GGUF, and evaluation of every target."""
import json

import pytest

from conftest import documented_events, events, run_cli, write_tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.smoke]


def test_the_whole_job_on_a_tiny_model(tmp_path, tiny_model, tiny_data):
    spec = write_tiny_spec(tmp_path, tiny_model, tiny_data, "smoke", train={"max_steps": 4, "save_steps": 2},
                           evaluate={"prompts": ["Tell me one thing about coffee.", "Say hello."], "max_new_tokens": 8,
                                     "targets": ["base", "adapter", "merged", "gguf"]},
                           export={"merge": True, "gguf": ["f16", "q8_0"], "tokenizer_pre": "llama-bpe",
                                   "verify_prompts": 2, "verify_tokens": 8})
    result = run_cli("run", spec)
    assert result.returncode == 0, result.stderr[-3000:]
    log = events(result.stdout)
    assert [e["stage"] for e in log if e["event"] == "stage_started"] == ["prepare", "train", "merge", "gguf", "evaluate"]
    assert {e["event"] for e in log} <= documented_events()
    run_dir = tmp_path / "runs" / "smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 4 and metrics["train"]["tokens_per_s"] > 0
    f16 = metrics["gguf"]["files"]["f16"]["verify"]
    assert f16["tokenizer_match"] and f16["agreement"] == 1.0
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())["targets"]
    assert set(summary) == {"base", "adapter", "merged", "gguf-f16", "gguf-q8_0"}
    for target in ("merged", "gguf-f16", "gguf-q8_0"):  # how far each follows the adapter it comes from
        assert 0 <= summary[target]["vs_adapter"]["identical"] <= 1
        assert len(summary[target]["vs_adapter"]["parts_after_tokens"]) == 2
    again = run_cli("run", spec)
    assert again.returncode == 0 and not [e for e in events(again.stdout) if e["event"] == "stage_started"]
