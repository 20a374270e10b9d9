"""Every command line takes its default folders from pipeline.paths, so they compose."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest

from attacks.audit import parse_args as attacks_args
from pipeline import paths

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> dict:
    return runpy.run_path(str(ROOT / name), run_name="paths_check")


def parsed_defaults(main, monkeypatch) -> argparse.Namespace:
    """What ``main([])`` parses, stopping before it does anything."""

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(Parsed) as parsed:
        main([])
    return parsed.value.args[0]


def test_defaults_compose(monkeypatch):
    make_shards = tool("tools/make_shards.py")["build_parser"]().parse_args(["--key", "k.bin"])
    train = tool("train/ddp.py")["parse_args"]([])
    audit = attacks_args(["--key", "k.bin"])
    predict = tool("tools/predict.py")["build_parser"]().parse_args(["photo.jpg"])
    verify = parsed_defaults(tool("tools/verify_shards.py")["main"], monkeypatch)
    # make_shards writes where the others read; training writes the checkpoint the others read
    assert make_shards.out == verify.out == train.data == audit.data == paths.SHARDS
    assert f"{train.out}/checkpoint.pt" == audit.checkpoint == predict.checkpoint
