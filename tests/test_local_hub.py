"""The local Hub (tests/local_hub.py) answers huggingface_hub's real client as the Hub does: repos, YAML validation,
commits, info, tree, downloads, the Hub's error headers, injected failures. Seconds, in-process."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from local_hub import TOKEN, git_blob_sha1, validate_card_yaml

CARD = """---
tags:
- gam
datasets:
- digits
model-index:
- name: x
  results:
  - task: {type: image-classification, name: Image Classification}
    dataset: {type: digits, name: digits, split: test}
    metrics:
    - {type: accuracy, value: 0.9, name: Top-1 accuracy}
---
# x
"""


def _folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(CARD)
    (folder / "a.txt").write_text("hello")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    return folder


def test_push_and_pull_through_the_real_client(local_hub, tmp_path):
    api = HfApi()
    assert api.whoami()["name"] == "me"
    assert api.create_repo("x").repo_id == "me/x"  # no owner: the token's user
    assert api.create_repo("me/x", exist_ok=True).repo_id == "me/x"  # 409 + url, accepted with exist_ok
    first = api.upload_folder(repo_id="me/x", folder_path=_folder(tmp_path), commit_message="up")
    again = api.upload_folder(repo_id="me/x", folder_path=_folder(tmp_path), commit_message="same files")
    assert again.oid == first.oid and len(local_hub.commits("me/x")) == 2  # unchanged files: no empty commit
    info = api.model_info("me/x")
    assert info.sha == first.oid and info.card_data["tags"] == ["gam"]
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "README.md", "a.txt", "sub/b.bin"]
    tree = {f.path: f for f in api.list_repo_tree("me/x", recursive=True)}
    assert set(tree) == {".gitattributes", "README.md", "a.txt", "sub", "sub/b.bin"}
    assert tree["a.txt"].blob_id == git_blob_sha1(b"hello") and tree["sub/b.bin"].size == 1024
    assert [f.path for f in api.list_repo_tree("me/x", path_in_repo="sub")] == ["sub/b.bin"]
    assert open(hf_hub_download("me/x", "sub/b.bin"), "rb").read() == bytes(range(256)) * 4
    snapshot = snapshot_download("me/x")
    assert snapshot.endswith(first.oid) and open(f"{snapshot}/a.txt").read() == "hello"
    methods = [(r.method, r.path) for r in local_hub.requests]
    assert ("POST", "/api/validate-yaml") in methods and ("POST", "/api/models/me/x/commit/main") in methods
    assert ("HEAD", "/me/x/resolve/main/sub/b.bin") in methods


def test_errors_carry_the_hubs_headers(local_hub, tmp_path):
    api = HfApi()
    api.create_repo("me/x")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("me/x", revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("me/x", "missing.txt")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("someone-else/x")
    assert err.value.response.status_code == 403
    assert local_hub.seen("HEAD", "missing.txt")[0].status == 404


def test_validate_yaml_checks_model_index_as_the_hub(local_hub, tmp_path):
    api = HfApi()
    api.create_repo("me/x")
    folder = _folder(tmp_path)
    broken = CARD.replace("type: digits, ", "").replace("value: 0.9, ", "")
    (folder / "README.md").write_text(broken)
    with pytest.raises(ValueError, match=r"dataset\.type\" is required") as err:
        api.upload_folder(repo_id="me/x", folder_path=folder)
    assert "metrics[0].value" in str(err.value) and len(local_hub.commits("me/x")) == 1  # nothing committed
    assert validate_card_yaml(CARD) == []
    assert validate_card_yaml("---\nbase_model: ./local/dir\n---\n") != []
    assert validate_card_yaml("---\nmodel-index:\n- name: x\n  results:\n  - task: {type: t}\n    dataset: "
                              "{type: d, name: d}\n    metrics: []\n---\n") == [
        '"model-index[0].results[0].metrics" must be a non-empty list']


def test_injected_failures_and_tokens(local_hub, tmp_path):
    """A commit that fails once: ``HfApi.create_commit`` posts it once and raises; ``upload_folder`` (hf_xet's
    pipeline, installed here) retries it with backoff (honouring ``Retry-After``) and succeeds."""
    from huggingface_hub import CommitOperationAdd

    api = HfApi()
    api.create_repo("me/x")
    local_hub.fail("POST", r"/commit/", status=500, times=1)
    with pytest.raises(HfHubHTTPError, match="local Hub failure injected") as err:
        api.create_commit("me/x", [CommitOperationAdd("a.txt", b"hello")], commit_message="once")
    assert err.value.response.status_code == 500
    api.create_commit("me/x", [CommitOperationAdd("a.txt", b"hello")], commit_message="again")
    local_hub.fail("POST", r"/commit/", status=503, times=1, retry_after=0)
    api.upload_folder(repo_id="me/x", folder_path=_folder(tmp_path))
    assert [r.status for r in local_hub.seen("POST", "/commit/")] == [500, 200, 503, 200]
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").upload_folder(repo_id="me/x", folder_path=_folder(tmp_path), commit_message="x")
    assert err.value.response.status_code == 401
    assert all(TOKEN.encode() not in r.body for r in local_hub.requests)  # the token travels in headers only
