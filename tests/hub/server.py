"""A loopback Hugging Face Hub: the HTTP endpoints huggingface_hub's upload path calls, kept in memory.

:class:`LoopbackHub` serves, on 127.0.0.1 and a free port, what ``HfApi.create_repo``,
``HfApi.model_info`` and ``HfApi.create_commit`` (legacy LFS path, ``HF_HUB_DISABLE_XET=1``) request:

- ``POST /api/repos/create`` (409 when the repo exists, as the Hub answers; ``exist_ok`` handles it)
- ``GET /api/models/{repo}``: id, privacy, sha and ``siblings``
- ``POST /api/validate-yaml``: a README.md whose YAML block is not a mapping is a 400
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for LFS suffixes (``.gguf``, ``.safetensors``, ...),
  binary samples and files of 10 MB or more, as the Hub decides; ``regular`` otherwise
- ``POST /{repo}.git/info/lfs/objects/batch``: upload + verify actions (none for a stored object)
- ``PUT /storage/{oid}``: the object store (like S3's presigned URLs: no token needed, sha256 checked)
- ``POST /{repo}.git/info/lfs/objects/verify``
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (inline base64 files and LFS pointers)

Tokens are checked as the Hub does: no token or an unknown one is a 401 ("Invalid credentials in
Authorization header"), a read token on a write endpoint or a foreign namespace a 403. Every request
is logged (method, path, Authorization header, status); unknown routes answer 404 and are listed in
``unexpected``. ``fail(route, status, message)`` makes the next request of a route fail.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
import uuid
from typing import Any

import yaml

# The Hub's default .gitattributes LFS suffixes (a subset) plus GGUF: stored through LFS whatever their size.
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub sends files of 10 MiB and more through LFS, text or not
ROUTES = ("create", "model-info", "validate-yaml", "preupload", "lfs-batch", "lfs-put", "lfs-verify", "commit")
_GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


@dataclasses.dataclass
class Commit:
    """One commit as the server received it."""

    repo_id: str
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # every file added by the commit
    inline: list[str]  # paths sent base64 in the commit body
    lfs: list[str]  # paths sent as LFS pointers


@dataclasses.dataclass
class Repo:
    repo_id: str
    visibility: str | None  # what the create request said ("private"/"public"), None when it said nothing
    files: dict[str, bytes]
    commits: list[Commit]


@dataclasses.dataclass
class Request:
    method: str
    route: str  # one of ROUTES, or "unknown"
    path: str
    authorization: str | None
    status: int = 0
    body: Any = None  # the parsed JSON body (not for uploads and commits)


class LoopbackHub:
    """An in-memory Hub over HTTP on 127.0.0.1. Use :meth:`start` / :meth:`stop` (or the conftest fixture).

    Args:
        tokens: token → (user name, ``"write"`` or ``"read"``).
    """

    def __init__(self, tokens: dict[str, tuple[str, str]]) -> None:
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[Request] = []
        self.validated: list[str] = []  # README.md contents sent to /api/validate-yaml
        self.upload_modes: dict[tuple[str, str], str] = {}  # (repo, path) -> the preupload answer
        self._failures: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # -- lifecycle and test helpers ---------------------------------------------------------------

    def start(self) -> LoopbackHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail(self, route: str, status: int, message: str) -> None:
        """Make the next request of ``route`` (one of :data:`ROUTES`) answer ``status`` with ``message``."""
        assert route in ROUTES, route
        self._failures[route] = (status, message)

    @property
    def commits(self) -> list[Commit]:
        return [c for r in self.repos.values() for c in r.commits]

    @property
    def unexpected(self) -> list[Request]:
        return [r for r in self.requests if r.route == "unknown"]

    def routes(self) -> list[str]:
        return [r.route for r in self.requests]

    # -- request handling (called from the handler threads) ---------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> _Reply:
        route, args = _route(method, path)
        record = Request(method, route, path, headers.get("Authorization"))
        with self._lock:
            self.requests.append(record)
            injected = self._failures.pop(route, None)
        if route != "lfs-put" and route != "commit" and body:
            try:
                record.body = json.loads(body)
            except ValueError:
                record.body = None
        if injected is not None:
            reply = _error(*injected)
        elif route == "unknown":
            reply = _error(404, f"no route for {method} {path}")
        else:
            reply = getattr(self, "_" + route.replace("-", "_"))(args, headers, body, query)
        record.status = reply.status
        return reply

    def _auth(self, headers: Any, *, write: bool, namespace: str | None = None) -> _Reply | str:
        """The user of the request's token, or the Hub's error reply."""
        value = headers.get("Authorization") or ""
        if not value.startswith("Bearer "):
            return _error(401, "You must be authenticated to access this resource.")
        user = self.tokens.get(value.removeprefix("Bearer "))
        if user is None:
            return _error(401, "Invalid credentials in Authorization header", header_message=True)
        name, role = user
        if write and role != "write":
            return _error(403, "This token has read access only: it cannot write to the Hub.")
        if namespace is not None and namespace != name:
            return _error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        return name

    def _authorized_repo(self, args: dict[str, str], headers: Any, *, write: bool) -> Repo | _Reply:
        """The request's repo, if its token may read (or write) it; else the Hub's error reply."""
        user = self._auth(headers, write=write)
        return user if isinstance(user, _Reply) else self._repo(args["repo"], user)

    def _repo(self, repo_id: str, user: str) -> Repo | _Reply:
        repo = self.repos.get(repo_id)
        if repo is None or repo_id.split("/")[0] != user:
            return _error(404, "Repository not found", code="RepoNotFound")
        return repo

    def _create(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        payload = json.loads(body)
        namespace = payload.get("organization")
        user = self._auth(headers, write=True, namespace=namespace)
        if isinstance(user, _Reply):
            return user
        repo_id = f"{namespace or user}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                return _error(409, "You already created this model repo", extra={"url": f"{self.endpoint}/{repo_id}"})
            files = {".gitattributes": _GITATTRIBUTES}
            self.repos[repo_id] = Repo(repo_id, payload.get("visibility"), files, [])
        return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def _model_info(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        repo = self._authorized_repo(args, headers, write=False)
        if isinstance(repo, _Reply):
            return repo
        sha = repo.commits[-1].oid if repo.commits else "0" * 40
        return _json(
            200,
            {
                "id": repo.repo_id,
                "private": repo.visibility == "private",
                "sha": sha,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            },
        )

    def _validate_yaml(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        content = json.loads(body)["content"]
        with self._lock:
            self.validated.append(content)
        m = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)", content)
        if m:
            try:
                data = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                return _json(400, {"errors": [{"message": f"YAML error: {e}"}], "warnings": []})
            if data is not None and not isinstance(data, dict):
                return _json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
        return _json(200, {"errors": [], "warnings": []})

    def _preupload(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        repo = self._authorized_repo(args, headers, write=True)
        if isinstance(repo, _Reply):
            return repo
        answers = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE or b"\0" in sample
            mode = "lfs" if lfs else "regular"
            with self._lock:
                self.upload_modes[(repo.repo_id, f["path"])] = mode
            answers.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        return _json(200, {"files": answers, "commitOid": repo.commits[-1].oid if repo.commits else "0" * 40})

    def _lfs_batch(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        repo = self._authorized_repo(args, headers, write=True)
        if isinstance(repo, _Reply):
            return repo
        payload = json.loads(body)
        assert payload["operation"] == "upload" and "basic" in payload["transfers"], payload
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # a stored object needs no upload
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/storage/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return _json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        oid = args["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            return _error(400, "The content does not match the object id (sha256)")
        with self._lock:
            self.lfs_objects[oid] = body
        return _Reply(200, b"", {"ETag": f'"{oid[:32]}"'})

    def _lfs_verify(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        user = self._auth(headers, write=True)
        if isinstance(user, _Reply):
            return user
        payload = json.loads(body)
        stored = self.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return _error(404, f"object {payload['oid']} was not uploaded")
        return _json(200, {"success": True})

    def _commit(self, args: dict[str, str], headers: Any, body: bytes, query: Any) -> _Reply:
        repo = self._authorized_repo(args, headers, write=True)
        if isinstance(repo, _Reply):
            return repo
        assert headers.get("Content-Type") == "application/x-ndjson", headers.get("Content-Type")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return _error(400, "the commit must start with a header line")
        header = lines[0]["value"]
        files: dict[str, bytes] = {}
        inline: list[str] = []
        lfs: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if self.upload_modes.get((repo.repo_id, path)) == "lfs":
                    return _error(400, f"Your push was rejected: {path} must be stored with LFS")
                files[path] = base64.b64decode(value["content"])
                inline.append(path)
            elif key == "lfsFile":
                stored = self.lfs_objects.get(value["oid"])
                if stored is None or len(stored) != value.get("size", len(stored)):
                    return _error(422, f"LFS object {value['oid']} of {path} was not uploaded")
                files[path] = stored
                lfs.append(path)
            else:
                return _error(400, f"unsupported commit operation {key!r}")
        oid = hashlib.sha1(body + uuid.uuid4().bytes).hexdigest()
        commit = Commit(repo.repo_id, oid, header["summary"], header.get("description", ""), files, inline, lfs)
        with self._lock:
            repo.files.update(files)
            repo.commits.append(commit)
        url = f"{self.endpoint}/{repo.repo_id}/commit/{oid}"
        return _json(200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})


@dataclasses.dataclass
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str]


def _json(status: int, data: Any, *, content_type: str = "application/json") -> _Reply:
    return _Reply(status, json.dumps(data).encode(), {"Content-Type": content_type})


def _error(
    status: int, message: str, *, code: str | None = None, header_message: bool = False, extra: dict | None = None
) -> _Reply:
    reply = _json(status, {"error": message, **(extra or {})})
    if code:
        reply.headers["X-Error-Code"] = code
    if header_message:
        reply.headers["X-Error-Message"] = message
    return reply


_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_PATTERNS = [
    ("POST", "create", r"/api/repos/create"),
    ("GET", "model-info", rf"/api/models/{_REPO}(?:/revision/[^/]+)?"),
    ("POST", "validate-yaml", r"/api/validate-yaml"),
    ("POST", "preupload", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "lfs-batch", rf"/{_REPO}\.git/info/lfs/objects/batch"),
    ("PUT", "lfs-put", r"/storage/(?P<oid>[0-9a-f]{64})"),
    ("POST", "lfs-verify", rf"/{_REPO}\.git/info/lfs/objects/verify"),
    ("POST", "commit", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"),
]


def _route(method: str, path: str) -> tuple[str, dict[str, str]]:
    for m, route, pattern in _PATTERNS:
        match = re.fullmatch(pattern, path)
        if m == method and match:
            return route, {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
    return "unknown", {}


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects

    def _serve(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        body = self._read_body()
        reply = self.hub.handle(self.command, url.path, urllib.parse.parse_qs(url.query), self.headers, body)
        self.send_response(reply.status)
        headers = {"X-Request-Id": uuid.uuid4().hex, **reply.headers, "Content-Length": str(len(reply.body))}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    do_GET = do_POST = do_PUT = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``LoopbackHub.requests`` instead of stderr."""
