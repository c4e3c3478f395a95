"""Integration: publishing through the real huggingface_hub client against a local Hub stand-in."""
import json
from pathlib import Path

import pytest

import conftest

from hub_standin import HubStandIn

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_CanaryToken0123456789abcdefXYZ"
PUSH = {"adapter_repo": "me/tiny-lora", "gguf_repo": "me/tiny-gguf", "merged_repo": "me/tiny-merged",
        "token_env": "PEFTOPT_TEST_TOKEN"}


def run_cli(spec, *args, hub=None, token=TOKEN):
    env = {"PEFTOPT_TEST_TOKEN": token, "HF_TOKEN": "",
           "PEFTOPT_HUB_BACKOFF_S": "0.01", "PEFTOPT_HUB_RETRIES": "4", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    if hub:
        env["HF_ENDPOINT"] = hub.url
    return conftest.run_cli("run", spec, *args, env=env, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_data):
    """A finished tiny run (adapter, merged, q8_0 GGUF) whose spec can gain a push section."""
    out = tmp_path_factory.mktemp("push")
    spec = {"name": "pushme", "output_dir": str(out / "runs"),
            "model": {"base": str(tiny_model), "max_seq_length": 128, "chat_template": "llama-3"},
            "data": {"source": str(tiny_data)}, "lora": {"r": 4, "alpha": 8},
            "train": {"backend": "hf", "max_steps": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                      "optim": "adamw_torch", "save_steps": 2},
            "export": {"merge": True, "gguf": ["q8_0"], "tokenizer_pre": "llama-bpe", "verify_tokens": 4}}
    path = out / "spec.json"
    path.write_text(json.dumps(spec))
    result = run_cli(path)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, spec


def with_push(out: Path, spec: dict, name: str) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps({**spec, "push": PUSH}))
    return path


def expected_files(run_dir: Path) -> dict[str, set[str]]:
    def tree(folder):
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} | {"README.md"}

    return {"me/tiny-lora": tree(run_dir / "adapter"), "me/tiny-gguf": tree(run_dir / "gguf"),
            "me/tiny-merged": tree(run_dir / "merged")}


def test_push_uploads_everything_and_never_leaks_the_token(trained):
    out, spec = trained
    path = with_push(out, spec, "push-ok")
    run_dir = out / "runs" / "pushme"
    dry = run_cli(path, "--dry-run")
    planned = [json.loads(line) for line in dry.stdout.splitlines() if '"push_planned"' in line]
    assert dry.returncode == 0 and {(p["repo"], p["path"]) for p in planned} >= {("me/tiny-gguf", "pushme-q8_0.gguf")}
    assert all(json.loads(line) for line in dry.stdout.splitlines())  # stdout is JSON only
    with HubStandIn(TOKEN) as hub:
        hub.fail_next = ["500", "drop", "502"]  # transient faults are retried with backoff
        result = run_cli(path, hub=hub)
        assert result.returncode == 0, result.stderr[-2000:]
    assert {repo: set(files) for repo, files in hub.files.items()} == expected_files(run_dir)
    assert all(meta["private"] for meta in hub.repos.values())
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == \
        hub.files["me/tiny-lora"]["adapter_model.safetensors"]
    card = hub.files["me/tiny-lora"]["README.md"].decode()
    for needle in ("Base model:", "LoRA: r=4", "transformers + peft", "llama.cpp", "Ollama"):
        assert needle in card
    retries = [json.loads(line) for line in result.stdout.splitlines() if '"hub_retry"' in line]
    assert len(retries) >= 3
    assert any(f"Bearer {TOKEN}" in headers for headers in hub.seen_headers)
    # the canary token appears in no file of the run, no log line, no card
    assert TOKEN not in result.stdout + result.stderr + dry.stdout + dry.stderr
    for file in (out / "runs").rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


def test_interrupted_push_resumes_without_duplicating(trained):
    out, spec = trained
    path = with_push(out, spec, "push-resume")
    run_dir = out / "runs" / "pushme"
    (run_dir / "push-ledger.json").unlink(missing_ok=True)
    with HubStandIn(TOKEN) as hub:
        hub.fail_after_commits = 3  # the Hub goes down mid-push
        failed = run_cli(path, hub=hub)
        assert failed.returncode == 4, failed.stderr[-2000:]
        assert "HTTP 503" in failed.stderr and "after 4 tries" in failed.stderr and "Traceback" not in failed.stderr
        state = json.loads((run_dir / "state.json").read_text())
        assert state["stages"]["push"]["status"] == "failed"
        hub.fail_after_commits = None
        before = hub.commits
        resumed = run_cli(path, hub=hub)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    total = sum(len(v) for v in expected_files(run_dir).values())
    assert before == 3 and hub.commits == total, hub.committed  # each file committed once across both runs
    assert {repo: set(files) for repo, files in hub.files.items()} == expected_files(run_dir)


def test_rejected_token_is_exit_4_with_a_clear_message(trained):
    out, spec = trained
    path = with_push(out, spec, "push-bad-token")
    (out / "runs" / "pushme" / "push-ledger.json").unlink(missing_ok=True)
    with HubStandIn("hf_TheRealTokenIsDifferent000000") as hub:
        result = run_cli(path, hub=hub)
    assert result.returncode == 4
    assert "rejected the token" in result.stderr and TOKEN not in result.stderr + result.stdout
