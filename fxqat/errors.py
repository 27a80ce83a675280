"""Exceptions shared by the command line and the recipes it runs.

Example:
    >>> issubclass(UsageError, ValueError)
    True
"""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A user mistake reported as ``fxqat: error: ...`` with exit status 2."""
