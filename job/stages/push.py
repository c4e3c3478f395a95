"""Push: the adapter (with tokenizer and a model card), the GGUF files with their Modelfile, and the merged
model when asked, to the Hugging Face Hub. Each uploaded file is recorded in `push-ledger.json` with its
sha256, so a rerun after a partial push uploads only what is missing. The token comes from the
environment variable the spec names and is never written anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

from job import hub
from job.errors import SpecError
from job.log import add_secret, get_logger
from job.rundir import RunDir, atomic_write_bytes, atomic_write_json, file_sha256, read_json
from job.spec import JobSpec

log = get_logger("peftopt.push")


def check_token(spec: JobSpec) -> str:
    """Raises SpecError before any work when the token variable is unset or empty."""
    token = os.environ.get(spec.push.token_env, "")
    if not token.strip():
        raise SpecError(f"push.token_env: environment variable {spec.push.token_env} is not set; "
                        "export the Hugging Face token there (it is never read from the jobspec)")
    add_secret(token)
    return token


def uploads(spec: JobSpec, run_dir: RunDir) -> list[tuple[str, Path, str]]:
    """(repo, local file, path in repo) for everything this spec publishes."""
    plan = []

    def tree(repo: str | None, folder: Path):
        if repo and folder.is_dir():
            # The folder's own README.md (peft writes a stub) is replaced by peftopt's card below.
            plan.extend((repo, p, str(p.relative_to(folder))) for p in sorted(folder.rglob("*"))
                        if p.is_file() and str(p.relative_to(folder)) != "README.md")

    tree(spec.push.adapter_repo, run_dir.adapter_dir)
    tree(spec.push.gguf_repo, run_dir.gguf_dir)
    tree(spec.push.merged_repo, run_dir.merged_dir)
    for repo in {spec.push.adapter_repo, spec.push.gguf_repo, spec.push.merged_repo} - {None}:
        plan.append((repo, run_dir.root / "cards" / f"{repo.replace('/', '__')}.md", "README.md"))
    return plan


def run(spec: JobSpec, run_dir: RunDir, ctx) -> dict:
    from job import card

    token = check_token(spec)
    for repo in {spec.push.adapter_repo, spec.push.gguf_repo, spec.push.merged_repo} - {None}:
        atomic_write_bytes(run_dir.root / "cards" / f"{repo.replace('/', '__')}.md",
                           card.render(spec, run_dir, repo).encode())
    plan = uploads(spec, run_dir)
    if ctx.dry_run:
        for repo, path, in_repo in plan:
            log.info("push_planned", repo=repo, path=in_repo, source=str(path), bytes=path.stat().st_size)
        log.info("push_dry_run", files=len(plan), note="nothing uploaded; the push stage stays pending")
        return {"artifacts": [], "metrics": {"dry_run_files": len(plan)}, "keep_pending": True}
    api = hub.api(token)
    ledger_path = run_dir.root / "push-ledger.json"
    ledger = read_json(ledger_path) or {}
    for repo in sorted({repo for repo, _, _ in plan}):
        if not ledger.get(f"repo:{repo}"):
            hub.retrying(f"create {repo}", lambda: api.create_repo(repo, private=spec.push.private, exist_ok=True))
            ledger[f"repo:{repo}"] = True
            atomic_write_json(ledger_path, ledger)
            log.info("repo_ready", repo=repo, private=spec.push.private)
    uploaded = skipped = 0
    for repo, path, in_repo in plan:
        key, digest = f"{repo}/{in_repo}", file_sha256(path)
        if ledger.get(key) == digest:
            skipped += 1
            continue
        hub.retrying(f"upload {key}", lambda: api.upload_file(path_or_fileobj=str(path), path_in_repo=in_repo,
                                                           repo_id=repo, commit_message=f"peftopt: {in_repo}"))
        ledger[key] = digest
        atomic_write_json(ledger_path, ledger)
        uploaded += 1
        log.info("file_uploaded", repo=repo, path=in_repo, bytes=path.stat().st_size)
    return {"artifacts": ["push-ledger.json"],
            "metrics": {"uploaded": uploaded, "already_there": skipped,
                        "repos": sorted({repo for repo, _, _ in plan})}}
