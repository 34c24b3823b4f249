"""A Hugging Face Hub on loopback: the part of the Hub's HTTP API that `huggingface_hub` uses to push and pull.

The Hub is not reachable from the machines the tests run on, and no package provides a fake one,
so this server answers what the real client sends, as the Hub documents it and as the client
(huggingface_hub 2.4, read from its source) expects it:

    POST /api/repos/create                          create a repo (409 with its url when it exists)
    POST /api/validate-yaml                         check a README's metadata (400 listing errors)
    GET  /api/models/{id}[/revision/{rev}]          repo info: sha, private, gated, siblings
    POST /api/models/{id}/branch/{branch}           create a branch (409 when it exists)
    POST /api/models/{id}/preupload/{rev}           upload mode of each file, and its current oid
    POST /{id}.git/info/lfs/objects/batch           git-lfs batch API (basic transfer)
    PUT  /lfs-storage/{sha256}                      where the batch API sends uploads (an "S3")
    POST /{id}.git/info/lfs/objects/verify          the batch API's verify action
    POST /api/models/{id}/commit/{rev}[?create_pr=1]  NDJSON commit: header, file, lfsFile, deleted*
    GET  /api/models/{id}/tree/{rev}[/{path}]       files and folders (recursive or not)
    GET  /api/agent-harnesses                       the client's user-agent lookup (an empty registry)
    HEAD|GET /{id}/resolve/{rev}/{path}             a file, with X-Repo-Commit, ETag, X-Linked-*; Range

Design decisions:
- Git-like enough for the client: commits are immutable snapshots (path -> blob) with a parent;
  branches and `refs/pr/N` point at commits; a revision is a branch, a PR ref or a full commit
  sha. Regular files have git blob sha1 oids; LFS files are stored by sha256, and their tree
  entries carry the pointer's oid and `lfs: {oid, size, pointerSize}`, as on the Hub. A new repo
  starts with one commit holding the Hub's default `.gitattributes`.
- Upload modes follow the Hub: LFS when `.gitattributes` says so, when the sample holds a NUL
  byte (binary), or from 10 MB; preupload answers each existing file's oid (sha256 for LFS, git
  sha1 otherwise), which is what lets the client skip unchanged files and empty commits.
- Access follows the Hub: a missing repo is 404 `RepoNotFound`, and so is a private one to a
  token that cannot read it (401 without a token); a missing revision is 404 `RevisionNotFound`;
  a gated repo's metadata and tree are public but its files are 401/403 `GatedRepo` until a token
  is granted access. An unknown token is 401 "Invalid credentials in Authorization header"; a
  read-only token or another user's namespace is 403 on writes. Error details travel in
  `X-Error-Code` / `X-Error-Message` and a JSON `error`, which is where the client reads them.
- Metadata validation rejects what the Hub rejects that matters here: a `base_model` that is not
  a Hub id (a local path), a `base_model_relation` the Hub does not know, malformed `model-index`
  entries. The same check runs on `validate-yaml` and on a commit that adds README.md.
- Faults for the error tests (`fail`): drop the connection without an answer, stall until the
  client gives up, cut a download short, answer a status, or do something first (another
  writer's commit), for requests matching a method and a path pattern, a number of times.
  Every request is logged (`requests`) so a test can assert what the client did (no LFS upload
  and no commit on a re-push).
- The stdlib `ThreadingHTTPServer`, HTTP/1.1 with keep-alive: a fault can then act on the raw
  socket, which an ASGI server would not let it do.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_HUB_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9_][A-Za-z0-9._-]{0,95}")
_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(?:\r?\n|$)")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """A file in a commit: its bytes, and for an LFS file the sha256 it is stored under."""

    data: bytes
    lfs_sha256: str | None = None

    @property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer."""
        if self.lfs_sha256 is None:
            return git_blob_sha1(self.data)
        return git_blob_sha1(lfs_pointer(self.lfs_sha256, len(self.data)))


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    created_at: datetime


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # tokens allowed past the gate
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/N, in order

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class Token:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()

    def can_write(self, owner: str) -> bool:
        return self.write and owner in (self.user, *self.orgs)


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    action: str | int | Callable[[], None]  # "drop", "stall", "truncate", an HTTP status, or run this first
    times: int | None  # None: every matching request


class HubError(Exception):
    """An error answer: status, X-Error-Code, message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """The state of the fake Hub and the server in front of it (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, Token] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def add_token(self, token: str, user: str, *, write: bool = True, orgs: tuple[str, ...] = ()) -> str:
        self.tokens[token] = Token(user=user, write=write, orgs=orgs)
        return token

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id=repo_id, private=private, gated=gated)
            initial = self._new_commit(repo, None, "initial commit", {".gitattributes": Blob(DEFAULT_GITATTRIBUTES)})
            repo.branches["main"] = initial.sha
            self.repos[repo_id] = repo
            return repo

    def seed(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False,
             message: str = "upload") -> str:
        """A repo holding `files` (LFS by the repo's rules, like an upload would), its head commit sha."""
        repo = self.repos.get(repo_id) or self.create_repo(repo_id, private=private, gated=gated)
        with self._lock:
            head = repo.commits[repo.branches["main"]]
            tree = dict(head.files)
            for path, data in files.items():
                if self._is_lfs(tree, path, data[:512], len(data)):
                    sha = hashlib.sha256(data).hexdigest()
                    self.lfs[sha] = data
                    tree[path] = Blob(data, sha)
                else:
                    tree[path] = Blob(data)
            commit = self._new_commit(repo, head.sha, message, tree)
            repo.branches["main"] = commit.sha
            return commit.sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in repo.commits[self._resolve(repo, revision)].files.items()}

    def head(self, repo_id: str, revision: str = "main") -> str:
        repo = self.repos[repo_id]
        return self._resolve(repo, revision)

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits from `revision` back to the first, newest first."""
        repo = self.repos[repo_id]
        commits, sha = [], self._resolve(repo, revision)
        while sha is not None:
            commits.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return commits

    def fail(self, method: str, path_pattern: str, action: str | int | Callable[[], None], *, times: int | None = 1) -> None:
        """Make requests matching `method` and `path_pattern` (a regex searched in the path) fail.

        A callable `action` is run before the request is answered normally (another writer's commit, say).
        """
        self.faults.append(Fault(method.upper(), re.compile(path_pattern), action, times))

    def requested(self, method: str, path_pattern: str) -> int:
        """How many requests matched `method` and `path_pattern` so far."""
        pattern = re.compile(path_pattern)
        return sum(1 for m, p in self.requests if m == method.upper() and pattern.search(p))

    # ------------------------------------------------------------------ internals

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        self._commit_counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{message}\0{self._commit_counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        commit = Commit(sha=digest.hexdigest(), parent=parent, message=message, files=files, created_at=datetime.now(timezone.utc))
        repo.commits[commit.sha] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _is_lfs(self, tree: dict[str, Blob], path: str, sample: bytes, size: int) -> bool:
        attributes = tree.get(".gitattributes")
        patterns = [line.split()[0] for line in (attributes.data.decode() if attributes else "").splitlines()
                    if "filter=lfs" in line and line.split()]
        name = path.rsplit("/", 1)[-1]
        matched = any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)
        return matched or size >= LFS_SIZE_THRESHOLD or b"\0" in sample

    def _token(self, headers: Any) -> Token | None:
        """The caller's token; an unknown one is a 401 whatever the request."""
        auth = headers.get("Authorization", "")
        if not auth:
            return None
        token = self.tokens.get(auth.removeprefix("Bearer ").strip())
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _readable_repo(self, repo_id: str, token: Token | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (token is None or token.user != repo.owner and repo.owner not in token.orgs)):
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, token: Token | None) -> Repo:
        if token is None:
            raise HubError(401, "You must be authenticated to access this endpoint")
        repo = self._readable_repo(repo_id, token)
        if not token.can_write(repo.owner):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _check_gate(self, repo: Repo, token: Token | None, raw_token: str) -> None:
        owner = token is not None and repo.owner in (token.user, *token.orgs)
        if repo.gated and not owner and raw_token not in repo.granted:
            message = f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated to access it."
            raise HubError(401 if token is None else 403, message, "GatedRepo")


def validate_metadata(content: str) -> list[str]:
    """The Hub's checks of a README's YAML block that matter here (see the module docstring)."""
    match = _YAML_BLOCK.match(content)
    if match is None:
        return []
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        return [f"YAML does not parse: {exc}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors: list[str] = []
    base = data.get("base_model")
    for value in base if isinstance(base, list) else [base] if base is not None else []:
        if not isinstance(value, str) or not _HUB_ID.fullmatch(value) or ".." in value or "--" in value:
            errors.append(f'"base_model" with value "{value}" is not valid. Use a model id from https://hf.co/models.')
    relation = data.get("base_model_relation")
    if relation is not None and relation not in _RELATIONS:
        errors.append(f'"base_model_relation" must be one of {", ".join(_RELATIONS)}')
    if relation is not None and base is None:
        errors.append('"base_model_relation" needs "base_model"')
    for key in ("library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in data and not (isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])):
        errors.append('"tags" must be a list of strings')
    errors += _model_index_errors(data.get("model-index"))
    return errors


def _model_index_errors(model_index: Any) -> list[str]:
    if model_index is None:
        return []
    if not isinstance(model_index, list):
        return ['"model-index" must be a list']
    errors: list[str] = []
    for entry in model_index:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("results"), list):
            errors.append('"model-index" entries need a "name" and a list of "results"')
            continue
        for result in entry["results"]:
            task, dataset, metrics = (result.get(k) if isinstance(result, dict) else None for k in ("task", "dataset", "metrics"))
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)):
                errors.append('"model-index" results need "task.type"')
            if not (isinstance(dataset, dict) and isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append('"model-index" results need "dataset.type" and "dataset.name"')
            if not isinstance(metrics, list) or not all(
                isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("value"), (int, float, str)) for m in metrics
            ):
                errors.append('"model-index" metrics need "type" and "value"')
    return errors


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the fake Hub; `state` is set on a subclass per server."""

    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's names
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        hub = self.state
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with hub._lock:
            hub.requests.append((method, split.path))
            fault = next((f for f in hub.faults if f.method == method and f.path.search(split.path) and f.times != 0), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
        body = self._body() if method in ("POST", "PUT") else b""
        if fault is not None and callable(fault.action):
            fault.action()
            fault = None
        if fault is not None and fault.action in ("drop", "stall"):
            if fault.action == "stall":
                hub._stop.wait(60)
            self.close_connection = True
            return
        self.truncate = fault is not None and fault.action == "truncate"
        try:
            if fault is not None and isinstance(fault.action, int):
                raise HubError(fault.action, f"injected error {fault.action}")
            self._route(method, split.path, body)
        except HubError as exc:
            payload = json.dumps({"error": exc.message}).encode()
            headers = {"X-Error-Message": exc.message, **exc.headers}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            self._send(exc.status, payload, headers, head=method == "HEAD")

    def _send(self, status: int, payload: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        if getattr(self, "truncate", False):
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, body: bytes) -> None:
        hub = self.state
        parts = [unquote(p) for p in path.strip("/").split("/")]
        token = hub._token(self.headers)
        raw_token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        with hub._lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(token, json.loads(body or b"{}"))
            if method == "GET" and parts == ["api", "agent-harnesses"]:
                # The client's best-effort lookup of AI-agent harnesses (its user agent): none here.
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and parts == ["api", "validate-yaml"]:
                errors = validate_metadata(json.loads(body or b"{}").get("content", ""))
                return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                if method == "GET" and not rest:
                    return self._repo_info(repo_id, "main", token)
                if method == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                    return self._repo_info(repo_id, rest[1], token)
                if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                    return self._create_branch(repo_id, rest[1], token, json.loads(body or b"{}"))
                if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                    return self._preupload(repo_id, rest[1], token, json.loads(body))
                if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                    return self._commit(repo_id, rest[1], token, body)
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), token)
            if method == "PUT" and parts[:1] == ["lfs-storage"] and len(parts) == 2:
                return self._lfs_store(parts[1], body)
            if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:4] == ["info", "lfs"]:
                repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
                if method == "POST" and parts[4:] == ["objects", "batch"]:
                    return self._lfs_batch(repo_id, token, json.loads(body))
                if method == "POST" and parts[4:] == ["objects", "verify"]:
                    return self._lfs_verify(repo_id, token, json.loads(body))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), token, raw_token, head=method == "HEAD")
        raise HubError(404, f"no route for {method} {path}")

    def _create_repo(self, token: Token | None, payload: dict[str, Any]) -> None:
        hub = self.state
        if token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        owner = payload.get("organization") or token.user
        repo_id = f"{owner}/{payload['name']}"
        if repo_id in hub.repos:
            self._json({"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}, 409)
            return
        if not token.can_write(owner):
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{owner}\"")
        hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _repo_info(self, repo_id: str, revision: str, token: Token | None) -> None:
        hub = self.state
        repo = hub._readable_repo(repo_id, token)
        commit = repo.commits[hub._resolve(repo, revision)]
        self._json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo.owner, "sha": commit.sha, "private": repo.private, "disabled": False,
            "gated": "manual" if repo.gated else False, "lastModified": _iso(commit.created_at),
            "tags": [], "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def _create_branch(self, repo_id: str, branch: str, token: Token | None, payload: dict[str, Any]) -> None:
        hub = self.state
        repo = hub._writable_repo(repo_id, token)
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        repo.branches[branch] = hub._resolve(repo, payload.get("startingPoint") or "main")
        self._json({})

    def _target(self, repo: Repo, revision: str, create_pr: bool) -> str:
        """The commit a preupload or commit builds on; a PR is opened against a branch only."""
        if create_pr and revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.state._resolve(repo, revision)

    def _preupload(self, repo_id: str, revision: str, token: Token | None, payload: dict[str, Any]) -> None:
        hub = self.state
        repo = hub._writable_repo(repo_id, token)
        tree = repo.commits[self._target(repo, revision, self.query.get("create_pr") == "1")].files
        answers = []
        for entry in payload.get("files", []):
            path, size, sample = entry["path"], int(entry["size"]), base64.b64decode(entry.get("sample", ""))
            lfs = hub._is_lfs(tree, path, sample, size)
            existing = tree.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.lfs_sha256 is not None else existing.oid
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": answers, "commitOid": self._target(repo, revision, False)})

    def _lfs_batch(self, repo_id: str, token: Token | None, payload: dict[str, Any]) -> None:
        hub = self.state
        hub._writable_repo(repo_id, token)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/lfs-storage/{oid}", "header": {}},
                    "verify": {"href": f"{hub.url}/{quote(repo_id)}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json")

    def _lfs_store(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded bytes do not hash to {oid}")
        self.state.lfs[oid] = body
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, repo_id: str, token: Token | None, payload: dict[str, Any]) -> None:
        hub = self.state
        hub._writable_repo(repo_id, token)
        data = hub.lfs.get(payload.get("oid", ""))
        if data is None or len(data) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._json({"success": True})

    def _commit(self, repo_id: str, revision: str, token: Token | None, body: bytes) -> None:
        hub = self.state
        repo = hub._writable_repo(repo_id, token)
        create_pr = self.query.get("create_pr") == "1"
        head = self._target(repo, revision, create_pr)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit") or head
        if parent not in repo.commits:
            raise HubError(404, f"Invalid rev id: {parent}", "RevisionNotFound")
        if not create_pr and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[parent].files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = hub.lfs.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS file {value['path']} ({value['oid']}) was never uploaded")
                tree[value["path"]] = Blob(data, value["oid"])
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
        readme = tree.get("README.md")
        if readme is not None and any(line["key"] in ("file", "lfsFile") and line["value"]["path"] == "README.md" for line in lines):
            errors = validate_metadata(readme.data.decode("utf-8", "replace"))
            if errors:
                raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        commit = hub._new_commit(repo, parent, header.get("summary", ""), tree)
        answer: dict[str, Any] = {"success": True, "commitOid": commit.sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit.sha}"}
        if create_pr:
            ref = f"refs/pr/{len(repo.prs) + 1}"
            repo.prs.append(ref)
            repo.branches[ref] = commit.sha
            answer["pullRequestUrl"] = f"{hub.url}/{repo_id}/discussions/{len(repo.prs)}"
        else:
            repo.branches[revision] = commit.sha
        self._json(answer)

    def _tree(self, repo_id: str, revision: str, under: str, token: Token | None) -> None:
        hub = self.state
        repo = hub._readable_repo(repo_id, token)
        files = repo.commits[hub._resolve(repo, revision)].files
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = under.rstrip("/") + "/" if under else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, blob in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folder = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.lfs_sha256 is not None:
                    entry["lfs"] = {"oid": blob.lfs_sha256, "size": len(blob.data), "pointerSize": len(lfs_pointer(blob.lfs_sha256, len(blob.data)))}
                entries[path] = entry
        if under and not entries:
            raise HubError(404, f"{under} does not exist at {revision}", "EntryNotFound")
        self._json(list(entries.values()))

    def _resolve(self, repo_id: str, revision: str, path: str, token: Token | None, raw_token: str, *, head: bool) -> None:
        hub = self.state
        repo = hub._readable_repo(repo_id, token)
        sha = hub._resolve(repo, revision)
        hub._check_gate(repo, token, raw_token)
        blob = repo.commits[sha].files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        if blob.lfs_sha256 is not None:
            headers |= {"X-Linked-Etag": f'"{blob.lfs_sha256}"', "X-Linked-Size": str(len(blob.data))}
        data, status = blob.data, 200
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and not head:
            start = int(ranged.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(status, data, headers, head=head, content_type="application/octet-stream")


# ------------------------------------------------------------------ fixtures and settings for the tests

TOKEN = "hf_write_me"  # user "me", member of org "team"
READ_TOKEN = "hf_read_me"  # user "me", read-only
OTHER_TOKEN = "hf_write_stranger"  # user "stranger"


def start_hub() -> FakeHub:
    hub = FakeHub().start()
    hub.add_token(TOKEN, "me", orgs=("team",))
    hub.add_token(READ_TOKEN, "me", write=False)
    hub.add_token(OTHER_TOKEN, "stranger")
    return hub


def client_env(hub: FakeHub, hf_home: Any, *, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """The Hugging Face client's own settings pointing at `hub`: endpoint, token, no Xet, a private HF_HOME.

    `HF_HUB_DISABLE_XET=1` is the client's switch back to the classic LFS API (with `hf_xet`
    installed it would send files through Xet, which this server does not speak); HF_HOME keeps
    the machine's login and cache out; the test suite's HF_HUB_OFFLINE is lifted.
    """
    env = {
        "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env | extra


_CLIENT_VARIABLES = ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_DOWNLOAD_TIMEOUT",
                     "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_ETAG_TIMEOUT")


@contextlib.contextmanager
def client_settings(env: dict[str, str]) -> Iterator[None]:
    """Run the client in this process with `env` as its settings.

    The client reads its environment when `huggingface_hub.constants` is imported, so the module
    is re-read after the variables are set, and again after they are restored.
    """
    import importlib

    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        for name in _CLIENT_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        importlib.reload(constants)
        try:
            yield
        finally:
            patch.undo()
            importlib.reload(constants)


@pytest.fixture()
def fake_hub() -> Iterator[FakeHub]:
    """A fresh fake Hub with three tokens (see TOKEN, READ_TOKEN, OTHER_TOKEN)."""
    hub = start_hub()
    try:
        yield hub
    finally:
        hub.stop()
