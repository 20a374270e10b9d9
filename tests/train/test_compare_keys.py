"""tools/compare_keys.py on a model trained here: correct key beats no key and wrong keys."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.train.conftest import ROOT, make_digit_shards


def test_compare_keys_writes_the_summary(digit_shards, protected_run, tmp_path):
    plain = make_digit_shards(tmp_path / "plain", None, shard_size="250")
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compare_keys.py"), "--checkpoint",
         str(protected_run / "checkpoint.pt"), "--data", str(digit_shards), "--plain-data",
         str(plain), "--wrong-keys", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    for name in ("protected_correct_key_top1", "protected_plain_top1", "wrong_key_top1_mean",
                 "wrong_key_top1_max", "wrong_keys", "train_seconds"):  # fmt: skip
        assert name in summary
    assert summary["wrong_keys"] == 3 and summary["val_samples"] == 355
    assert summary["protected_correct_key_top1"] > 0.8
    assert summary["protected_correct_key_top1"] > summary["wrong_key_top1_max"] + 0.2
    assert "| protected model, correct key |" in (tmp_path / "summary.md").read_text()

    swapped = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compare_keys.py"), "--checkpoint",
         str(protected_run / "checkpoint.pt"), "--data", str(digit_shards), "--plain-data",
         str(digit_shards), "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert swapped.returncode == 2 and "plain (unencrypted)" in swapped.stderr
