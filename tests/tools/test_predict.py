"""tools/predict.py: the shards' predictions from plain files, and clear refusals."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pipeline import Key, save_key
from pipeline.model.evaluation import load_model, load_split, predict
from tests.conftest import FIXED_SECRET
from tests.pipeline.model.test_classifier import val_sources
from tests.tools.conftest import tool
from tools.predict import main

pytestmark = pytest.mark.slow  # the session's protected model is trained for these

OTHER_SECRET = bytes(range(100, 132))


@pytest.fixture
def checkpoint(protected_run) -> str:
    return str(protected_run / "checkpoint.pt")


def test_predict_matches_the_val_shards(checkpoint, digit_shards, test_key_file):
    split = load_split(str(digit_shards))
    model, _ = load_model(checkpoint)
    count = 12
    probs = torch.from_numpy(predict(model, split.images[:count])).softmax(1).numpy()
    paths = [str(p) for p in val_sources(digit_shards)[:count]]

    done = tool("predict.py", "--key", str(test_key_file), "--checkpoint", checkpoint,
                "--topk", "10", "--json", *paths)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["key_fingerprint"] == Key(FIXED_SECRET).fingerprint
    assert [p["file"] for p in out["predictions"]] == paths
    for prediction, expected in zip(out["predictions"], probs, strict=True):
        top = prediction["top"]
        assert top[0]["class"] == split.classes[expected.argmax()]  # same class as the shards
        got = {t["class"]: t["probability"] for t in top}  # all 10 classes: the whole softmax
        np.testing.assert_allclose([got[c] for c in split.classes], expected, atol=1e-5)
    assert FIXED_SECRET.hex() not in done.stdout + done.stderr


def test_table_shows_topk_rows_per_image(checkpoint, digit_shards, test_key_file, capsys):
    paths = [str(p) for p in val_sources(digit_shards)[:2]]
    assert main(["--key", str(test_key_file), "--checkpoint", checkpoint, "--topk", "3",
                 *paths]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and lines[5] == paths[1]
    assert lines[1].split() == ["rank", "probability", "class"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert all(line.split()[1].endswith("%") for line in lines[2:5])


def test_a_wrong_key_is_refused(checkpoint, digit_shards, tmp_path):
    wrong = save_key(Key(OTHER_SECRET), tmp_path / "wrong.bin")
    image = str(val_sources(digit_shards)[0])
    done = tool("predict.py", "--key", str(wrong), "--checkpoint", checkpoint, image)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("predict: error: ") and len(done.stderr.splitlines()) == 1
    assert checkpoint in done.stderr
    assert Key(FIXED_SECRET).fingerprint in done.stderr
    assert Key(OTHER_SECRET).fingerprint in done.stderr
    for secret in (OTHER_SECRET, FIXED_SECRET):
        assert secret.hex() not in done.stderr


@pytest.mark.parametrize("case", ["undecodable", "missing image", "missing checkpoint", "no key"])
def test_errors_are_one_clear_line(case, checkpoint, test_key_file, tmp_path, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a but not really")
    args = {
        "undecodable": ["--key", str(test_key_file), "--checkpoint", checkpoint, str(bad)],
        "missing image": ["--key", str(test_key_file), "--checkpoint", checkpoint,
                          str(tmp_path / "nope.png")],
        "missing checkpoint": ["--key", str(test_key_file), "--checkpoint",
                               str(tmp_path / "none.pt"), str(bad)],
        "no key": ["--checkpoint", checkpoint, str(bad)],
    }[case]  # fmt: skip
    expected = {
        "undecodable": f"{bad}: cannot be classified: ",
        "missing image": f"{tmp_path / 'nope.png'}: image file not found",
        "missing checkpoint": f"{tmp_path / 'none.pt'}: checkpoint not found",
        "no key": f"{checkpoint}: this model is protected by key {Key(FIXED_SECRET).fingerprint}",
    }[case]
    with caplog.at_level(logging.INFO):
        assert main(args) == 2
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "predict"]
    assert len(lines) == 1 and lines[0][0] == logging.ERROR, lines  # the error line, alone
    assert lines[0][1].startswith(f"predict: error: {expected}"), lines
