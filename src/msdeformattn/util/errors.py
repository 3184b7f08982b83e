"""The error a user's own mistake raises (a path, a flag, a config value, a file)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user: the command line prints it as one line and exits with 2.

    A ``ValueError``, so library callers catch it as one; bugs raise other types
    (or plain ``ValueError``) and keep their traceback.
    """
