"""The answers of the local Hub (tests/local_hub.py): its data (repos, commits), the Hub's check of a card's YAML
and one function per endpoint, each giving ``(status, payload, send options)`` for a request. The server, its
request log and its injected failures live in tests/local_hub.py; the endpoints and limits are listed there."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import yaml

if TYPE_CHECKING:
    from local_hub import LocalHub

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


def object_id(*parts: str) -> str:
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


# ---- routes: (status, payload, send options) from the request; called under the hub's lock ----
API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def route(hub: LocalHub, method: str, raw_path: str, query, body: bytes, auth: str, headers):
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
            entries.setdefault(name, {"type": "directory", "path": name, "oid": object_id(name), "size": 0})
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
