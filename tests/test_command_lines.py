"""Every command line of the project: each option has a help line, its default is shown
whole, and the help renders without cutting words."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools").glob("*.py")) + ["train/ddp.py"]
MODULES = ["attacks.audit", "attacks.frontier", "attacks.patch_trade"]


def parser_of(name: str) -> argparse.ArgumentParser:
    if name.endswith(".py"):
        return runpy.run_path(str(ROOT / name), run_name="help_check")["build_parser"]()
    return importlib.import_module(name).build_parser()


@pytest.mark.parametrize("name", SCRIPTS + MODULES)
def test_every_option_has_help_and_shows_its_default(name):
    parser = parser_of(name)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name}: {label} has no help line"
        default = action.default
        if default is None or default is False or default == []:
            continue  # a flag, or an option whose help says what leaving it out means
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        assert f"(default: {shown})" in text, f"{name}: {label} does not show {shown!r}"


@pytest.mark.parametrize("name", SCRIPTS + MODULES)
def test_help_cuts_no_word(name):
    text = parser_of(name).format_help()
    # a word cut by the wrapper leaves a line ending in a letter or '_' and the next line
    # starting with a lower-case fragment glued to nothing: look for the known symptom, an
    # identifier split across lines ("wrong_key\n   s")
    assert not re.search(r"[a-z]_[a-z]*\n\s+[a-z]+[,)]", text), text


def test_one_device_vocabulary():
    for name in ("tools/make_shards.py", "tools/predict.py", "attacks.audit"):
        text = parser_of(name).format_help()
        assert "cuda" in text and " gpu" not in text.replace("GPU", ""), (name, text)


def test_make_shards_threads_is_a_count_or_auto(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    parser = parser_of("tools/make_shards.py")
    assert parser.parse_args([]).threads == len(os.sched_getaffinity(0))  # auto: every core
    assert parser.parse_args(["--threads", "3"]).threads == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--threads", bad])
        assert "is not a positive count or auto" in capsys.readouterr().err
