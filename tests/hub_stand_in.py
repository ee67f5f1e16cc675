"""A Hugging Face Hub stand-in on loopback, for tests that push with the real huggingface_hub client.

It serves the requests that `HfApi.create_repo`, `create_branch` and `create_commit` of huggingface_hub 2.4
send when every file is committed inline (the stand-in returns `uploadMode: regular` for every preupload, so
the client never asks for LFS or Xet storage):

- `POST /api/repos/create`
- `POST /api/models/{repo_id}/branch/{branch}`
- `POST /api/validate-yaml` (the client checks README.md metadata before a commit)
- `POST /api/models/{repo_id}/preupload/{revision}`
- `POST /api/models/{repo_id}/commit/{revision}` (ndjson with base64 file contents)
- `GET /api/models/{repo_id}` and `GET /api/models/{repo_id}/revision/{revision}` (the client reads the head
  when every file of a commit is unchanged)

Commits are kept in memory so tests can assert on file names, contents and commit messages. Every request is
recorded; a request the stand-in does not implement is answered 404 and listed in `unexpected`, which tests
assert is empty.

Failure modes, settable at construction or later (each request reads the attributes anew):

- `delay_s`: seconds to wait before answering each request (a slow Hub).
- `fail_status` with `fail_times`: answer that status to the next `fail_times` requests, or to every request
  when `fail_times` is None (a refusing Hub). `fail_path` (a regular expression) limits which paths fail.
- `hold_requests()` / `release_requests()`: requests wait until released (a Hub that answers only when the
  test says so).
- `unused_loopback_url()`: a URL where nothing listens (connection refused).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_NAMESPACE = "stand-in-user"
REPO_ROUTE = re.compile(
    r"^/api/models/(?P<repo_id>[^/]+/[^/]+)(?:/(?P<action>preupload|commit|revision|branch)/(?P<ref>[^/]+))?$"
)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub reports for regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def unused_loopback_url() -> str:
    """A loopback URL whose port had a listener a moment ago and has none now (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class RecordedRequest:
    method: str
    path: str
    #: Arrival time (time.monotonic()).
    time: float
    #: The response status; None while the request waits (delay or hold).
    status: int | None = None
    #: False for a request the stand-in does not implement or could not parse.
    understood: bool = True


@dataclass
class Commit:
    oid: str
    message: str
    description: str
    #: Every file of the branch after this commit, path -> content.
    files: dict[str, bytes]
    #: The paths this commit added or changed.
    changed: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool | None
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})

    def head_files(self, branch: str) -> dict[str, bytes]:
        commits = self.branches[branch]
        return dict(commits[-1].files) if commits else {}


class HubError(Exception):
    """An error response of the stand-in: status, message, optional X-Error-Code and extra JSON fields."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.extra = extra


class HubStandIn:
    """A threaded HTTP server on 127.0.0.1 (a free port) that imitates the Hub's model repo API."""

    def __init__(
        self,
        token: str | None = None,
        delay_s: float = 0.0,
        fail_status: int | None = None,
        fail_times: int | None = None,
        fail_path: str | None = None,
        echo_authorization_in_errors: bool = False,
    ) -> None:
        #: The token clients must send as `Authorization: Bearer ...`; None accepts any request.
        self.token = token
        self.delay_s = delay_s
        self.fail_status = fail_status
        self.fail_times = fail_times
        self.fail_path = fail_path
        #: Put the received Authorization header into error messages, as a careless proxy might.
        self.echo_authorization_in_errors = echo_authorization_in_errors

        self.requests: list[RecordedRequest] = []
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> HubStandIn:
        handler = type("StandInHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests still waiting (delay or hold) are answered 503 at once."""
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def hold_requests(self) -> None:
        """Make requests wait, unanswered, until release_requests() or stop()."""
        self.released.clear()

    def release_requests(self) -> None:
        self.released.set()

    def wait_before_answering(self) -> bool:
        """Wait out `delay_s` and any hold; False when the stand-in stopped meanwhile."""
        if self.delay_s and self.stopping.wait(self.delay_s):
            return False
        while not self.released.wait(0.05):
            if self.stopping.is_set():
                return False
        return not self.stopping.is_set()

    # --------------------------------------------------------------------------------------- for asserts
    @property
    def unexpected(self) -> list[RecordedRequest]:
        with self.lock:
            return [request for request in self.requests if not request.understood]

    def paths(self) -> list[str]:
        with self.lock:
            return [f"{request.method} {request.path}" for request in self.requests]

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        with self.lock:
            repo = self.repos.get(repo_id)
            return list(repo.branches.get(branch, [])) if repo else []

    # ------------------------------------------------------------------------------------------ handling
    def take_failure(self, path: str) -> int | None:
        """The failure status for this request, if the configured failure mode applies to it."""
        with self.lock:
            if self.fail_status is None:
                return None
            if self.fail_path is not None and not re.search(self.fail_path, path):
                return None
            if self.fail_times is None:
                return self.fail_status
            if self.fail_times <= 0:
                return None
            self.fail_times -= 1
            return self.fail_status

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Handle an implemented request; raise HubError for an error response, LookupError otherwise."""
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            json.loads(body)
            return 200, {"errors": [], "warnings": []}

        match = REPO_ROUTE.match(path)
        if match is None:
            raise LookupError(path)
        repo_id, action = match["repo_id"], match["action"]
        ref = unquote(match["ref"]) if match["ref"] else "main"
        if method == "GET" and action in (None, "revision"):
            return self.repo_info(repo_id, ref)
        if method == "POST" and action == "branch":
            return self.create_branch(repo_id, ref)
        if method == "POST" and action == "preupload":
            return self.preupload(repo_id, ref, json.loads(body))
        if method == "POST" and action == "commit":
            return self.commit(repo_id, ref, body)
        raise LookupError(path)

    def find_repo(self, repo_id: str, branch: str | None = None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if branch is not None and branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return repo

    def create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if payload.get("type", "model") != "model":
            raise LookupError(f"repo type {payload.get('type')!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload['name']}"
        with self.lock:
            if repo_id in self.repos:
                # The Hub answers 409 with the repo's URL, and create_repo(exist_ok=True) reads it.
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            visibility = payload.get("visibility")
            self.repos[repo_id] = Repo(
                repo_id, private=None if visibility is None else visibility == "private"
            )
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, repo_id: str, branch: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            repo = self.find_repo(repo_id)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = list(repo.branches["main"])
        return 200, {}

    def repo_info(self, repo_id: str, revision: str) -> tuple[int, dict[str, Any]]:
        with self.lock:
            repo = self.find_repo(repo_id, revision)
            commits = repo.branches[revision]
            files = repo.head_files(revision)
        return 200, {
            "id": repo_id,
            "sha": commits[-1].oid if commits else None,
            "private": bool(repo.private),
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }

    def preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            files = self.find_repo(repo_id, revision).head_files(revision)
        answers = []
        for entry in payload["files"]:
            existing = files.get(entry["path"])
            answers.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return 200, {"files": answers, "commitOid": None}

    def commit(self, repo_id: str, branch: str, body: bytes) -> tuple[int, dict[str, Any]]:
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise LookupError("commit without a header line")
        header = lines[0]["value"]
        with self.lock:
            repo = self.find_repo(repo_id, branch)
            files = repo.head_files(branch)
            changed = []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                    changed.append(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    changed.append(value["path"])
                else:
                    # lfsFile and others: the stand-in never offers LFS, so these are client surprises.
                    raise LookupError(f"commit operation {key!r}")
            oid = hashlib.sha1(
                f"{repo_id}@{branch}#{len(repo.branches[branch])}:{time.time_ns()}".encode()
            ).hexdigest()
            repo.branches[branch].append(
                Commit(oid, header.get("summary", ""), header.get("description", ""), files, changed)
            )
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately; without this, delayed ACKs add ~40 ms to every answer.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def do_PUT(self) -> None:
        self.serve()

    def do_DELETE(self) -> None:
        self.serve()

    def do_HEAD(self) -> None:
        self.serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the request log out of the test output; `hub.requests` has it."""

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def serve(self) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        body = self.read_body()
        record = RecordedRequest(self.command, path, time.monotonic())
        with hub.lock:
            hub.requests.append(record)
        understood = True
        error_code = None

        if not hub.wait_before_answering():
            status, payload = 503, {"error": "the stand-in is shutting down"}
        elif (failure := hub.take_failure(path)) is not None:
            status, payload = failure, {"error": f"the stand-in is refusing requests ({failure})"}
        elif hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            status, payload = 401, {"error": "Invalid credentials in Authorization header"}
        else:
            try:
                status, payload = hub.handle(self.command, path, body)
            except HubError as error:
                status, payload, error_code = (
                    error.status,
                    {"error": str(error), **error.extra},
                    error.error_code,
                )
            except (LookupError, ValueError, TypeError) as error:
                understood = False
                status, payload = (
                    404,
                    {"error": f"the stand-in does not implement {self.command} {path} ({error})"},
                )

        if status >= 400 and hub.echo_authorization_in_errors:
            payload["error"] += f" (received Authorization: {self.headers.get('Authorization')})"
        with hub.lock:
            record.status, record.understood = status, understood
        self.respond(status, payload, error_code)

    def respond(self, status: int, payload: dict[str, Any], error_code: str | None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", payload["error"].encode("ascii", "replace").decode("ascii"))
            if error_code:
                self.send_header("X-Error-Code", error_code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
