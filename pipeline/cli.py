"""The command-line boundary every tool shares: one parser style, logging, and one runner.

    def main(argv: list[str] | None = None) -> int:
        args = build_parser().parse_args(argv)
        return cli.run("make_key", lambda: make_key(...))

``run`` turns a user error (:class:`pipeline.errors.KeyprotectError`) or an OS error at a
boundary (a missing file, a full disk, an unreachable store) into one line on stderr and exit
code 2; Ctrl-C into one line (what to run to continue, when the tool can resume) and exit 130;
anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable

from pipeline.errors import KeyprotectError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default shown in its help line
    (flags that are off and options whose help says what leaving them out means excepted)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # wrap at spaces only: a long comma-separated list stays whole instead of being cut
        # mid-word ("wrong_key s")
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(doc: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is ``doc`` (the tool's docstring, with its
    command lines) and whose help shows every default."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter, **kwargs)


def add_data_key(parser: argparse.ArgumentParser, what: str = "sealed shards") -> None:
    """``--data-key DATAKEY``, the same on every reader of shards (docs/sealing.md)."""
    parser.add_argument(
        "--data-key",
        metavar="DATAKEY",
        help=f"the data key of {what} (make_shards --seal); left out: the file named by "
        "$KEYPROTECT_DATA_KEY, if set",
    )


def one_line(text: object) -> str:
    """``text`` with control characters escaped, so that a name from a file or a checkpoint can
    neither forge a log line (newline) nor drive the terminal (ANSI escapes)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def setup_logging(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    tag_ranks: bool = True,
    verbose: bool = False,
) -> None:
    """INFO from rank 0 (or the one process; DEBUG too when ``verbose``), WARNING and up from
    the others, tagged with their rank under torchrun (unless ``tag_ranks`` is False)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    prefix = f"[rank {rank}/{world}] " if world > 1 and tag_ranks else ""
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"{prefix}%(message)s")
    if verbose:  # this project's lines, not every library's
        for noisy in ("fsspec", "s3fs", "botocore", "aiobotocore", "urllib3", "PIL", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.INFO)


def error_text(exc: BaseException) -> str:
    """The one line a user error or OS error prints as (without the tool's name)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return one_line(f"{exc.filename}: {exc.strerror}")
    return one_line(exc)


def tell_launcher(line: str) -> None:
    """Under torchrun, hand this rank's one-line error to torchrun (its error file), so that
    the summary torchrun prints last shows it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:  # the launcher's file is a convenience; the log line is already out
        pass


def run(
    prog: str,
    job: Callable[[], int | None],
    *,
    interrupted: Callable[[], str] | str | None = None,
    log: logging.Logger | None = None,
    quiet_interrupt: bool = False,
) -> int:
    """Run ``job``; return its exit code (0 for None), 2 for a user error, 130 for Ctrl-C.

    ``interrupted`` is what to tell the user after Ctrl-C (e.g. the exact command that
    resumes), or a callable that returns it when asked; ``quiet_interrupt`` says nothing on
    Ctrl-C (the other ranks of a torchrun job, where rank 0 speaks for all). ``log``: the logger
    to write to (the tool's own; default: the logger named ``prog``).
    """
    logger = log or logging.getLogger(prog)
    try:
        code = job()
    except (KeyprotectError, OSError) as exc:  # OSError: a file in the way, disk full, ...
        line = f"{prog}: error: {error_text(exc)}"
        logger.error("%s", line)
        tell_launcher(line)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if quiet_interrupt:
            return EXIT_INTERRUPTED
        with _deaf():  # torchrun's agent forwards the terminal's Ctrl-C: a second one arrives
            hint = interrupted() if callable(interrupted) else interrupted
            logger.error("%s: interrupted%s", prog, f"; {hint}" if hint else "")
        return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


@contextlib.contextmanager
def _deaf():
    """SIGINT and SIGTERM ignored meanwhile (main thread only): the line that says what was
    kept and how to continue is written whole, not cut by the next signal into a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
