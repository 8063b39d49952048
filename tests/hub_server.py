"""A tiny fake of the Hugging Face Hub's HTTP API, for upload tests without a network.

Listens on 127.0.0.1 (a free port) in a daemon thread and answers what ``HfApi.create_repo``,
``ModelCard.validate``, ``HfApi.upload_folder``/``create_commit`` and transformers'
``push_to_hub`` ask: create-repo, validate-yaml, preupload (every file "regular", so contents come
inline, base64, in the commit) and commit (NDJSON, decoded and recorded). A README download
answers 404 EntryNotFound (a new repo). Anything else is recorded and answered 404.

Bounded: it stops itself after ``lifetime`` seconds or ``max_requests`` requests, refuses bodies
over ``max_body`` bytes, and ``with FakeHub() as hub:`` always shuts it down.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+(?:/[\w.-]+)?)"
REVISION = r"(?P<revision>[^/?]+)"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    repo_id: str
    revision: str
    header: dict
    files: dict[str, bytes] = field(default_factory=dict)  # path -> decoded content
    lfs_files: dict[str, dict] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    oid: str = ""


class FakeHub:
    def __init__(self, *, lifetime: float = 120.0, max_requests: int = 500, max_body: int = 64 << 20):
        self.lifetime, self.max_requests, self.max_body = lifetime, max_requests, max_body
        self.requests: list[Request] = []
        self.commits: list[Commit] = []
        self.validated: list[str] = []  # README contents sent to validate-yaml
        self.repos: list[dict] = []
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server = self._server
        if server is not None and self._thread is not None and self._thread.is_alive():
            server.shutdown()
            server.server_close()
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ answers

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        with self._lock:
            self.requests.append(Request(method, path, headers, body))
            if len(self.requests) > self.max_requests:
                threading.Thread(target=self.stop, daemon=True).start()
                return _json(503, {"error": "fake hub: request limit reached"})
        route = urlsplit(path).path
        if method == "POST" and route == "/api/repos/create":
            data = json.loads(body or b"{}")
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self._lock:
                self.repos.append(data)
            repo_hash = hashlib.sha1(repo_id.encode()).hexdigest()
            return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_hash})
        if method == "POST" and route == "/api/validate-yaml":
            data = json.loads(body or b"{}")
            content = data.get("content", "")
            with self._lock:
                self.validated.append(content)
            match = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---", content)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as error:
                return _json(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
            if not isinstance(metadata, dict):
                return _json(400, {"errors": [{"message": "no YAML metadata block"}]})
            return _json(200, {"errors": [], "warnings": []})
        match = re.fullmatch(rf"/api/models/{REPO}/preupload/{REVISION}", route)
        if method == "POST" and match:
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return _json(200, {"files": answer, "commitOid": "0" * 40})
        match = re.fullmatch(rf"/api/models/{REPO}/commit/{REVISION}", route)
        if method == "POST" and match:
            commit = self._decode_commit(match["repo"], unquote(match["revision"]), body)
            return _json(200, {"commitUrl": f"{self.url}/{commit.repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                               "pullRequestUrl": None})
        if re.fullmatch(rf"/{REPO}/resolve/{REVISION}/README\.md", route):
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                         "Content-Type": "application/json"}, b'{"error": "Entry not found"}'
        with self._lock:
            self.unhandled.append(f"{method} {path}")
        return _json(404, {"error": f"fake hub does not implement {method} {route}"})

    def _decode_commit(self, repo_id: str, revision: str, body: bytes) -> Commit:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise ValueError("commit payload does not start with a header line")
        commit = Commit(repo_id=repo_id, revision=revision, header=lines[0]["value"])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"unexpected encoding {value.get('encoding')!r}")
                commit.files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                commit.lfs_files[value["path"]] = value
            elif line["key"] in ("deletedFile", "deletedFolder"):
                commit.deleted.append(value["path"])
            else:
                raise ValueError(f"unknown commit operation {line['key']!r}")
        commit.oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            self.commits.append(commit)
        return commit


def _json(status: int, data: dict) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > self.fake.max_body:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return None if length > self.fake.max_body else self.rfile.read(length)

    def _serve(self) -> None:
        body = self._body() if self.command in ("POST", "PUT") else b""
        if body is None:
            status, headers, payload = _json(413, {"error": "body too large for the fake hub"})
            self.close_connection = True
        else:
            try:
                status, headers, payload = self.fake.handle(self.command, self.path, dict(self.headers), body)
            except Exception as error:  # a malformed request must fail the client, not hang it
                status, headers, payload = _json(500, {"error": f"fake hub: {type(error).__name__}: {error}"})
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve
