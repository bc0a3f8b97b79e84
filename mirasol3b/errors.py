"""The errors a user can fix: a bad config, a missing dataset or checkpoint, a file that cannot be
read. Every entry point prints one of these as `error: <message>` and exits with status 1
(`mirasol3b/cli.py`); any other exception is a bug and keeps its traceback.

No dependencies, so `data/` can raise them too (it reaches the library through this module only).
"""

from __future__ import annotations

from typing import Any

EXIT_STATUS = 1  # what `sys.exit("error: ...")` gives, which scripts and tests already expect


class Error(Exception):
    """Base of every error an entry point reports as one line."""


class ConfigError(Error, ValueError):
    """A config field holds an impossible value."""

    def __init__(self, field: str, expected: str | None = None, got: Any = None):
        if expected is None:  # a whole message: ml_collections re-raises an error of a config file
            super().__init__(field)  # as `type(e)(str(e))`, with the field's name in the text
            self.field = None
            return
        super().__init__(f"config.{field}: expected {expected}, got {got!r}")
        self.field = field


class NotFoundError(Error, FileNotFoundError):
    """Something a run needs is not where it was looked for (a dataset, a checkpoint, a vocabulary)."""


class CheckpointMismatchError(Error, ValueError):
    """A checkpoint's arrays do not fit the model: missing, unexpected or differently shaped paths."""


class CheckpointCorruptError(Error, RuntimeError):
    """A checkpoint could be read, but its arrays differ from what was written (or no checkpoint of
    a run could be restored)."""
