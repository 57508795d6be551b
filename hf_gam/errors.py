"""The one base class of user errors: an input the user can fix (a flag, a dataset, a model, a metric, a
checkpoint). The ``hf-gam`` command line catches it once and reports it as one ``hf-gam: error: ...`` line with exit
status 2, no traceback. Each part of the package derives its own errors from it: :class:`DataError` (here, for
:mod:`hf_gam.data`), ``MetricLoadError`` (:mod:`hf_gam.metrics`), ``ModelLoadError`` (:mod:`hf_gam.cli.models`),
``UsageError`` (:mod:`hf_gam.cli.common`) and ``CheckpointMismatchError`` (:mod:`hf_gam.trainer.checkpoints`).
A ``ValueError``, so code that catches those keeps working. :class:`HubPushError` is not one: the push of a model
that trained well failed (exit status 3)."""


class UserError(ValueError):
    """An input the user can fix; its message names the field (or flag, or file) and the value."""


class DataError(UserError):
    """A dataset argument or a dataset's content that cannot be used."""


class HubPushError(RuntimeError):
    """A push to the Hub that failed after training succeeded (not a user error: ``hf-gam train`` reports it as one
    line naming the saved output, the repo and the ``hf upload`` command that pushes it later, exit status 3)."""

    def __init__(self, message: str, repo_id: str | None = None):
        super().__init__(message)
        self.repo_id = repo_id
