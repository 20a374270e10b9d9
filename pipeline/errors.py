"""The one base class of errors a user can cause, and can fix.

Every error raised for bad input, a missing or mismatched file, a refused overwrite or an
unreachable store derives from :class:`KeyprotectError`, and its message says what is wrong,
where (file, shard, sample), and what to do. The command-line runner
(:func:`pipeline.cli.run`) prints these in one line with exit code 2; any other exception is a
programming error and shows its traceback.

Most subclasses also derive from ``ValueError`` or ``RuntimeError`` (as they always have), so
callers that caught those keep working.
"""

from __future__ import annotations


class KeyprotectError(Exception):
    """An error the user can cause and fix; the message names the input and what to do."""


class ConfigError(KeyprotectError, ValueError):
    """A setting (an option, an argument) that cannot work: names it, its value, and what is
    allowed."""
