"""Checkpoints that outlive the machine (`train.checkpoint_sync`).

Each complete checkpoint is committed to a private Hub repo under `<folder>/checkpoint-N/` as soon as it is
saved, in the background, so training does not wait for the network. The folder is `path_in_repo`, else
`<run name>/<training fingerprint>`, so two experiments that share a name (a `--set` override keeps it)
never meet. The commit also deletes the remote checkpoints the Trainer has rotated away locally: the remote
folder mirrors the local checkpoints directory. A remote step whose marker names another training is never
written over or deleted (a shared `path_in_repo`). A run whose directory has no complete checkpoint (a retry on
a fresh machine) restores the newest remote one whose marker names the same training fingerprint and that
loads, then resumes from it; one that does not load is refused and removed.

A failed upload is logged and training goes on: the local checkpoint is still there, and the next
checkpoint's commit tries again.
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

from job import hub, interrupt, settings as settings_module
from job.checkpoints import MARKER, checkpoint_is_complete, load_problem
from job.errors import ExternalError, RunConflict, SpecError
from job.log import add_secret, get_logger
from job.rundir import RunDir, read_json
from job.spec import JobSpec

log = get_logger("peftopt.checkpoint_sync")
STEP = re.compile(r"checkpoint-(\d+)$")


def token(spec: JobSpec) -> str:
    """Raises SpecError when the token variable is unset (checked in preflight, before any work)."""
    sync = spec.train.checkpoint_sync
    value = settings_module.get().secret(sync.token_env)
    if not value:
        raise SpecError(f"train.checkpoint_sync.token_env: environment variable {sync.token_env} is not set; "
                        "export the Hugging Face token there (it is never read from the jobspec)")
    add_secret(value)
    return value


def folder(spec: JobSpec, fingerprint: str) -> str:
    return spec.train.checkpoint_sync.path_in_repo or f"{spec.name}/{fingerprint}"


def _api(spec: JobSpec):
    return hub.api(token(spec))


def _remote_steps(api, spec: JobSpec, where: str) -> dict[int, list[str]]:
    """{step: [files]} for every checkpoint folder in the repo (complete or not)."""
    from huggingface_hub.errors import HfHubHTTPError

    def listing() -> list[str]:
        try:
            return api.list_repo_files(spec.train.checkpoint_sync.repo)
        except HfHubHTTPError as exc:
            if getattr(exc.response, "status_code", None) == 404:  # no repo yet: nothing synced
                return []
            raise

    prefix = where + "/"
    files = hub.retrying("list checkpoints", listing)
    steps: dict[int, list[str]] = {}
    for name in files:
        if not name.startswith(prefix):
            continue
        match = STEP.match(name[len(prefix):].split("/")[0])
        if match:
            steps.setdefault(int(match.group(1)), []).append(name)
    return steps


class Uploader:
    """Commits checkpoints one at a time on a background thread (rank 0 only)."""

    def __init__(self, spec: JobSpec, fingerprint: str):
        self.spec = spec
        self.fingerprint = fingerprint
        self.folder = folder(spec, fingerprint)
        self.repo = spec.train.checkpoint_sync.repo
        self.api = _api(spec)
        self.thread: threading.Thread | None = None
        self.pushed: list[int] = []
        self.failures = 0
        self.repo_ready = False
        self.owner: dict[int, bool] = {}  # remote step -> whether its marker names this training

    def _ours(self, step: int, names: list[str]) -> bool:
        """Whether the remote step belongs to this training (its marker says so); asked once per step."""
        if step not in self.owner:
            marker = f"{self.folder}/checkpoint-{step}/{MARKER}"
            found = None
            if marker in names:
                try:
                    path = hub.retrying(f"read {marker}", lambda: self.api.hf_hub_download(self.repo, marker))
                    found = (read_json(Path(path)) or {}).get("train_fingerprint")
                except (ExternalError, OSError, ValueError):
                    found = None
            self.owner[step] = found == self.fingerprint
        return self.owner[step]

    def submit(self, checkpoint: Path, local_steps: list[int]) -> None:
        self.wait()  # one commit at a time, in step order
        self.thread = threading.Thread(target=self._commit, args=(checkpoint, sorted(local_steps)),
                                       name="checkpoint-sync", daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the upload in flight; False if it is still running after `timeout` seconds."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                return False
            self.thread = None
        return True

    def _commit(self, checkpoint: Path, local_steps: list[int]) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        step = int(STEP.search(checkpoint.name).group(1))
        started = time.perf_counter()
        try:
            if not self.repo_ready:
                hub.retrying(f"create {self.repo}", lambda: self.api.create_repo(self.repo, private=True, exist_ok=True))
                self.repo_ready = True
            base = f"{self.folder}/{checkpoint.name}"
            files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and not p.is_symlink())
            remote = _remote_steps(self.api, self.spec, self.folder)
            if step in remote and not self._ours(step, remote[step]):
                log.warning("checkpoint_sync_foreign", step=step, action="not uploaded: the remote step belongs to "
                            "another training (set train.checkpoint_sync.path_in_repo apart)")
                return
            operations = [CommitOperationAdd(path_in_repo=f"{base}/{p.relative_to(checkpoint)}", path_or_fileobj=str(p))
                          for p in files]
            stale = sorted(s for s in remote if s not in local_steps and s != step and self._ours(s, remote[s]))
            operations += [CommitOperationDelete(path_in_repo=f"{self.folder}/checkpoint-{s}/", is_folder=True)
                           for s in stale]
            hub.retrying(f"sync checkpoint-{step}", lambda: self.api.create_commit(
                self.repo, operations=operations, commit_message=f"peftopt: {base}"))
        except Exception as exc:  # the sync must never take the training down
            self.failures += 1
            error = exc.message if isinstance(exc, ExternalError) else f"{type(exc).__name__}: {exc}"
            log.warning("checkpoint_sync_failed", step=step, error=error,
                        action="training goes on; the next checkpoint tries again")
            return
        self.pushed.append(step)
        self.owner[step] = True
        log.info("checkpoint_synced", step=step, repo=self.repo, files=len(files), removed_steps=stale,
                 bytes=sum(p.stat().st_size for p in files), seconds=round(time.perf_counter() - started, 2))

    def finish(self) -> dict:
        """Waits for the last upload: fully after a normal end, within the grace period after a signal."""
        budget = max(interrupt.grace_left() - 2, 0) if interrupt.stop_requested() else None
        if not self.wait(budget):
            log.warning("checkpoint_sync_unfinished", action="the grace period ends before the upload; the "
                        "local checkpoint is complete and the next run pushes it")
        return {"repo": self.repo, "synced_steps": list(self.pushed), "failures": self.failures}


def restore(spec: JobSpec, run_dir: RunDir, fingerprint: str, restart: bool = False,
            expected=None) -> Path | None:
    """Downloads the newest complete remote checkpoint of this training that loads into the checkpoints
    directory.

    Raises:
        RunConflict: the newest remote checkpoint belongs to a different training spec (without restart).
    """
    api, repo = _api(spec), spec.train.checkpoint_sync.repo
    where = folder(spec, fingerprint)
    steps = _remote_steps(api, spec, where)

    def fetch(name: str, into: Path) -> Path:
        return Path(hub.retrying(f"download {name}", lambda: api.hf_hub_download(repo, name, local_dir=into)))

    for step in sorted(steps, reverse=True):
        names = steps[step]
        marker_name = f"{where}/checkpoint-{step}/{MARKER}"
        if any(".." in Path(name).parts for name in names):
            log.warning("checkpoint_refused", step=step, why="a remote file name leaves its folder", action="skipped")
            continue
        if marker_name not in names:
            log.warning("checkpoint_sync_incomplete", step=step, action="skipped")
            continue
        scratch = run_dir.checkpoints_dir / f".restore-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            found = (read_json(fetch(marker_name, scratch)) or {}).get("train_fingerprint")
            if found != fingerprint:
                if not restart:
                    raise RunConflict(
                        f"train.checkpoint_sync: {repo}/{where} holds checkpoints of a different training "
                        f"spec (fingerprint {found}, this spec {fingerprint}); pass --restart to train from scratch "
                        "and replace them, or set train.checkpoint_sync.path_in_repo")
                log.warning("checkpoint_sync_foreign", step=step, action="ignored (--restart)")
                return None
            started = time.perf_counter()
            for name in names:
                if name != marker_name:
                    fetch(name, scratch)
            downloaded = scratch / where / f"checkpoint-{step}"
            if not checkpoint_is_complete(downloaded):
                log.warning("checkpoint_sync_incomplete", step=step, action="sizes differ from the marker; skipped")
                continue
            problem = load_problem(downloaded, expected)
            if problem:
                log.warning("checkpoint_refused", step=step, why=problem, action="not restored; trying an older one")
                continue
            target = run_dir.checkpoints_dir / f"checkpoint-{step}"
            shutil.rmtree(target, ignore_errors=True)
            os.replace(downloaded, target)
            log.info("checkpoint_restored", step=step, repo=repo, files=len(names),
                     seconds=round(time.perf_counter() - started, 2))
            return target
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return None
