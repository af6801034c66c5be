"""Errors a user can act on.

`UserError` is the one exception the CLI turns into a one-line message and exit status 2: bad recipes,
missing or corrupt files, checkpoints that do not match. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line (``where: what``) and exit status 2."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


class CorruptData(UserError):
    """Compressed data that fails validation (bad offsets, lengths, checksums, truncation)."""
