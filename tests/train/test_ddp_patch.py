"""train/ddp.py with a patch-aligned model: a small ViT trained plain, its key absorbed at the
start of a run on the encrypted shards (--init absorb), and the audit's weight matching."""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys

import pytest

from pipeline import Key, save_key
from tests.train.conftest import ROOT, make_digit_shards

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

VIT = ["--model", "vit_tiny_patch16_224", "--pretrained", "none", "--batch-size", "32",
       "--warmup-epochs", "0.5", "--workers", "1", "--epochs", "1"]  # fmt: skip
SECRET = bytes(range(32))
KWARGS = "img_size=32,patch_size=8,depth=1,embed_dim=48,num_heads=2"


def ddp(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train" / "ddp.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


def last(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    key = Key(SECRET, 8, ("np", "shuffle"))  # NP before shuffle: the order is absorbed too
    return {
        "root": root,
        "key": save_key(key, root / "k8.bin"),
        "plain": make_digit_shards(root / "plain", None, shard_size="500"),
        "enc": make_digit_shards(root / "enc", key, shard_size="500"),
    }


@pytest.fixture(scope="module")
def plain_run(shards):
    run = shards["root"] / "p"
    done = ddp("--data", str(shards["plain"]), "--out", str(run), "--model-kwargs", KWARGS,
               "--max-steps", "6", "--lr", "2e-3", *VIT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "patch" not in done.stderr  # plain shards, patch model: nothing to warn about
    return run


def test_absorbed_start_equals_the_plain_model_and_weight_matching_finds_the_key(shards, plain_run):
    root = shards["root"]
    # lr 0: the run's val accuracy is the absorbed model's, on the encrypted shards
    start = ddp("--data", str(shards["enc"]), "--out", str(root / "a"), "--model-kwargs", KWARGS,
                "--init", "absorb", "--init-checkpoint", str(plain_run / "checkpoint.pt"),
                "--key", str(shards["key"]), "--lr", "0", "--max-steps", "1", *VIT)  # fmt: skip
    assert start.returncode == 0, start.stderr[-3000:]
    assert "absorbed into patch_embed.proj (patch 8)" in start.stderr
    # the same 355 val digits, in another order: the same predictions and loss
    absorbed, plain = last(root / "a"), last(plain_run)
    assert absorbed["val_top1"] == plain["val_top1"]
    assert absorbed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    assert SECRET not in (root / "a" / "checkpoint.pt").read_bytes()

    audit = subprocess.run(
        [sys.executable, "-m", "attacks", "--checkpoint", str(root / "a" / "checkpoint.pt"),
         "--key", str(shards["key"]), "--data", str(shards["enc"]), "--out", str(root / "r"),
         "--scenarios", "correct_key,weight_matching", "--reference",
         str(plain_run / "checkpoint.pt")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr[-3000:]
    rows = {r["scenario"]: r for r in json.loads((root / "r" / "results.json").read_text())}
    assert rows["weight_matching"]["key_recovered"] == 1.0
    assert rows["weight_matching"]["top1"] == rows["correct_key"]["top1"]


def test_mismatch_warns_and_wrong_starts_are_refused(shards, plain_run, caplog):
    root = shards["root"]
    # patch 16 over 8-pixel blocks: the ordinary route, trained, with the reason it is not more
    warned = ddp("--data", str(shards["enc"]), "--out", str(root / "w"), "--model-kwargs",
                 "img_size=32,patch_size=16,depth=1,embed_dim=48,num_heads=2", "--max-steps", "1",
                 *VIT)  # fmt: skip
    assert warned.returncode == 0, warned.stderr[-3000:]
    assert "block size 8 is not vit_tiny_patch16_224's patch size 16" in warned.stderr

    main = runpy.run_path(str(ROOT / "train" / "ddp.py"), run_name="test")["main"]

    def refused(*args: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main([*args, "--out", str(root / "x"), *VIT]) == 2
        return caplog.text

    # a crop off the patch grid, refused before any training (even a ViT that takes any size
    # refuses it; the probe of the first layer passes timm's own reason on)
    text = refused("--data", str(shards["plain"]), "--model-kwargs",
                   f"{KWARGS},dynamic_img_size=true", "--crop-size", "28")  # fmt: skip
    assert "does not take a 28x28 input" in text and "divisible by patch size (8)" in text
    # a plain model is no start for encrypted shards without its key absorbed
    text = refused("--data", str(shards["enc"]), "--model-kwargs", KWARGS, "--init",
                   "checkpoint", "--init-checkpoint", str(plain_run / "checkpoint.pt"))  # fmt: skip
    assert "made for key None" in text and "tools/absorb_key.py" in text
