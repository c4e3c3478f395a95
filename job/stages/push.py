"""Push: the adapter (with tokenizer and a model card), the GGUF files with their Modelfile, and the merged
model when asked, to the Hugging Face Hub. Each uploaded file is recorded in `push-ledger.json` with its
sha256, so a rerun after a partial push uploads only what is missing. The token comes from the
environment variable the spec names and is never written anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from job import hub, settings as settings_module
from job.errors import SpecError
from job.log import add_secret, get_logger
from job.rundir import RunDir, atomic_write_bytes, atomic_write_json, file_sha256, read_json
from job.spec import JobSpec
from job.stages.base import CheckScope, RunContext, Stage, StageResult

log = get_logger("peftopt.push")


def check_token(spec: JobSpec) -> str:
    """Raises SpecError before any work when the token variable is unset or empty."""
    token = settings_module.get().secret(spec.push.token_env)
    if not token:
        raise SpecError(f"push.token_env: environment variable {spec.push.token_env} is not set; "
                        "export the Hugging Face token there (it is never read from the jobspec)")
    add_secret(token)
    return token


def check(spec: JobSpec, scope: CheckScope) -> list[str]:
    if not scope.machine:
        return []
    try:
        check_token(spec)
    except SpecError as exc:
        return [exc.message]
    return []


def _regular_files(folder: Path) -> list[Path]:
    """The regular files under `folder`, never through a link (a link is not published, nor what it points to)."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        found += [Path(root) / n for n in names if (Path(root) / n).is_file() and not (Path(root) / n).is_symlink()]
    return sorted(found)


def uploads(spec: JobSpec, run_dir: RunDir) -> list[tuple[str, Path, str]]:
    """(repo, local file, path in repo) for everything this spec publishes: regular files inside the run
    directory only."""
    plan = []

    def tree(repo: str | None, folder: Path):
        if repo and folder.is_dir() and not folder.is_symlink():
            # The folder's own README.md (peft writes a stub) is replaced by peftopt's card below.
            plan.extend((repo, p, str(p.relative_to(folder))) for p in _regular_files(folder)
                        if str(p.relative_to(folder)) != "README.md")

    tree(spec.push.adapter_repo, run_dir.adapter_dir)
    tree(spec.push.gguf_repo, run_dir.gguf_dir)
    tree(spec.push.merged_repo, run_dir.merged_dir)
    for repo in {spec.push.adapter_repo, spec.push.gguf_repo, spec.push.merged_repo} - {None}:
        plan.append((repo, run_dir.root / "cards" / f"{repo.replace('/', '__')}.md", "README.md"))
    return plan


def published_bytes(spec: JobSpec, path: Path) -> bytes | None:
    """What is uploaded in place of a file that names a local path: peft's adapter_config.json keeps the base
    model's local directory in `base_model_name_or_path`; the published one names the Hub id or the file name."""
    if path.name != "adapter_config.json":
        return None
    from job.card import public

    config = json.loads(path.read_text())
    if "base_model_name_or_path" in config:
        config["base_model_name_or_path"] = public(spec.model.base)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def run(ctx: RunContext) -> StageResult:
    from job import card

    spec, run_dir = ctx.spec, ctx.run_dir
    token = check_token(spec)
    for repo in {spec.push.adapter_repo, spec.push.gguf_repo, spec.push.merged_repo} - {None}:
        atomic_write_bytes(run_dir.root / "cards" / f"{repo.replace('/', '__')}.md",
                           card.render(spec, run_dir, repo).encode())
    plan = uploads(spec, run_dir)
    if ctx.dry_run:
        for repo, path, in_repo in plan:
            log.info("push_planned", repo=repo, path=in_repo, source=str(path), bytes=path.stat().st_size)
        log.info("push_dry_run", files=len(plan), note="nothing uploaded; the push stage stays pending")
        return StageResult(metrics={"dry_run_files": len(plan)}, keep_pending=True)
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
        payload = published_bytes(spec, path)
        key = f"{repo}/{in_repo}"
        digest = file_sha256(path) if payload is None else hashlib.sha256(payload).hexdigest()
        if ledger.get(key) == digest:
            skipped += 1
            continue
        source = str(path) if payload is None else payload
        hub.retrying(f"upload {key}", lambda: api.upload_file(path_or_fileobj=source, path_in_repo=in_repo,
                                                           repo_id=repo, commit_message=f"peftopt: {in_repo}"))
        ledger[key] = digest
        atomic_write_json(ledger_path, ledger)
        uploaded += 1
        log.info("file_uploaded", repo=repo, path=in_repo, bytes=path.stat().st_size)
    return StageResult(artifacts=("push-ledger.json",),
                       metrics={"uploaded": uploaded, "already_there": skipped,
                                "repos": sorted({repo for repo, _, _ in plan})})


def enabled(spec: JobSpec) -> bool:
    return bool(spec.push and (spec.push.adapter_repo or spec.push.gguf_repo or spec.push.merged_repo))


STAGE = Stage(
    name="push",
    doc="adapter + card, GGUF + Modelfile, merged model to the Hub, resuming a partial push",
    enabled=enabled, run=run, check=check, fields=("push",),
    needs=lambda spec: ("train", "merge", "gguf", "evaluate"),
    artifacts=("push-ledger.json", "cards"),
)
