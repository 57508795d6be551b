"""Pushes to the Hub that never fail silently.

transformers' ``Trainer`` pushes during training (``hub_strategy`` every_save / checkpoint / all_checkpoints) as
futures whose results it never reads: a refused commit vanishes. :class:`BackgroundPushes` watches those futures,
logs a failure as a warning naming the step and the repo when it happens, and :meth:`BackgroundPushes.raise_failed`
turns them into a :class:`HubPushError` at the final push. :func:`push_retrying_once` runs a push again once after a
transient failure (408, 429, 5xx, a dropped connection): huggingface_hub retries file uploads, and the commit itself
only in its hf_xet pipeline (``HfApi.create_commit``, its path without hf_xet, posts it once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

from ..errors import HubPushError

__all__ = ["BackgroundPushes", "HubPushError", "describe_error", "final_push", "is_transient",
           "push_retrying_once"]

logger = logging.getLogger(__name__)
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_PAUSE_S = 2.0
Result = TypeVar("Result")


def describe_error(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (the Hub's errors span several), cut to ``limit`` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_transient(err: BaseException) -> bool:
    """A failure worth one more try: an HTTP 408 / 429 / 5xx answer or a network error (no answer at all)."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        response = err.response
        return response is not None and response.status_code in TRANSIENT_STATUS
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


def push_retrying_once(push: Callable[[], Result], repo_id: str | None) -> Result:
    """``push()``, run a second time (after a short pause) when the first attempt fails transiently."""
    try:
        return push()
    except Exception as err:  # noqa: BLE001 - anything not transient propagates unchanged
        if not is_transient(err):
            raise
        logger.warning(f"push to the Hub ({repo_id}) failed: {describe_error(err)}; retrying once in "
                       f"{RETRY_PAUSE_S:g} s")
    time.sleep(RETRY_PAUSE_S)
    return push()


def final_push(push: Callable[[], Result], background: BackgroundPushes, repo_id: str | None,
               blocking: bool = True) -> Result:
    """The end-of-training push: ``push()`` (:func:`push_retrying_once` when ``blocking``), then
    :meth:`BackgroundPushes.raise_failed` (the stock push waits for the background ones before uploading)."""
    result = push_retrying_once(push, repo_id) if blocking else push()
    background.raise_failed(repo_id)
    return result


class BackgroundPushes:
    """The ``hub_strategy`` pushes of a run: each future with the step that started it and what it uploads
    (``Trainer._push_from_checkpoint`` starts the model files' push, then the checkpoint's)."""

    KINDS = ("model files", "checkpoint")

    def __init__(self) -> None:
        self.jobs: list[tuple[Future, str]] = []

    def watch(self, jobs: Iterable[Future], step: int, repo_id: str | None) -> None:
        new = [job for job in jobs if not any(job is known for known, _ in self.jobs)]
        for kind, job in zip(self.KINDS, new):
            what = f"step {step} ({kind}, {repo_id})"
            self.jobs.append((job, what))
            job.add_done_callback(lambda done, what=what: self._log(done, what))

    @staticmethod
    def _log(job: Future, what: str) -> None:
        if not job.cancelled() and job.exception() is not None:
            logger.warning(f"push to the Hub at {what} failed: {describe_error(job.exception())}")

    def failures(self) -> list[tuple[str, BaseException]]:
        """The finished pushes that failed, read from the futures themselves (a done-callback may not have run)."""
        return [(what, job.exception()) for job, what in self.jobs
                if job.done() and not job.cancelled() and job.exception() is not None]

    def raise_failed(self, repo_id: str | None) -> None:
        failed = self.failures()
        if failed:
            listed = "; ".join(f"{what}: {describe_error(err, 160)}" for what, err in failed)
            raise HubPushError(f"{len(failed)} push(es) to the Hub during training failed, so the Hub may lack what "
                               f"they carried: {listed}", repo_id)
