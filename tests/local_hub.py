"""A tiny Hugging Face Hub on 127.0.0.1 for download tests.

It answers the endpoints that `hf download REPO [FILES] --revision REV --local-dir DIR`
(huggingface_hub 2.x, plain HTTP, no Xet), `HfApi().model_info(..., files_metadata=True)`,
`hf_hub_download` and the safetensors-metadata calls (`get_safetensors_metadata`,
`parse_safetensors_file_metadata`: HEAD, then a Range GET of the header) call for a model repo:

    GET  /api/models/{repo}[/revision/{rev}]        repo info (sha, siblings with sizes)
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (?recursive=...)
    HEAD /{repo}/resolve/{rev}/{path}               X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}               the bytes, honouring Range (a-b, a-, -n; 416 past the end)
    GET  /api/agent-harnesses                       huggingface_hub's user-agent registry (empty)

Repos are folders on disk, subfolders included (`audio_tokenizer/config.json` is a path in the repo).
Every request is recorded in `hub.requests`, with its User-Agent (`Request.check`: sent by
download.sh's own source check). Knobs:
`hub.cut[path] = n` sends a transfer of that file that reaches past byte n up to byte n and drops
the connection (reads that end before it, like a header check, pass), then refuses such transfers outright (so the client's own retries fail too) until the
knob is cleared, or with `hub.refuse_after_cut = False` serves the retries;
`hub.ignore_range = True` answers Range reads with the whole file;
`hub.gated.add(repo)` answers like a gated repo whose terms were not accepted; `hub.tokens[repo] = "secret"` makes the repo private.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]  # path in repo -> content

    def entry(self, path: str) -> dict:
        data = self.files[path]
        info = {"size": len(data), "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.endswith(LFS_SUFFIXES):
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info

    def etag(self, path: str) -> str:
        e = self.entry(path)
        return e["lfs"]["oid"] if "lfs" in e else e["oid"]


@dataclass
class Request:
    method: str
    path: str
    range: str | None = None
    agent: str = ""  # User-Agent: download.sh's own checks send "higgs-download/check"
    status: int = 0
    sent: int = 0  # body bytes written

    @property
    def check(self) -> bool:
        """A request of download.sh's source check (hub.py), not of `hf download`."""
        return "higgs-download/check" in self.agent


@dataclass
class LocalHub:
    repos: dict[str, dict[str, Repo]] = field(default_factory=dict)  # repo -> {revision name or sha: Repo}
    tokens: dict[str, str] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)  # terms not accepted: 401 without a token, 403 with one
    cut: dict[str, int] = field(default_factory=dict)
    cut_served: set[str] = field(default_factory=set)
    refuse_after_cut: bool = True
    ignore_range: bool = False  # answer a Range read with the whole file (200), as some mirrors do
    requests: list[Request] = field(default_factory=list)

    def add_repo(self, repo_id: str, folder: str | Path, revisions=("main",), commit: str | None = None) -> Repo:
        folder = Path(folder)
        files = {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts
        }
        commit = commit or hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
        repo = Repo(commit, files)
        refs = self.repos.setdefault(repo_id, {})
        refs[commit] = repo
        for rev in revisions:
            refs[rev] = repo
        return repo

    def resolve_requests(self, method: str | None = None) -> list[Request]:
        return [r for r in self.requests if "/resolve/" in r.path and (method is None or r.method == method)]

    # ------------------------------------------------------------------ server

    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:  # in-process clients (hub.py's functions called by a test) pool connections to us: drop them
            from huggingface_hub.utils import close_session
        except ImportError:
            return
        close_session()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------ helpers

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.record.status = status
        step = 1 << 20  # in pieces, so `sent` says how far a client that closes early let it get
        for start in range(0, 0 if head else len(body), step):
            try:
                self.wfile.write(body[start:start + step])
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            self.record.sent += len(body[start:start + step])

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": message}).encode()
        self._reply(status, body, {"Content-Type": "application/json", **headers}, head=head)

    def _lookup(self, repo_id: str, rev: str, head: bool = False) -> Repo | None:
        refs = self.hub.repos.get(repo_id)
        if refs is None:
            # what huggingface.co answers for a repo that does not exist (or is hidden)
            self._error(401 if not self.headers.get("Authorization") else 404, "RepoNotFound",
                        "Repository not found", head)
            return None
        if repo_id in self.hub.gated:
            authed = bool(self.headers.get("Authorization"))
            self._error(403 if authed else 401, "GatedRepo", "Access to this model is restricted", head)
            return None
        want = self.hub.tokens.get(repo_id)
        if want is not None:
            got = self.headers.get("Authorization")
            if got is None:
                self._error(401, "RepoNotFound", "Repository not found", head)
                return None
            if got != f"Bearer {want}":
                self._error(401, None, "Invalid credentials in Authorization header", head)
                return None
        repo = refs.get(rev)
        if repo is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return repo

    # ------------------------------------------------------------------ routes

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool) -> None:
        self.record = Request(self.command, self.path, self.headers.get("Range"), self.headers.get("User-Agent", ""))
        self.hub.requests.append(self.record)
        path = unquote(urlsplit(self.path).path)
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent detection asks once a day
            self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo = self._lookup(m.group(1), m.group(2) or "main", head)
            if repo is not None:
                siblings = [{"rfilename": p, **_sibling(repo.entry(p))} for p in repo.files]
                self._json(200, {"id": m.group(1), "modelId": m.group(1), "sha": repo.commit,
                                 "private": m.group(1) in self.hub.tokens, "siblings": siblings})
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo = self._lookup(m.group(1), m.group(2), head)
            if repo is not None:
                prefix = (m.group(3) or "").strip("/")
                entries = [{"type": "file", "path": p, **repo.entry(p)} for p in repo.files
                           if not prefix or p.startswith(prefix + "/")]
                self._json(200, entries)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            self._resolve(m.group(1), m.group(2), m.group(3), head)
            return
        self._error(404, None, f"no route for {path}", head)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._lookup(repo_id, rev, head)
        if repo is None:
            return
        if name not in repo.files:
            self._error(404, "EntryNotFound", f"{name} does not exist", head)
            return
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if head:
            self._reply(200, b"", {**headers, "Content-Length": len(data)}, head=True)
            return
        rng = None if self.hub.ignore_range else self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m is None or m.group(1) == m.group(2) == "":
                self._error(400, None, f"bad Range {rng!r}")
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            else:  # bytes=-N: the last N bytes
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            if start >= len(data) or end < start:
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            body = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
            status = 206
        else:
            body, status, start = data, 200, 0
        limit = self.hub.cut.get(name)
        # only a transfer reaching past byte n is cut: the header check's short Range read passes, so
        # the drop hits the download itself and never a pooled connection the checker reuses next
        if limit is not None and start + len(body) > limit:
            if name in self.hub.cut_served and self.hub.refuse_after_cut:
                self._drop()  # after the first cut: refuse the file outright
                return
            if name in self.hub.cut_served:  # retries get the rest
                self._reply(status, body, headers)
                return
            self.hub.cut_served.add(name)
            self.send_response(status)
            for k, v in {**headers, "Content-Length": len(body), "Connection": "close"}.items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body[:max(limit - start, 0)])
            self.wfile.flush()
            self.record.sent += max(limit - start, 0)
            self.record.status = status
            self._drop()
            return
        self._reply(status, body, headers)

    def _drop(self) -> None:
        self.close_connection = True
        self.record.status = -1
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _sibling(entry: dict) -> dict:
    out = {"size": entry["size"], "blobId": entry["oid"]}
    if "lfs" in entry:
        out["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"], "pointerSize": 134}
    return out
