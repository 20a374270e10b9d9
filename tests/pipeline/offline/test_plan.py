"""make_shards --dry-run's plan: what a run then makes, to the byte, and nothing written."""

from __future__ import annotations

import pytest

from pipeline import Key
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.offline.plan import describe, plan_splits
from tests.conftest import FIXED_SECRET


@pytest.mark.parametrize("shard_size, size", [("5", 64), ("100kB", 48), ("1000", 32)])
def test_the_plan_is_what_the_run_makes(jpeg_tree, tmp_path, shard_size, size):
    key = Key(FIXED_SECRET)
    config = ShardConfig(src=str(jpeg_tree), out=str(tmp_path / "out"), size=size,
                         shard_size=shard_size, decoder="pil", num_threads=2)  # fmt: skip
    plans = plan_splits(config, key)
    assert not (tmp_path / "out").exists()  # planning writes nothing
    manifests = build_shards(config, key)
    for plan in plans:
        made = manifests[plan.split]
        assert (plan.images, plan.shards, plan.classes) == (
            made.total_samples,
            len(made.shards),
            len(made.classes),
        )
        assert plan.total_bytes == made.total_bytes
        assert plan.shard_bytes == made.shards[0].bytes


def test_the_description_names_sizes_decoder_and_staging(jpeg_tree, tmp_path):
    config = ShardConfig(src=str(jpeg_tree), out=str(tmp_path / "out"), size=64, shard_size="5",
                         decoder="pil", num_threads=3, plain=True)  # fmt: skip
    lines = describe(config, plan_splits(config, None), world_size=2)
    assert lines[0].startswith("train: 24 images of 3 classes (0 source entries skipped), 5 shards")
    assert lines[1].startswith("val: 9 images of 3 classes")
    # PIL's processes: --threads + 4 shards of 5 samples staged at most, per rank
    assert "3 processes per rank, 2 rank(s): about 3 shards of a split each" in lines[-1]
    assert lines[-1].endswith("nothing was written") and not (tmp_path / "out").exists()


def test_the_plan_says_what_the_output_already_holds(jpeg_tree, tmp_path, monkeypatch):
    from pipeline.offline import build

    key, out = Key(FIXED_SECRET), tmp_path / "out"
    config = ShardConfig(src=str(jpeg_tree), out=str(out), size=64, shard_size="5",
                         decoder="pil", num_threads=2, splits=("train",))  # fmt: skip
    assert "the output has" not in describe(config, plan_splits(config, key))[0]  # nothing yet
    with monkeypatch.context() as m:  # a run that dies after its shards, before its manifest
        m.setattr(build, "_finish_split", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build_shards(config, key)
    line = describe(config, plan_splits(config, key))[0]
    assert line.endswith("; the output has 5 of them made: a run resumes")
    build_shards(config, key)
    line = describe(config, plan_splits(config, key))[0]
    assert line.endswith(
        "the output has its manifest: a run with the same key and options does nothing"
    )
    auto = ShardConfig(**{**config.__dict__, "decoder": "auto", "device": "cpu"})
    assert "decoding with pil on the CPU" in describe(auto, plan_splits(auto, key))[-1]  # kept
