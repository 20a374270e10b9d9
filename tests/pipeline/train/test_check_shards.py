"""check_shards: train and val shards must agree on everything that shapes a sample."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from pipeline.shards.manifest import Manifest
from pipeline.train import TrainError
from pipeline.train.loop import check_shards


def manifest(**changes) -> Manifest:
    base = Manifest(
        split="train",
        encrypted=True,
        key_fingerprint="fp",
        block_size=4,
        transforms=["shuffle"],
        image_shape=[32, 32, 3],
        classes=["a", "b"],
        source_digest="d",
        options={"size": 32, "decoder": "pil", "decode_device": "cpu", "max_pixels": None},
        tool_version="t",
    )
    return dataclasses.replace(base, **changes)


def loader(m: Manifest) -> SimpleNamespace:
    return SimpleNamespace(manifest=m, storage=SimpleNamespace(url="/shards"))


def test_matching_splits_pass():
    assert check_shards(loader(manifest()), loader(manifest(split="val"))) is None  # no refusal


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"image_shape": [64, 64, 3]}, "image shape [32, 32, 3] but val shards [64, 64, 3]"),
        ({"block_size": 8}, "block size 4 but val shards 8"),
        ({"transforms": ["shuffle", "np"]}, "transforms ['shuffle'] but"),
        (
            {"options": {"size": 32, "decoder": "dali", "decode_device": "cpu"}},
            "option 'decoder' pil but val shards dali",
        ),
        (
            {"options": {"size": 48, "decoder": "pil", "decode_device": "cpu"}},
            "option 'size' 32 but val shards 48",
        ),
    ],
)
def test_a_differing_field_is_named_with_both_values(changes, words):
    with pytest.raises(TrainError, match="same make_shards options") as err:
        check_shards(loader(manifest()), loader(manifest(split="val", **changes)))
    assert words in str(err.value)
