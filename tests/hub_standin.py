"""A local stand-in for the Hugging Face Hub endpoints peftopt uses (repo creation, preupload, commit with
deletions, tree listing, model info, file download), driven by the real huggingface_hub client through
HF_ENDPOINT. Faults are injected per request, for any method: `fail_next` takes "500" (any status),
"429:2" (with Retry-After: 2), "drop" (connection closed, no answer), "reset" (closed mid-body), "slow:3"
(answer after 3 s); `fail_always` repeats one forever; `fail_after_commits` fails commits past N.
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

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
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

            def _file_headers(self, repo: str, name: str) -> bytes | None:
                data = standin.files.get(repo, {}).get(name)
                if data is None:
                    self._reply(404, {"error": "Entry not found"})
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", f"{standin.commits:040x}")
                self.end_headers()
                return data

            def _authorized(self) -> bool:
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                repo = "/".join(parts[2:4]) if parts[:2] == ["api", "models"] else "/".join(parts[:2])
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
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                if len(parts) > 4 and parts[2] == "resolve" and self._authorized():
                    self._file_headers("/".join(parts[:2]), "/".join(parts[4:]))

            def do_GET(self):
                standin.requests.append(f"GET {self.path}")
                if self._fault() or not self._authorized():
                    return
                path, _, query = self.path.partition("?")
                parts = unquote(path).strip("/").split("/")
                if len(parts) > 4 and parts[2] == "resolve":
                    data = self._file_headers("/".join(parts[:2]), "/".join(parts[4:]))
                    if data is not None:
                        self.wfile.write(data)
                    return
                if parts[:2] == ["api", "models"] and (len(parts) == 4 or (len(parts) == 6 and parts[4] == "revision")):
                    repo = "/".join(parts[2:4])
                    if repo not in standin.repos:
                        return self._reply(404, {"error": f"Repository {repo} not found"})
                    return self._reply(200, {"id": repo, "sha": f"{standin.commits:040x}", "private": True,
                                             "siblings": [{"rfilename": n} for n in sorted(standin.files[repo])]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    repo = "/".join(parts[2:4])
                    if repo not in standin.repos:
                        return self._reply(404, {"error": f"Repository {repo} not found"})
                    under = "/".join(parts[6:])
                    recursive = "recursive=True" in query or "recursive=true" in query
                    entries, folders = [], set()
                    for name, data in sorted(standin.files[repo].items()):
                        if under and not name.startswith(under + "/"):
                            continue
                        rest = name[len(under) + 1:] if under else name
                        if "/" in rest and not recursive:
                            folders.add(f"{under}/{rest.split('/')[0]}" if under else rest.split("/")[0])
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

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
