"""Which checkpoint a run resumes from: the newest *complete* one.

transformers' ``get_last_checkpoint`` takes the highest-numbered ``checkpoint-N`` folder, whole or torn. hf_gam adds a
commit point, as PyTorch's distributed checkpoint (``.metadata`` written last) and composer (a pointer moved after a
barrier) do: :data:`COMMIT_MARKER` is written into a checkpoint folder last, by the main process, after every process
has finished its part of the save (:func:`commit_checkpoint`). The resume scan (:func:`checkpoint_problem`) then
trusts a folder only when nothing says it is torn, checking cheaply (file headers, never tensors):

- transformers' JIT marker ``checkpoint-is-incomplete.txt`` is absent (it is removed when a SIGTERM save ends);
- every weight file is whole: a safetensors file's 8-byte header length, JSON header and data offsets cover the file
  exactly; ``.bin`` / ``.pt`` / ``.pth`` files (torch's zip format) have their central directory;
- ``trainer_state.json`` parses; the optimizer, scheduler and RNG files and ``gam_state.json`` are there (and whole).

Checkpoints written before the marker existed are trusted when they pass the same checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from typing import Any

from transformers.utils import logging

from ..atomic import WriteError, atomic_write_json
from ..errors import UserError

__all__ = ["COMMIT_MARKER", "JIT_MARKER", "IncompleteCheckpointError", "checkpoint_problem", "commit_checkpoint",
           "complete_checkpoints", "last_complete_checkpoint", "resolve_resume_checkpoint", "save_committed_checkpoint"]

logger = logging.get_logger(__name__)
COMMIT_MARKER = "hf_gam_checkpoint_complete.json"
JIT_MARKER = "checkpoint-is-incomplete.txt"  # transformers.trainer_jit_checkpoint's sentinel
GAM_STATE_NAME = "gam_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class IncompleteCheckpointError(UserError):
    """A checkpoint named for resuming is torn or incomplete (the message says which file and why)."""


def _safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a whole safetensors file, from its header alone, or ``None``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{os.path.basename(path)} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            return f"{os.path.basename(path)} is truncated (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{os.path.basename(path)} has an unreadable header"
    needed = 8 + n + max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if needed != size:
        return f"{os.path.basename(path)} is truncated (its tensors need {needed} bytes, the file has {size})"
    return None


def _zip_problem(path: str) -> str | None:
    """Why a ``torch.save`` file (zip format) is torn, from its central directory alone, or ``None``."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{os.path.basename(path)} is truncated or not a torch.save file"
    return None


def _file_problem(folder: str, name: str) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{name} is missing"
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith((".bin", ".pt", ".pth")):
        return _zip_problem(path)
    if name.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except ValueError:
            return f"{name} is not valid JSON"
    return None


def _weight_names(folder: str) -> list[str] | str:
    """The weight files the folder must hold (one file or an index's shards), or why none can be found."""
    for name in _INDEXES:
        if os.path.isfile(os.path.join(folder, name)):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    return [name, *sorted(set(json.load(f)["weight_map"].values()))]
            except (ValueError, KeyError):
                return f"{name} is not a valid weight index"
    present = [name for name in _WEIGHTS if os.path.isfile(os.path.join(folder, name))]
    return present or "the model weights are missing"


def _marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, COMMIT_MARKER), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _rng_names(folder: str, marker: dict | None) -> list[str] | str:
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"rng_state(_\d+)?\.pth", n))
    if not names:
        return "the RNG state (rng_state*.pth) is missing"
    if "rng_state.pth" in names:
        return names
    # written by several processes: only the commit marker (after a barrier) says that every one has finished
    if marker is None:
        return f"it was written by several processes and has no {COMMIT_MARKER} (not every process may have finished)"
    return [f"rng_state_{i}.pth" for i in range(int(marker.get("world_size", len(names))))]


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be resumed from (a short reason naming the file), or ``None`` when it is complete."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return "it is not a folder"
    if os.path.exists(os.path.join(folder, JIT_MARKER)):
        return f"{JIT_MARKER} is there (a SIGTERM save was interrupted)"
    marker = _marker(folder)
    names = ["trainer_state.json", "optimizer.pt", "scheduler.pt", GAM_STATE_NAME]
    for found in (_weight_names(folder), _rng_names(folder, marker)):
        if isinstance(found, str):
            return found
        names += found
    for name in names:
        problem = _file_problem(folder, name)
        if problem:
            return problem
    return None


def commit_checkpoint(folder: str | os.PathLike, global_step: int, world_size: int = 1) -> None:
    """Write the commit marker, last (on the main process, after every process finished its part of the save)."""
    atomic_write_json(os.path.join(os.fspath(folder), COMMIT_MARKER),
                      {"global_step": global_step, "world_size": world_size})


def _numbered(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, reverse=True)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, newest first (no warnings)."""
    return [path for _, path in _numbered(os.fspath(output_dir)) if checkpoint_problem(path) is None]


def last_complete_checkpoint(output_dir: str | os.PathLike, *, warn: bool = True) -> str | None:
    """The newest complete checkpoint of ``output_dir``; each newer incomplete one is skipped with one warning line
    naming the folder and why (``warn``)."""
    for _, path in _numbered(os.fspath(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """What ``train(resume_from_checkpoint=...)`` resumes from: ``True`` -> the newest complete checkpoint of
    ``output_dir`` (``ValueError`` when there is none, as the Trainer); a path -> that folder, which must be
    complete (:class:`IncompleteCheckpointError` otherwise: a named folder is never silently replaced)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint found in output_dir {output_dir}")
        return found
    path = os.fspath(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise IncompleteCheckpointError(
            f"resume_from_checkpoint={path!r} cannot be resumed from: {problem}. Pass resume_from_checkpoint=True "
            "to resume from the newest complete checkpoint")
    return path


def _discard(folder: str) -> None:
    """Remove a leftover folder of the step about to be saved (a torn one from a crash, or one saved again): the
    marker first, so that no moment shows a marker over partial files."""
    try:
        os.remove(os.path.join(folder, COMMIT_MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def save_committed_checkpoint(trainer: Any, model: Any, trial: Any, save: Callable[[Any, Any], None]) -> None:
    """``Trainer._save_checkpoint`` with a commit point: a leftover folder of this step is removed first; ``save``
    (the stock method) writes the checkpoint without rotating; every process waits for the others; the main process
    writes :data:`COMMIT_MARKER` and only then deletes old checkpoints (``save_total_limit``), so a crash at any moment
    leaves the previous complete checkpoint in place. A failed write (full disk, unwritable folder) raises
    :class:`~hf_gam.atomic.WriteError` naming the folder and the checkpoint that is still complete."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args = trainer.args
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    if args.should_save and os.path.isdir(folder):
        _discard(folder)
    trainer.accelerator.wait_for_everyone()
    limit, args.save_total_limit = args.save_total_limit, None  # no rotation before the commit
    try:
        save(model, trial)
    except OSError as err:
        previous = last_complete_checkpoint(run_dir, warn=False)
        kept = f"the last complete checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
        raise WriteError(err.errno, f"saving checkpoint {folder} failed: {err}; {kept}") from err
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        commit_checkpoint(folder, trainer.state.global_step, args.world_size)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
