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

The answers themselves (one function per endpoint, the YAML check, the repos' data) are in tests/local_hub_routes.py.
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
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from local_hub_routes import (  # noqa: F401 (TOKEN, USER, git_blob_sha1, validate_card_yaml: for the tests)
    TELEMETRY,
    TOKEN,
    USER,
    Commit,
    Repo,
    git_blob_sha1,
    object_id,
    route,
    validate_card_yaml,
)


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
        self.repos[repo_id] = Repo(repo_id, private, [Commit(object_id(repo_id, "initial commit"), "initial commit",
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
        new = Commit(object_id(repo.repo_id, message, str(len(repo.commits)), *sorted(files)), message, files)
        repo.commits.append(new)
        return new


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
                status, payload, headers = route(self.hub, method, url.path, record.query, body,
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

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")


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
