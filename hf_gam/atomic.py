"""Writes that a crash cannot tear: every file hf_gam writes itself goes to a temporary name in the same folder, is
flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows). A crash at any moment
leaves the old file or the new one, never half of one; a failed write leaves the old file and no temporary behind
and raises :class:`WriteError` naming the target path."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import IO, Any

__all__ = ["WriteError", "atomic_save", "atomic_write", "atomic_write_json", "staged_folder"]


class WriteError(OSError):
    """A file could not be written (unwritable folder, full disk, failing device); names the path."""


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)  # the extension stays last: writers that infer the format from it still work
    return os.path.join(folder, f"_{root}.tmp-{os.getpid()}{ext}")  # "_*": skipped by the Trainer's Hub uploads


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def _cleanup_on_failure(tmp: str, path: str) -> Iterator[None]:
    """Remove the temporary on any failure; an ``OSError`` becomes a :class:`WriteError` naming ``path``."""
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(err.errno, f"could not write {path}: {err.strerror or err}") from err
        raise


def atomic_save(path: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """Call ``save(temporary_path)`` (any writer that takes a path: ``ModelCard.save``, ``savefig``,
    ``safetensors.torch.save_file``), then rename the result to ``path``."""
    path = os.fspath(path)
    tmp = _temporary_name(path)
    with _cleanup_on_failure(tmp, path):
        save(tmp)
        _commit(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` gets the whole content when the block ends without an
    exception, and is left as it was otherwise."""
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode ('w', 'wb'); got {mode!r}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    path = os.fspath(path)
    tmp = _temporary_name(path)
    with _cleanup_on_failure(tmp, path):
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        _commit(tmp, path)


def atomic_write_json(path: str | os.PathLike, value: Any, **dump_kwargs: Any) -> None:
    """``json.dump(value)`` to ``path`` atomically (keys sorted and indented as transformers' ``save_metrics``)."""
    dump_kwargs.setdefault("indent", 4)
    with atomic_write(path) as f:
        json.dump(value, f, **dump_kwargs)
        f.write("\n")


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[str]:
    """``with staged_folder(out) as tmp: writer(tmp)``: files written into the temporary folder ``tmp`` (inside
    ``out``) are renamed into ``out`` one by one when the block ends without an exception, so every file of ``out``
    is at every moment either its old or its new version; on failure ``tmp`` is removed and ``out`` is untouched."""
    import shutil

    folder = os.fspath(folder)
    tmp = os.path.join(folder, f"_staging.tmp-{os.getpid()}")
    try:
        os.makedirs(tmp, exist_ok=True)
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                source = os.path.join(root, name)
                target = os.path.join(folder, os.path.relpath(source, tmp))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                _commit(source, target)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise WriteError(err.errno, f"could not write {folder}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
