"""``hf-gam train --push_to_hub``: checks before any compute, the final push, and what a failed push tells the user.

Before training (exit status 2, nothing computed or written): ``hub_model_id`` must be a valid repo id, the Hub must
be reachable (not ``HF_HUB_OFFLINE``), a token must exist and the Hub must accept it. After training, the push is
``GAMTrainer.push_to_hub`` (the model, its processor, the card; retried once after a transient failure; failed
``hub_strategy`` pushes raise). When it fails for good, :class:`~hf_gam.errors.HubPushError` carries one line:
the cause, the saved output folder, the repo, and the ``hf upload`` command that pushes it later (exit status 3).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from .common import UsageError

__all__ = ["check_hub_model_id", "check_push", "push_trained", "upload_command"]

IGNORED = ("checkpoint-*", "_*")  # what Trainer.push_to_hub leaves out of the output folder


def check_hub_model_id(repo_id: str | None, output_dir: str | None = None) -> None:
    """A ``hub_model_id`` the Hub can create: ``name`` or ``owner/name``, each part of letters, digits, ``-``,
    ``_``, ``.``, not starting or ending with ``-`` or ``.``, no ``--`` or ``..``, at most 96 characters
    (huggingface_hub's ``validate_repo_id``). Without one the Trainer names the repo after ``output_dir``'s last
    folder, which must then be such a name."""
    if repo_id is None and output_dir is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = repo_id if repo_id is not None else _name(output_dir)
    try:
        if name.count("/") > 1:
            raise HFValidationError("a repo id is 'name' or 'owner/name', with at most one '/'")
        validate_repo_id(name)
    except HFValidationError as err:
        cause = " ".join(str(err).split())
        if repo_id is None:
            raise UsageError(f"hub_model_id: not set, so the repo would be named after output_dir {output_dir!r}: "
                             f"{name!r} is not a valid Hub repo name ({cause}); pass --hub_model_id") from err
        raise UsageError(f"hub_model_id: {repo_id!r} is not a valid Hub repo id: {cause}") from err


def check_push(args: Any) -> None:
    """Fail early, before any compute, when ``--push_to_hub`` cannot succeed (a bad repo id, offline, no token, a
    rejected token)."""
    if not args.push_to_hub:
        return
    check_hub_model_id(args.hub_model_id, args.output_dir)
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UsageError("push_to_hub: the Hugging Face Hub is unreachable in offline mode (HF_HUB_OFFLINE=1); "
                         "unset it or drop --push_to_hub")
    token = args.hub_token or get_token()
    if not token:
        raise UsageError("push_to_hub: no Hugging Face token found; run `hf auth login`, set HF_TOKEN, or pass "
                         "--hub_token")
    try:
        HfApi().whoami(token=token)
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"push_to_hub: the Hub did not accept the token ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from err


def upload_command(repo_id: str, output_dir: str) -> str:
    """The ``hf upload`` command that pushes ``output_dir`` as ``Trainer.push_to_hub`` would have."""
    excludes = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in IGNORED)
    return f"hf upload {repo_id} {shlex.quote(str(output_dir))} . {excludes} --commit-message 'hf-gam train'"


def push_trained(trainer: Any, card: dict[str, Any]) -> None:
    """The final push (``GAMTrainer.push_to_hub`` with the run's card); a failure becomes one
    :class:`HubPushError` line naming the saved output, the repo and the command that pushes it later."""
    from ..errors import HubPushError
    from ..trainer.hub import describe_error

    args = trainer.args
    try:
        trainer.push_to_hub(commit_message="hf-gam train", **card)
    except Exception as err:  # noqa: BLE001 - training succeeded: say where the model is and how to push it
        repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or f"<you>/{_name(args.output_dir)}"
        cause = str(err) if isinstance(err, HubPushError) else describe_error(err)
        later = upload_command(repo_id, args.output_dir)
        raise HubPushError(f"push_to_hub: the push to {repo_id} failed ({cause}); training succeeded and the model "
                           f"is saved in {args.output_dir}; push it later with `{later}`", repo_id) from err


def _name(output_dir: str) -> str:
    return os.path.basename(os.path.normpath(output_dir))
