"""User-error exception types of the data side (reported by the CLI as one line, exit status 2)."""


class DataError(ValueError):
    """A dataset argument or a dataset's content that cannot be used (a user error, reported without traceback)."""
