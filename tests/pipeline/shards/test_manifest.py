"""Manifests are untrusted input: names that would leave the data folder are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.shards.manifest import ManifestError, load_manifest
from pipeline.shards.verify import verify_shards
from pipeline.storage import Storage
from pipeline.stream.dali import DaliShardLoader
from pipeline.stream.dataset import LoaderConfig, ShardDataset

BAD_NAMES = ["../small/s/val-000000.tar", "/etc/hostname", "sub/val-000000.tar", "val-1.tar",
             "train-000000.tar", "val-000000.tar.gz", "val-000000.tar/../x"]  # fmt: skip


def _tamper(shards: str, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    path = out / "val.manifest.json"
    data = json.loads(path.read_text())
    for field_name, value in changes.items():
        if field_name == "shard_name":
            data["shards"][0]["name"] = value
        else:
            data[field_name] = value
    path.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("name", BAD_NAMES)
def test_shard_names_outside_the_split_are_refused_everywhere(shards, tmp_path, name):
    out = _tamper(shards, tmp_path, shard_name=name)
    with pytest.raises(ManifestError, match="is not val-NNNNNN.tar") as info:
        load_manifest(Storage(str(out)), "val")
    assert repr(name) in str(info.value)
    with pytest.raises(ManifestError, match="is not val-NNNNNN.tar"):
        ShardDataset(str(out), "val", config=LoaderConfig(batch_size=4, num_workers=0))
    report = verify_shards(str(out), splits=("val",))
    assert not report.ok and report.checked_shards == 0
    assert any(repr(name) in p for p in report.problems)


def test_dali_loader_refuses_them_too(shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = _tamper(shards, tmp_path, shard_name="../x/val-000000.tar")
    with pytest.raises(ManifestError, match="no folders"):
        DaliShardLoader(str(out), "val", config=LoaderConfig(batch_size=4, num_workers=0))


def test_a_manifest_of_another_split_or_table_is_refused(shards, tmp_path):
    out = _tamper(shards, tmp_path, samples_table="../../secret.parquet")
    with pytest.raises(ManifestError, match="samples table"):
        load_manifest(Storage(str(out)), "val")
    shutil.copy(out / "train.manifest.json", out / "val.manifest.json")
    with pytest.raises(ManifestError, match="describes split 'train', not 'val'"):
        load_manifest(Storage(str(out)), "val")


def test_the_manifest_records_the_plain_images_colour_and_old_ones_load(shards):
    from pipeline.shards.manifest import Manifest, load_manifest
    from pipeline.storage import Storage

    manifest = load_manifest(Storage(shards), "train")
    assert manifest.input_stats is not None and manifest.input_stats["sampled"] > 0
    assert 0 <= manifest.input_stats["grey_fraction"] <= 1
    old = json.loads(manifest.to_json())
    del old["input_stats"]
    assert Manifest.from_json(json.dumps(old)).input_stats is None
