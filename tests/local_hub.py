"""A local stand-in for the Hugging Face Hub's HTTP API, for tests that push and pull through ``huggingface_hub``'s
real client (``HF_ENDPOINT=http://127.0.0.1:PORT``): no ``HfApi`` or ``Trainer`` method is patched.

It answers what ``HfApi.create_repo`` / ``upload_folder`` / ``create_commit`` / ``model_info`` / ``list_repo_tree`` /
``get_paths_info`` / ``whoami``, ``hf_hub_download`` / ``snapshot_download`` (and so ``from_pretrained``) and
``hf upload`` call, as read in huggingface_hub 1.33 (``hf_api.py``, ``_commit_api.py``, ``file_download.py``):

- ``GET /api/whoami-v2``: 401 without the test token; ``GET /api/agent-harnesses`` (the client's own telemetry
  registry): empty;
- ``POST /api/repos/create``: the repo under the token's user (409 with the repo's ``url`` when it exists, 403 for
  another namespace, 400 for an invalid name);
- ``POST /api/validate-yaml``: the README's YAML must parse to a mapping; ``tags`` / ``datasets`` are lists of
  strings, ``base_model`` valid repo ids; ``model-index`` as the Hub checks it: a list of ``{name, results}``, each
  result with ``task.type``, ``dataset.type`` and ``dataset.name``, and ``metrics`` with ``type`` and ``value``
  (400 with ``{"errors": [{"message"}]}``, which the client raises as ``ValueError``);
- ``POST /api/models/{repo}/preupload/{rev}``: every file ``regular`` (content inline in the commit), with the
  ``oid`` (git blob sha1) of the file already at that path, so that unchanged files are skipped as on the Hub;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (``header``, ``file``, ``deletedFile``,
  ``deletedFolder``); answers ``commitUrl`` / ``commitOid``;
- ``GET /api/models/{repo}[/revision/{rev}]``: ``id``, ``sha``, ``siblings``, ``cardData``, ``private``, ...;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``) and ``POST .../paths-info/{rev}``;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the bytes (``Range: bytes=N-`` honoured) with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, quoted), ``Content-Length``; a 404 carries ``X-Error-Code`` ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound`` and ``X-Error-Message`` as the Hub's do.

Every request is recorded (:attr:`LocalHub.requests`: method, path, query, status, body); :meth:`LocalHub.fail`
makes matching requests fail (a status and ``X-Error-Message``) a number of times or always.

Limits (what the real Hub does and this does not): no LFS or Xet transfer (the preupload never answers ``lfs``, so
every file travels base64-encoded inside the commit: fine for test-sized models, the client refuses nothing for
that); one branch, ``main`` (a revision is ``main`` or a commit sha; no PRs, tags, branches, ``parentCommit``
checks); model repos only; one user and one token, every repo readable without it (``private`` is recorded, not
enforced); no pagination (the tree comes in one page); ``.gitignore`` is not read; no rate limits; no
``lastCommit`` / security expansions; the YAML check covers the fields above, not the Hub's full schema (licenses,
languages, pipeline tags are not checked).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_localHubTestTokenDoNotLeak0123456789"
USER = "me"
TELEMETRY = ("/api/agent-harnesses",)  # what huggingface_hub asks for itself (its agent-detection registry)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as ``oid`` and ``ETag`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)

    def at(self, revision: str) -> Commit | None:
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    status: int = 0
    body: bytes = b""

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int
    times: int | None  # None: always
    message: str
    retry_after: int | None = None


class LocalHub:
    """The server (``with LocalHub() as hub: hub.endpoint``), its repos (:meth:`files`) and what it received."""

    def __init__(self, token: str = TOKEN, user: str = USER):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))  # port 0: the OS picks a free one
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- for tests ----
    def fail(self, method: str, path_regex: str, status: int = 500, times: int | None = None,
             message: str = "Internal Error - local Hub failure injected by the test",
             retry_after: int | None = None) -> None:
        """Answer requests whose method and path match with ``status``: the next ``times`` of them, or all.
        ``retry_after`` adds a ``Retry-After`` header (seconds), which huggingface_hub's backoff honours: tests set
        0 to go past its retries in seconds rather than its ~23 s of backoff."""
        self.failures.append(Failure(method, re.compile(path_regex), status, times, message, retry_after))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.at(revision).files)

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits)

    def seen(self, method: str | None = None, contains: str = "") -> list[Request]:
        """The requests received (``method``, a ``contains`` substring of the path), the client's own telemetry
        (``GET /api/agent-harnesses``, fetched once a day per cache) left out."""
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path
                and r.path not in TELEMETRY]

    # ---- state changes (under the lock) ----
    def create(self, repo_id: str, private: bool) -> None:
        empty = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.repos[repo_id] = Repo(repo_id, private, [Commit(_oid(repo_id, "initial commit"), "initial commit",
                                                              empty)])

    def commit(self, repo: Repo, lines: list[dict[str, Any]]) -> Commit:
        files = dict(repo.commits[-1].files)
        message = ""
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"file {value.get('path')}: encoding {value.get('encoding')!r} not supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise KeyError(value["path"])
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    del files[path]
            else:
                raise ValueError(f"commit operation {key!r} is not supported by the local Hub (no LFS/Xet)")
        new = Commit(_oid(repo.repo_id, message, str(len(repo.commits)), *sorted(files)), message, files)
        repo.commits.append(new)
        return new


def _oid(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


def validate_card_yaml(content: str) -> list[str]:
    """The errors the local Hub finds in a README's YAML front matter (see the module docstring)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"YAML front matter does not parse: {err}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["YAML front matter must be a mapping"]
    errors = [f'"{key}" must be a list of strings' for key in ("tags", "datasets", "metrics")
              if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key]))]
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else (bases or []):
        if not isinstance(base, str) or not REPO_ID.match(base):
            errors.append(f'"base_model" must be a valid model id, got {base!r}')
    if "model-index" in meta:
        errors += _model_index_errors(meta["model-index"])
    return errors


def _model_index_errors(index: Any) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    errors = []
    for i, entry in enumerate(index):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f'"model-index[{i}].results" must be a list')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            result = result if isinstance(result, dict) else {}
            task, dataset = result.get("task") or {}, result.get("dataset") or {}
            if not isinstance(task.get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            for key in ("type", "name"):
                if not isinstance(dataset.get(key), str):
                    errors.append(f'"{where}.dataset.{key}" is required')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                metric = metric if isinstance(metric, dict) else {}
                if not isinstance(metric.get("type"), str):
                    errors.append(f'"{where}.metrics[{k}].type" is required')
                if not isinstance(metric.get("value"), (int, float, str)) or isinstance(metric.get("value"), bool):
                    errors.append(f'"{where}.metrics[{k}].value" is required (a number or a string)')
    return errors


def _handler_class(hub: LocalHub):
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing ----
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        record = Request(method, unquote(url.path), parse_qs(url.query), body=body)
        with self.hub.lock:
            self.hub.requests.append(record)
            failure = self._injected(method, record.path)
        if failure is not None:
            retry = {} if failure.retry_after is None else {"Retry-After": str(failure.retry_after)}
            self._send(failure.status, {"error": failure.message}, record, error_message=failure.message, extra=retry)
            return
        try:
            with self.hub.lock:
                status, payload, headers = _route(self.hub, method, url.path, record.query, body,
                                                  self.headers.get("Authorization", ""), self.headers)
        except Exception as err:  # noqa: BLE001 - a bug of the test server shows as a 500 with its message
            status, payload, headers = 500, {"error": f"local Hub: {type(err).__name__}: {err}"}, {}
        self._send(status, payload, record, head=method == "HEAD", **headers)

    def _injected(self, method: str, path: str) -> Failure | None:
        for failure in self.hub.failures:
            if failure.method == method and failure.pattern.search(path) and failure.times != 0:
                if failure.times is not None:
                    failure.times -= 1
                return failure
        return None

    def _send(self, status: int, payload: Any, record: Request, head: bool = False, error_code: str | None = None,
              error_message: str | None = None, extra: dict[str, str] | None = None) -> None:
        record.status = status
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", f"local-{len(self.hub.requests)}")
        if error_code:
            self.send_header("X-Error-Code", error_code)
        if error_message or (status >= 400 and isinstance(payload, dict) and "error" in payload):
            self.send_header("X-Error-Message", error_message or payload["error"])
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")


# ---- routes: (status, payload, send options) from the request; called under the hub's lock ----
API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _route(hub: LocalHub, method: str, raw_path: str, query, body: bytes, auth: str, headers):
    authorized = auth == f"Bearer {hub.token}"
    if method == "GET" and raw_path == "/api/whoami-v2":
        if not authorized:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        return 200, {"type": "user", "name": hub.user, "fullname": "Local Hub User", "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}, {}
    if method == "GET" and raw_path == "/api/agent-harnesses":
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}
    if method == "POST" and raw_path == "/api/repos/create":
        return _create_repo(hub, json.loads(body or b"{}"), authorized)
    if method == "POST" and raw_path == "/api/validate-yaml":
        errors = validate_card_yaml(json.loads(body).get("content", ""))
        return (400, {"errors": [{"message": e} for e in errors], "error": "; ".join(errors)}, {}) if errors \
            else (200, {"errors": [], "warnings": []}, {})
    match = API_REPO.match(raw_path)
    if match:
        return _repo_api(hub, method, unquote(match["repo"]), match["rest"] or "", query, body, authorized)
    match = RESOLVE.match(raw_path)
    if match and method in ("GET", "HEAD"):
        return _resolve(hub, unquote(match["repo"]), unquote(match["rev"]), unquote(match["path"]), headers)
    return 404, {"error": f"local Hub: no route for {method} {raw_path}"}, {}


def _create_repo(hub: LocalHub, payload: dict, authorized: bool):
    if not authorized:
        return 401, {"error": "Invalid credentials in Authorization header"}, {}
    if payload.get("type", "model") != "model":
        return 400, {"error": "local Hub: model repos only"}, {}
    namespace = payload.get("organization") or hub.user
    repo_id = f"{namespace}/{payload.get('name')}"
    if namespace != hub.user:
        return 403, {"error": f"You don't have the rights to create a model under the namespace \"{namespace}\""}, {}
    if not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        return 400, {"error": f"Invalid repo name {repo_id!r}"}, {}
    url = f"{hub.endpoint}/{repo_id}"
    if repo_id in hub.repos:
        return 409, {"error": "You already created this model repo", "url": url}, {}
    hub.create(repo_id, bool(payload.get("private")))
    return 200, {"url": url, "name": repo_id, "id": repo_id}, {}


def _not_found(repo_id: str):
    return 404, {"error": "Repository not found"}, {"error_code": "RepoNotFound"}


def _revision(repo: Repo, rev: str):
    commit = repo.at(rev)
    if commit is None:
        return None, (404, {"error": f"Invalid rev id: {rev}"}, {"error_code": "RevisionNotFound"})
    return commit, None


def _repo_api(hub: LocalHub, method: str, repo_id: str, rest: str, query, body: bytes, authorized: bool):
    repo = hub.repos.get(repo_id)
    if repo is None:
        return _not_found(repo_id)
    parts = [unquote(p) for p in rest.strip("/").split("/", 2)] if rest.strip("/") else []
    if method == "POST" and parts[:1] in (["preupload"], ["commit"]) and not authorized:
        return 401, {"error": "Invalid credentials in Authorization header"}, {}
    if method == "GET" and (not parts or parts[0] == "revision"):
        commit, error = _revision(repo, parts[1] if parts else "main")
        return error or (200, _info(hub, repo, commit), {})
    if method == "GET" and parts[0] == "tree":
        commit, error = _revision(repo, parts[1])
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        return error or _tree(commit, parts[2] if len(parts) > 2 else "", recursive)
    if method == "POST" and parts[0] == "paths-info":
        commit, error = _revision(repo, parts[1])
        wanted = json.loads(body).get("paths", []) if body.startswith(b"{") else parse_qs(body.decode()).get("paths",
                                                                                                              [])
        return error or (200, [_file_entry(p, commit.files[p]) for p in wanted if p in commit.files], {})
    if method == "POST" and parts[0] == "preupload":
        commit, error = _revision(repo, parts[1])
        files = json.loads(body)["files"]
        return error or (200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None}
            for f in files]}, {})
    if method == "POST" and parts[0] == "commit":
        if parts[1] != "main":
            return 400, {"error": f"local Hub: commits go to main only, not {parts[1]!r}"}, {}
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        try:
            new = hub.commit(repo, lines)
        except KeyError as err:
            return 404, {"error": f"A file with this name doesn't exist: {err}"}, {"error_code": "EntryNotFound"}
        except ValueError as err:
            return 400, {"error": str(err)}, {}
        return 200, {"success": True, "commitOid": new.oid, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{new.oid}",
                     "commitMessage": new.message}, {}
    return 404, {"error": f"local Hub: no route for {method} /api/models/{repo_id}{rest}"}, {}


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}


def _tree(commit: Commit, folder: str, recursive: bool):
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    if prefix and not any(p.startswith(prefix) for p in commit.files):
        return 404, {"error": f"{folder} does not exist on main"}, {"error_code": "EntryNotFound"}
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        for depth in range(1, len(rest)):  # the folders on the way
            if depth > 1 and not recursive:
                break
            name = prefix + "/".join(rest[:depth])
            entries.setdefault(name, {"type": "directory", "path": name, "oid": _oid(name), "size": 0})
        if recursive or len(rest) == 1:
            entries[path] = _file_entry(path, data)
    return 200, list(entries.values()), {}


def _info(hub: LocalHub, repo: Repo, commit: Commit) -> dict[str, Any]:
    readme = commit.files.get("README.md", b"").decode(errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---", readme, re.DOTALL)
    card = yaml.safe_load(match.group(1)) if match else None
    return {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": (card or {}).get("tags", []), "pipeline_tag": (card or {}).get("pipeline_tag"),
            "library_name": (card or {}).get("library_name"), "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)]}


def _resolve(hub: LocalHub, repo_id: str, rev: str, path: str, headers):
    repo = hub.repos.get(repo_id)
    if repo is None:
        return _not_found(repo_id)
    commit, error = _revision(repo, rev)
    if error:
        return error
    if path not in commit.files:
        return 404, {"error": "Entry not found"}, {"error_code": "EntryNotFound"}
    data = commit.files[path]
    extra = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
    start = re.match(r"bytes=(\d+)-$", headers.get("Range") or "")
    if start and int(start[1]) < len(data):
        offset = int(start[1])
        extra["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
        return 206, data[offset:], {"extra": extra}
    return 200, data, {"extra": extra}


# ---- pytest side: the server behind HF_ENDPOINT, for this process and for the processes it launches ----
@contextlib.contextmanager
def serving(home: Path) -> Iterator[LocalHub]:
    """Start a :class:`LocalHub` and point huggingface_hub at it: ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` (a
    fresh cache under ``home``), ``HF_HUB_OFFLINE=0`` in the environment (for launched processes, which read them at
    import), and the same values where this process read them at import (the suite runs offline):
    ``huggingface_hub.constants`` and the ``endpoint`` attribute of the clients made then (huggingface_hub's
    module-level ``HfApi`` behind ``file_exists``, ``create_repo``...; transformers' shared one if made). No method
    of ``HfApi`` or the Trainer is touched; everything is restored at the end."""
    from huggingface_hub import constants, hf_api
    from transformers.utils import hub as transformers_hub

    env = {"HF_ENDPOINT": None, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}
    with LocalHub() as hub, pytest.MonkeyPatch.context() as patch:
        env["HF_ENDPOINT"] = hub.endpoint
        for key, value in env.items():
            patch.setenv(key, value)
        for key, value in {"HF_HUB_OFFLINE": False, "ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(home / "hub"),
                           "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                           "HF_HUB_ETAG_TIMEOUT": 30}.items():
            patch.setattr(constants, key, value)
        for client in (hf_api.api, getattr(transformers_hub, "_hf_api", None)):
            if client is not None:
                patch.setattr(client, "endpoint", hub.endpoint)
        yield hub


@pytest.fixture
def local_hub(tmp_path) -> Iterator[LocalHub]:
    """A fresh local Hub for one test (see :func:`serving`)."""
    with serving(tmp_path / "hf_home") as hub:
        yield hub
