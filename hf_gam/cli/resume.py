"""``hf-gam train`` resumes by itself, as transformers' example scripts do, but only from a complete checkpoint.

Decided from ``--output_dir`` before anything is computed or written (:func:`resume_point`):

- ``--resume_from_checkpoint PATH``: that folder, which must be complete (a one-line error otherwise);
- ``--overwrite_output_dir``: from scratch; the folder's old ``checkpoint-*`` folders are removed first;
- a finished run there (``all_results.json``): exit 2, naming ``--overwrite_output_dir``;
- a complete checkpoint there: "resuming from checkpoint-N" (newer torn ones are named and skipped);
- only torn checkpoints there: from scratch, with a warning; files that hf_gam did not write: exit 2.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from .common import UsageError

__all__ = ["PREEMPTED_STATUS", "Preempted", "resume_point"]

PREEMPTED_STATUS = 143  # 128 + SIGTERM: what a shell reports for a process ended by SIGTERM
FINISHED_MARKERS = ("all_results.json", "train_results.json")
_OURS = re.compile(r"^(checkpoint-\d+|runs|_.*\.tmp-\d+.*)$")  # written while a run is going


class Preempted(Exception):
    """``train`` stopped on SIGTERM (``--enable_jit_checkpoint``) after saving a checkpoint."""


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _main_process():
        print(f"hf-gam: {message}", file=sys.stderr, flush=True)


def resume_point(output_dir: str, explicit: str | None, overwrite: bool) -> str | None:
    """The checkpoint ``hf-gam train`` resumes from (``None``: from scratch); :class:`UsageError` when
    ``output_dir`` holds a finished run or foreign files (without ``--overwrite_output_dir``) or when the named
    checkpoint is incomplete."""
    from ..trainer.resume import checkpoint_problem, last_complete_checkpoint

    if explicit:
        problem = checkpoint_problem(explicit)
        if problem:
            raise UsageError(f"resume_from_checkpoint={explicit!r} cannot be resumed from: {problem}")
        return explicit
    entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if overwrite:
        if _main_process():
            for name in entries:
                if re.fullmatch(r"checkpoint-\d+", name):
                    shutil.rmtree(os.path.join(output_dir, name))
        return None
    hint = "pass --overwrite_output_dir to train from scratch into it, or choose another --output_dir"
    finished = [name for name in FINISHED_MARKERS if name in entries]
    if finished:
        raise UsageError(f"output_dir {output_dir} already holds a finished run ({finished[0]}); {hint}")
    foreign = [name for name in entries if not _OURS.match(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(f"output_dir {output_dir} holds files that are not from an hf-gam run ({shown}); {hint}")
    checkpoint = last_complete_checkpoint(output_dir, warn=_main_process())
    if checkpoint is not None:
        _say(f"resuming from {os.path.basename(checkpoint)} in {output_dir}")
    elif any(name.startswith("checkpoint-") for name in entries):
        _say(f"no complete checkpoint in {output_dir}; training from scratch")
    return checkpoint
