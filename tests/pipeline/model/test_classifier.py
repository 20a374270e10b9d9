"""ProtectedClassifier: source files give what the shards give, and keys are checked."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import Key, decrypt
from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.model.classifier import ImageFileError, ProtectedClassifier, check_key, read_image
from pipeline.model.evaluation import load_split, predict
from tests.conftest import FIXED_SECRET, sources_by_key

pytestmark = pytest.mark.slow  # the session's protected model is trained for these

SAMPLES = 24  # val samples compared (several of each class)


def val_sources(digit_shards, tree=None) -> list:
    """The source PNG of each val sample, in shard order (the order ``load_split`` yields)."""
    tree = tree or digit_shards.parent / "digits-tree"
    keys = sorted(r["key"] for r in pq.read_table(digit_shards / "val.samples.parquet").to_pylist())
    assert [int(k) for k in keys] == list(range(len(keys)))  # key = index in the split
    sources = sources_by_key(tree, digit_shards, Key(FIXED_SECRET), "val")
    return [tree / sources[k] for k in keys]


@pytest.fixture(scope="module")
def clf(protected_run):
    return ProtectedClassifier.load(protected_run / "checkpoint.pt", Key(FIXED_SECRET))


def test_files_give_the_shards_images_and_logits(clf, digit_shards):
    split = load_split(str(digit_shards))
    paths = val_sources(digit_shards)[:SAMPLES]
    plain = clf.read_files(paths)
    assert (plain == decrypt(split.images[:SAMPLES], Key(FIXED_SECRET))).all()  # same pixels
    expected = predict(clf.model, split.images[:SAMPLES])
    np.testing.assert_allclose(clf.logits(plain), expected, rtol=1e-4, atol=1e-4)
    top = clf.predict_files(paths, k=3)
    assert [t[0][0] for t in top] == [split.classes[i] for i in expected.argmax(1)]
    assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in top)


def test_the_runs_crop_is_the_loaders_eval_crop(clf, digit_shards):
    """A run trained on 24x24 crops of 32x32 shards: the same centre crop, on the block grid."""
    saved = Checkpoint("resnet18", tuple(clf.classes), clf.image_shape, clf.key_fingerprint,
                       block_size=4, config={"crop_size": 24})  # fmt: skip
    cropped = ProtectedClassifier(clf.model, saved, clf.key)
    split = load_split(str(digit_shards), crop_size=24)
    plain = cropped.read_files(val_sources(digit_shards)[:8])
    expected = predict(clf.model, split.images[:8])
    np.testing.assert_allclose(cropped.logits(plain), expected, rtol=1e-4, atol=1e-4)


def test_keys_are_checked():
    key, other = Key(FIXED_SECRET), Key(bytes(range(1, 33)))
    protected = Checkpoint("resnet18", ("a",), (32, 32, 3), key.fingerprint, block_size=4)
    plain = replace(protected, key_fingerprint=None, block_size=None)
    check_key(protected, key, "c.pt")
    with pytest.raises(CheckpointError) as wrong:
        check_key(protected, other, "c.pt")
    message = str(wrong.value)
    assert "c.pt" in message and key.fingerprint in message and other.fingerprint in message
    assert FIXED_SECRET.hex() not in message and bytes(range(1, 33)).hex() not in message
    with pytest.raises(CheckpointError, match="pass that key"):
        check_key(protected, None, "c.pt")
    with pytest.raises(CheckpointError, match="plain"):
        check_key(plain, key, "c.pt")
    check_key(plain, None, "c.pt")
    with pytest.raises(CheckpointError, match="block size 8"):
        check_key(replace(protected, block_size=8), key, "c.pt")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "not found"),
        (b"", "empty file"),
        (b"this is not an image", "not a recognised image format"),
        ("truncated", "PIL could not decode it"),
    ],
)
def test_unreadable_files_are_named_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "x.png"
    if content == "truncated":
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageFileError, match=reason) as error:
        read_image(path, 32)
    assert str(path) in str(error.value)


def test_dali_made_shards_are_matched_with_dali(clf, digit_shards, tmp_path):
    """Shards decoded by DALI: a checkpoint that records it decodes files with DALI too."""
    pytest.importorskip("nvidia.dali")
    from pipeline.offline.build import ShardConfig, build_shards

    src = digit_shards.parent / "digits-tree"
    config = ShardConfig(src=str(src), out=str(tmp_path / "dali"), size=32, decoder="dali",
                         splits=("val",), shard_size="500")  # fmt: skip
    build_shards(config, Key(FIXED_SECRET))
    split = load_split(str(tmp_path / "dali"))
    assert split.key_fingerprint == clf.key_fingerprint
    saved = Checkpoint("resnet18", tuple(clf.classes), clf.image_shape, clf.key_fingerprint,
                       block_size=4, decoder="dali", transforms=clf.key.transforms)  # fmt: skip
    dali = ProtectedClassifier(clf.model, saved, clf.key)
    paths = val_sources(tmp_path / "dali", src)[:SAMPLES]
    assert (dali.read_files(paths) == decrypt(split.images[:SAMPLES], clf.key)).all()
    wrong_scheme = replace(saved, transforms=("np",))
    with pytest.raises(CheckpointError, match="transforms np, but the key file says shuffle"):
        ProtectedClassifier(clf.model, wrong_scheme, clf.key)
