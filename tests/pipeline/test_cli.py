"""The one runner of every tool: a second Ctrl-C while the interrupted line is written."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline import cli


def test_a_second_interrupt_does_not_cut_the_line_that_says_how_to_continue(caplog):
    """Under torchrun the terminal's Ctrl-C reaches a rank, then the agent forwards another
    while the rank says where it stopped (reading its checkpoint): the line is written whole."""

    def job() -> None:
        raise KeyboardInterrupt

    def where_it_stopped() -> str:
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded one, mid-sentence
        return "stopped at step 7; continue with `python x.py --resume`"

    caplog.set_level("ERROR")
    try:
        code = cli.run("x", job, interrupted=where_it_stopped)
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("the second Ctrl-C cut the line into a traceback")
    assert code == cli.EXIT_INTERRUPTED
    assert "x: interrupted; stopped at step 7; continue with" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after
    with pytest.raises(KeyboardInterrupt):  # and Ctrl-C interrupts again
        os.kill(os.getpid(), signal.SIGINT)
