"""The command lines of the README and the manual (docs/), taken from the pages, against the code.

The README's Quick start block runs as written, line after line, in an empty folder (with the
quick-run flags its table documents); every other tool line in the bash blocks of the README
and of every docs page is parsed by that tool's own argument parser, so a renamed or removed
option fails here. Every relative link of those pages points at a file that exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import load_key
from pipeline.shards.sealing import open_output

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINE_TIMEOUT = 300  # seconds per line; the whole quick run takes about a minute on 2 cores


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def command_lines(block: str) -> list[list[str]]:
    """Each command of a block as tokens: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    lines = (shlex.split(line, comments=True) for line in joined.splitlines())
    return [tokens for tokens in lines if tokens]


def quick_run_flags(text: str) -> dict[tuple[str, ...], list[str]]:
    """The quick-run table: ``| `line prefix` | `flags` |`` rows."""
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", text, re.M)
    assert rows, "the Quick start section has no quick-run flags table"
    return {tuple(shlex.split(line)): shlex.split(flags) for line, flags in rows}


def argv_of(tokens: list[str]) -> list[str]:
    """The venv's python for ``python``; ``torchrun`` as ``python -m torch.distributed.run``."""
    launchers = {
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    }
    assert tokens[0] in launchers, f"the Quick start runs only python and torchrun: {tokens}"
    return [*launchers[tokens[0]], *tokens[1:]]


def write_photo(path: Path) -> None:
    """A held-out digit from the tree make_shards.py cached, saved as JPEG (the README says so)."""
    from PIL import Image

    from pipeline.offline.digits import default_cache_dir

    digit = sorted((default_cache_dir() / "digits-64" / "val" / "7").glob("*.png"))[0]
    Image.open(digit).convert("RGB").save(path, quality=95)


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    text = section(README.read_text(), "Quick start")
    blocks = bash_blocks(text)
    assert len(blocks) == 1, "the Quick start section should hold one bash block"
    lines = command_lines(blocks[0])
    flags = quick_run_flags(text)
    used = {prefix: 0 for prefix in flags}

    work = tmp_path / "work"  # a fresh checkout's root, as far as the commands can tell
    work.mkdir()
    for folder in ("tools", "train"):
        (work / folder).symlink_to(ROOT / folder, target_is_directory=True)
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    # One thread per process: torch's spinning OpenMP threads crawl on a busy 2-core box.
    env = {**os.environ, "PYTHONPATH": pythonpath, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    outputs = []
    for tokens in lines:
        extra = []
        for prefix, more in flags.items():
            if tuple(tokens[: len(prefix)]) == prefix:
                used[prefix] += 1
                extra = more
        if "photo.jpg" in tokens and not (work / "photo.jpg").exists():
            write_photo(work / "photo.jpg")
        done = subprocess.run(
            [*argv_of(tokens), *extra], cwd=work, env=env, capture_output=True, text=True,
            timeout=LINE_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"README Quick start line failed ({done.returncode}): {shlex.join(tokens)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        outputs.append(done.stdout + done.stderr)
    assert all(used.values()), f"quick-run rows that match no Quick start line: {used}"

    # What the lines promise: each one's output is where the next one looks for it.
    shards = open_output(work / "shards", str(work / "data.key"))  # sealed: opens with the key
    assert b"ustar" not in (work / "shards" / "val-000000.tar").read_bytes()
    manifest = json.loads(shards.read_bytes("val.manifest.json"))
    assert manifest["total_samples"] > 0
    assert manifest["key_fingerprint"] == load_key(work / "k.bin").fingerprint
    run = work / "runs" / "protected"
    assert (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").read_text().strip()
    rows = json.loads((work / "report" / "results.json").read_text())
    assert {"correct_key", "no_key", "wrong_keys"} <= {row["scenario"] for row in rows}
    assert "photo.jpg" in outputs[-1] and "probability" in outputs[-1]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def parse_only(tokens: list[str], monkeypatch) -> argparse.Namespace | None:
    """Hand a README line's arguments to its tool's own parser, and stop right after parsing."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    if tokens[0] == "srun" and "torchrun" in tokens:  # the Slurm wrapper: check its torchrun
        tokens = tokens[tokens.index("torchrun") :]
    if tokens[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(tokens[1:])
        assert launcher.training_script in ("train/ddp.py", "tools/make_shards.py"), tokens
        tokens = ["python", launcher.training_script, *launcher.training_script_args]
    if tokens[:3] == ["python", "-m", "attacks"]:
        from attacks.audit import main

        args = tokens[3:]
    elif tokens[:3] == ["python", "-m", "attacks.frontier"]:
        from attacks.frontier import main

        args = tokens[3:]
    elif tokens[:3] == ["python", "-m", "attacks.patch_trade"]:
        from attacks.patch_trade import main

        args = tokens[3:]
    elif tokens[0] == "python" and tokens[1].startswith(("tools/", "train/")):
        main, args = (
            runpy.run_path(str(ROOT / tokens[1]), run_name="readme_check")["main"],
            tokens[2:],
        )
    else:
        return None  # make, pip: not this project's parsers
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        main(args)
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{shlex.join(tokens)} finished without parsing its arguments")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_of_every_page_parse(page, monkeypatch, capsys):
    lines = [tokens for block in bash_blocks(page.read_text()) for tokens in command_lines(block)]
    for tokens in lines:
        try:
            parse_only(tokens, monkeypatch)
        except SystemExit:
            pytest.fail(
                f"{page.name} line does not parse: {shlex.join(tokens)}\n{capsys.readouterr().err}"
            )


def test_the_pages_hold_the_command_lines():
    checked = sum(
        1
        for page in PAGES
        for block in bash_blocks(page.read_text())
        for tokens in command_lines(block)
        if tokens[0] in ("python", "torchrun", "srun")
    )
    assert checked >= 30, f"only {checked} command lines found; is the extraction broken?"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)}: link to {target} goes nowhere"
