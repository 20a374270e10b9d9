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

import re

# how torch's DataLoader re-raises a worker's exception: the same type, built from one string
# that carries the worker's traceback, whose last line is "...ErrorName: LINE"
_WRAPPED = re.compile(r"Caught (\w+) in DataLoader worker process \d+")


class KeyprotectError(Exception):
    """An error the user can cause and fix; the message names the input and what to do.

    Raised in a DataLoader worker, it reaches the main process as the same type with the one
    line the worker raised (torch's wrapping and the worker's traceback dropped), so a loader's
    error (a damaged shard, a sealed object that does not open, a store that does not answer)
    is still one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap(args[0]),)
        super().__init__(*args)


def _unwrap(message: str) -> str:
    found = _WRAPPED.match(message)
    if found is None:
        return message
    raised = re.compile(rf"(?:[\w.]+\.)?{found.group(1)}: (.*)")
    for line in reversed(message.splitlines()):
        line_found = raised.fullmatch(line)
        if line_found:
            return line_found.group(1)
    return message


class ConfigError(KeyprotectError, ValueError):
    """A setting (an option, an argument) that cannot work: names it, its value, and what is
    allowed."""
