"""One Hub call as peftopt makes it, for the fault matrix (tests/integration/test_fault_matrix.py): run in a fresh process
against the Hub stand-in (HF_ENDPOINT), ending as the CLI ends (exit code of the PeftoptError, one `error:`
line on stderr).

    python tests/hub_cell.py create|upload|list|commit|restore|model RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job import checkpoint_sync, hub  # noqa: E402
from job.checkpoints import write_marker  # noqa: E402
from job.errors import PeftoptError  # noqa: E402
from job.log import configure  # noqa: E402
from job.rundir import RunDir  # noqa: E402
from job.spec import JobSpec  # noqa: E402

REPO = "me/faults"
SPEC = JobSpec.model_validate({
    "name": "cell", "model": {"base": "/nonexistent"}, "data": {"source": "/nonexistent.jsonl"}, "lora": {"r": 4},
    "train": {"max_steps": 4, "checkpoint_sync": {"repo": REPO, "token_env": "PEFTOPT_TEST_TOKEN"}}})
FINGERPRINT = "0123456789abcdef"  # the training's, as the train stage's fingerprint marks its checkpoints
FOLDER = checkpoint_sync.folder(SPEC, FINGERPRINT)  # where this training's checkpoints go in the repo


def checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"checkpoint-{step}"
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A.weight": torch.zeros(32, 32)}, str(path / "adapter_model.safetensors"))  # loads, as a resume needs
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    write_marker(path, step, FINGERPRINT)
    return path


def main(op: str, run_dir: Path) -> dict:
    api = hub.api(checkpoint_sync.token(SPEC))
    if op == "create":
        hub.retrying(f"create {REPO}", lambda: api.create_repo(REPO, private=True, exist_ok=True))
    elif op == "upload":
        hub.retrying(f"upload {REPO}/README.md", lambda: api.upload_file(
            path_or_fileobj=b"card", path_in_repo="README.md", repo_id=REPO, commit_message="peftopt: card"))
    elif op == "list":
        return {"steps": sorted(checkpoint_sync._remote_steps(api, SPEC, checkpoint_sync.folder(SPEC, FINGERPRINT)))}
    elif op == "commit":  # a checkpoint's upload: never fails the job, logs instead
        uploader = checkpoint_sync.Uploader(SPEC, FINGERPRINT)
        uploader.submit(checkpoint(run_dir, 4), [4])
        return uploader.finish()
    elif op == "restore":
        restored = checkpoint_sync.restore(SPEC, RunDir(run_dir), FINGERPRINT)
        return {"restored": str(restored) if restored else None}
    elif op == "model":
        return {"snapshot": hub.model_snapshot("me/tiny")}
    return {}


if __name__ == "__main__":
    configure(json_output=True)
    try:
        print(json.dumps({"result": main(sys.argv[1], Path(sys.argv[2]))}))
    except PeftoptError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
