"""The make_shards job's accounting: every entry of the source tree is an image made, a file
that could not be decoded, or an entry that is not an image, and the summary adds them up."""

from __future__ import annotations

import json

import pytest

from pipeline import Key
from pipeline.offline.build import ShardConfig
from pipeline.offline.job import ShardJob
from pipeline.offline.workgroup import WorkGroup
from tests.conftest import FIXED_SECRET, write_jpeg_tree


@pytest.mark.parametrize("encrypted", [True, False])
def test_summary_counts_every_entry(tmp_path, encrypted):
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=6, val=2)  # 12 + 4 images
    (src / "train" / (sorted(p.name for p in (src / "train").iterdir())[0]) / "broken.jpg"
     ).write_bytes(b"\xff\xd8\xff not a jpeg")  # fmt: skip
    (src / "train" / "notes.txt").write_bytes(b"a file where a class folder should be")
    first_class = sorted((src / "val").iterdir())[0]
    (first_class / "README").write_bytes(b"no extension")
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=32, decoder="pil",
                         shard_size="8", plain=not encrypted, max_reject_fraction=0.5)  # fmt: skip
    job = ShardJob(config, Key(FIXED_SECRET) if encrypted else None)
    manifests = job.run(WorkGroup())
    line = job.summary(manifests, WorkGroup())
    # 16 images made, 1 undecodable, 2 entries that are not images: 19 entries in all
    assert "16 images in" in line and "(16 made now" in line, line
    assert "3 rejected (2 not images; each named in the log)" in line, line
    assert job.stats.images == 16 and job.stats.rejected == 1
    train = json.loads((tmp_path / "out" / "train.manifest.json").read_text())
    val = json.loads((tmp_path / "out" / "val.manifest.json").read_text())
    if encrypted:  # counted by reason, never named: names stay with the owner
        assert train["source_rejects"] == [
            {"count": 1, "reason": train["source_rejects"][0]["reason"]}
        ]
        assert "notes.txt" not in json.dumps(train) and "README" not in json.dumps(val)
    else:
        assert [r["source"] for r in train["source_rejects"]] == ["train/notes.txt"]
        assert val["source_rejects"][0]["source"].endswith("/README")
    assert len(train["rejects"]) == 1
