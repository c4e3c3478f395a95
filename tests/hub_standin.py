"""A local stand-in for the Hugging Face Hub endpoints peftopt uses (repo creation, preupload, commit with
deletions, tree listing, model and data set info, file download), driven by the real huggingface_hub and
datasets clients through HF_ENDPOINT. Faults are injected per request, for any method: `fail_next` takes "500"
(any status), "429:2" (with Retry-After: 2), "drop" (connection closed, no answer), "reset" (closed mid-body),
"slow:3" (answer after 3 s); `fail_always` repeats one forever; `fail_after_commits` fails commits past N.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class HubStandIn:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits = 0
        self.committed: list[str] = []
        self.requests: list[str] = []
        self.fail_next: list[str] = []  # consumed one per request
        self.fail_always: str | None = None
        self.fail_after_commits: int | None = None
        self.faults_served = 0
        self.seen_headers: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict, error_code: str | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                if error_code:  # how the Hub tells a missing file from a missing repo
                    self.send_header("X-Error-Code", error_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _fault(self) -> bool:
                """Serves the next injected fault, if any; True when the request got it instead of an answer."""
                fault = standin.fail_next.pop(0) if standin.fail_next else standin.fail_always
                if fault is None:
                    return False
                standin.faults_served += 1
                kind, _, arg = fault.partition(":")
                if kind == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return True
                if kind == "reset":  # headers and half a body, then the connection goes away
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return True
                if kind == "slow":
                    time.sleep(float(arg))
                    return False
                data = json.dumps({"error": "injected"}).encode()
                self.send_response(int(kind))
                if arg:
                    self.send_header("Retry-After", arg)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return True

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                standin.requests.append(self.path)
                standin.seen_headers.append(str(self.headers))
                if self._fault():
                    return
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    return self._reply(401, {"error": "Invalid credentials"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api", "validate-yaml"]:
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "repos"] and parts[2] == "create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or data.get('namespace')}/{data['name']}" \
                        if (data.get("organization") or data.get("namespace")) else data["name"]
                    standin.repos[repo] = {"private": data.get("private", data.get("visibility") == "private")}
                    standin.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{standin.url}/{repo}", "name": repo})
                repo = "/".join(parts[2:4])
                if repo not in standin.repos:
                    return self._reply(404, {"error": f"Repository {repo} not found"})
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[4] == "commit":
                    if standin.fail_after_commits is not None and standin.commits >= standin.fail_after_commits:
                        return self._reply(503, {"error": "injected outage"})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            standin.files[repo][value["path"]] = base64.b64decode(value["content"])
                            standin.committed.append(f"{repo}/{value['path']}")
                        elif item["key"] == "deletedFile":
                            standin.files[repo].pop(item["value"]["path"], None)
                        elif item["key"] == "deletedFolder":
                            prefix = item["value"]["path"].rstrip("/") + "/"
                            for name in [n for n in standin.files[repo] if n.startswith(prefix)]:
                                del standin.files[repo][name]
                    standin.commits += 1
                    return self._reply(200, {"commitUrl": f"{standin.url}/{repo}/commit/{standin.commits:040x}",
                                             "commitOid": f"{standin.commits:040x}", "pullRequestUrl": None})
                return self._reply(404, {"error": f"no route {self.path}"})

            def _target(self) -> tuple[str, list[str], bool]:
                """(repo key, the path parts after the repo, whether it is an /api/ path): a data set's key is
                'datasets/<owner>/<name>', a model's '<owner>/<name>'."""
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                api = parts[:1] == ["api"]
                if api:
                    parts = parts[1:]
                    kind = parts.pop(0) if parts else ""
                    prefix = "datasets/" if kind == "datasets" else ""
                else:
                    prefix = "datasets/" if parts[:1] == ["datasets"] else ""
                    parts = parts[1:] if prefix else parts
                return prefix + "/".join(parts[:2]), parts[2:], api

            def _file_headers(self, repo: str, name: str) -> bytes | None:
                data = standin.files.get(repo, {}).get(name)
                if data is None:
                    self._reply(404, {"error": "Entry not found"},
                                "EntryNotFound" if repo in standin.repos else "RepoNotFound")
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", f"{standin.commits:040x}")
                self.end_headers()
                return data

            def _authorized(self) -> bool:
                repo = self._target()[0]
                if repo not in standin.repos or standin.repos[repo].get("private") is False \
                        and not self.headers.get("Authorization"):
                    return True  # a public repo reads without a token; an unknown one is a 404 below
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    self._reply(401, {"error": "Invalid credentials"})
                    return False
                return True

            def do_HEAD(self):
                standin.requests.append(f"HEAD {self.path}")
                if self._fault():
                    return
                repo, rest, api = self._target()
                if not api and len(rest) > 2 and rest[0] == "resolve" and self._authorized():
                    self._file_headers(repo, "/".join(rest[2:]))

            def do_GET(self):
                standin.requests.append(f"GET {self.path}")
                if self._fault() or not self._authorized():
                    return
                query = self.path.partition("?")[2]
                repo, rest, api = self._target()
                if not api and len(rest) > 2 and rest[0] == "resolve":
                    data = self._file_headers(repo, "/".join(rest[2:]))
                    if data is not None:
                        self.wfile.write(data)
                    return
                if api and repo not in standin.repos:
                    return self._reply(404, {"error": f"Repository {repo} not found"})
                if api and (not rest or (len(rest) == 2 and rest[0] == "revision")):
                    return self._reply(200, {"id": repo.removeprefix("datasets/"), "sha": f"{standin.commits:040x}",
                                             "private": True,
                                             "siblings": [{"rfilename": n} for n in sorted(standin.files[repo])]})
                if api and len(rest) >= 2 and rest[0] == "tree":
                    under = "/".join(rest[2:])
                    recursive = "recursive=True" in query or "recursive=true" in query
                    entries, folders = [], set()
                    for name, data in sorted(standin.files[repo].items()):
                        if under and not name.startswith(under + "/"):
                            continue
                        rest_of = name[len(under) + 1:] if under else name
                        if "/" in rest_of and not recursive:
                            folders.add(f"{under}/{rest_of.split('/')[0]}" if under else rest_of.split("/")[0])
                            continue
                        entries.append({"type": "file", "path": name, "size": len(data),
                                        "oid": hashlib.sha1(data).hexdigest()})
                    entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
                    return self._reply(200, entries)
                return self._reply(404, {"error": f"no route {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # a short poll: shutdown() waits for it, and the fault matrix starts and stops one per cell
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add_repo(self, repo: str, folder, private: bool = False) -> None:
        """Publishes a local folder's files as a model repo (as if pushed earlier)."""
        from pathlib import Path

        self.repos[repo] = {"private": private}
        self.files[repo] = {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}

    def add_dataset(self, repo: str, folder, private: bool = False) -> None:
        """Publishes a local folder's files as a data set repo."""
        self.add_repo(f"datasets/{repo}", folder, private)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
