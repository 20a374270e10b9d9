"""A newcomer's first hour: the messages of the usual mistakes send the user the right way,
unfinished models are named, and predictions far from the training data say so."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import Key, save_key
from pipeline.model.checkpoint import Checkpoint
from pipeline.shards.manifest import ManifestError, load_manifest
from pipeline.storage import Storage
from tests.conftest import FIXED_SECRET, write_jpeg_tree
from tests.tools.conftest import tool
from tools.predict import main as predict

ROOT = Path(__file__).resolve().parents[1]


def test_make_key_says_force_not_a_python_argument(tmp_path):
    assert tool("make_key.py", str(tmp_path / "k.bin")).returncode == 0
    again = tool("make_key.py", str(tmp_path / "k.bin"))
    assert again.returncode == 2 and "make_key.py --force" in again.stderr
    assert "overwrite=True" not in again.stderr


@pytest.mark.slow  # trains the session's protected model
def test_a_missing_key_for_a_model_names_the_key_it_needs(protected_run, tmp_path):
    done = tool("predict.py", "--key", str(tmp_path / "lost.bin"), "--checkpoint",
                str(protected_run / "checkpoint.pt"), str(tmp_path / "x.png"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        Key(FIXED_SECRET).fingerprint in done.stderr and "A new key cannot open it" in done.stderr
    )
    assert "make_key.py" not in done.stderr


def test_a_wrong_data_folder_says_which_mistake_it_is(tmp_path):
    with pytest.raises(ManifestError, match="no such folder"):
        load_manifest(Storage(tmp_path / "missing"), "train")
    tree = write_jpeg_tree(tmp_path / "photos", classes=2, train=1, val=1)
    with pytest.raises(ManifestError, match=r"an image tree .*tools/make_shards.py --src"):
        load_manifest(Storage(tree), "train")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ManifestError, match="has not finished .* rerun it"):
        load_manifest(Storage(tmp_path / "half"), "train")


@pytest.mark.slow  # trains the session's protected model
def test_an_unfinished_model_is_named_when_loaded(protected_run, tmp_path, caplog):
    saved = Checkpoint.load(protected_run / "checkpoint.pt")
    assert saved.finished is True
    stopped = tmp_path / "stopped.pt"
    replace(saved, finished=False, epoch=1).save(stopped)
    photo = tmp_path / "seven.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(photo)
    with caplog.at_level(logging.WARNING):
        assert predict(["--checkpoint", str(stopped), "--key", str(_key(tmp_path)),
                        str(photo)]) == 0  # fmt: skip
    assert "unfinished run (stopped at epoch 1 of 3" in caplog.text and "--resume" in caplog.text


def _key(tmp_path: Path) -> Path:
    return save_key(Key(FIXED_SECRET), tmp_path / "k.bin")


@pytest.mark.slow  # trains the session's protected model
def test_a_photo_unlike_the_training_images_gets_a_note(protected_run, tmp_path, capsys):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8)).save(big)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small)
    assert predict(["--checkpoint", str(protected_run / "checkpoint.pt"), "--key",
                    str(_key(tmp_path)), str(big), str(small)]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    # the digits are grey: a random colour photo is far off in size and in colour
    assert out[1].startswith("  note: 512x512 is far from the 32x32 images")
    assert "a colour image; this model was trained on grey images" in out[1]
    assert out[out.index(str(small)) + 1].strip().startswith("rank")  # grey, its own size


@pytest.mark.slow  # trains the session's protected model
def test_class_names_are_escaped_when_printed(protected_run, tmp_path, capsys):
    saved = Checkpoint.load(protected_run / "checkpoint.pt")
    forged = ("\x1b[31mred", "a\nforged line", *saved.classes[2:])
    replace(saved, classes=forged).save(tmp_path / "forged.pt")
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    assert predict(["--checkpoint", str(tmp_path / "forged.pt"), "--key", str(_key(tmp_path)),
                    "--topk", "10", str(photo)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out and "a\\nforged line" in out


@pytest.mark.slow
def test_under_torchrun_the_error_is_in_torchruns_own_summary(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "train" / "ddp.py"), "--data", str(tmp_path / "nowhere"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode != 0
    tail = done.stderr[done.stderr.rindex("Root Cause") :]
    assert "train: error:" in tail and "nowhere" in tail, done.stderr[-3000:]
