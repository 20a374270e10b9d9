"""No known plaintext at rest: encrypted output names no source file and cannot be placed
without the key; the owner's source map (kept with the key) names them all."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import binom

from pipeline import Key
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.offline.sourcemap import SourceMapError, source_map_rows, write_source_map
from pipeline.offline.sources import list_split, select_subset
from tests.conftest import FIXED_SECRET, write_jpeg_tree

WORD = "quokkazygote"  # in every file name: easy to find in any byte of the output
REJECTED = f"broken{WORD}.JPEG"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Encrypted shards of a tree whose every file name is distinctive, one file rejected."""
    root = tmp_path_factory.mktemp("np") / "privatecorpusroot"
    src = write_jpeg_tree(root, classes=3, train=8, val=3, size=(48, 40))
    for path in sorted(src.rglob("*.JPEG")):
        path.rename(path.with_name(f"{WORD}{path.stem.replace('img_', '')}.JPEG"))
    (src / "train" / "n00000001" / REJECTED).write_bytes(b"")
    out = tmp_path_factory.mktemp("np") / "out"
    config = ShardConfig(src=str(src), out=str(out), size=32, decoder="pil", shard_size="5",
                         batch_size=4, max_reject_fraction=0.1)  # fmt: skip
    key = Key(FIXED_SECRET)
    build_shards(config, key)
    return src, out, key


def every_byte(out: Path) -> list[tuple[str, bytes]]:
    """Every file of the output, and every tar member's name and content on its own."""
    blobs = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blobs.append((path.name, data))
        if path.suffix == ".tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    blobs.append((f"{path.name}:{member.name}", member.name.encode()))
                    blobs.append((f"{path.name}:{member.name}", tar.extractfile(member).read()))
    return blobs


def test_no_name_path_or_unkeyed_hash_of_them_in_any_byte(built):
    src, out, _ = built
    paths = [p.relative_to(src).as_posix() for p in src.rglob("*.JPEG")]
    assert len(paths) == 34 and sum(REJECTED in p for p in paths) == 1
    needles = {WORD, src.name, str(src)}
    for path in paths:
        stem = Path(path).stem
        needles |= {path, Path(path).name, stem, path.split("/", 1)[1]}
        for seed_text in (path, "order/" + path):  # the unkeyed ranks of today's order
            digest = hashlib.sha256(b"0\x00" + seed_text.encode()).digest()
            needles |= {digest.hex(), digest[:8]}
        needles |= {hashlib.sha256(path.encode()).hexdigest()}
    blobs = every_byte(out)
    assert len(blobs) > 40 and any(name.endswith(".parquet") for name, _ in blobs)
    for name, data in blobs:
        low = data.lower()
        for needle in needles:
            raw = needle if isinstance(needle, bytes) else needle.encode()
            assert raw.lower() not in low, f"{needle!r} found in {name}"


def test_rejects_are_named_in_the_log_and_the_map_not_the_output(built, tmp_path, caplog):
    src, out, key = built
    manifest_text = (out / "train.manifest.json").read_text()
    assert '"reason": "empty file (0 bytes)"' in manifest_text and REJECTED not in manifest_text
    # the run's log names it: rerun the build into a fresh folder, capturing the log
    with caplog.at_level(logging.WARNING, logger="pipeline.offline.sourcemap"):
        build_shards(ShardConfig(src=str(src), out=str(tmp_path / "o"), size=32, decoder="pil",
                                 shard_size="5", batch_size=4, max_reject_fraction=0.1,
                                 splits=("train",)), key)  # fmt: skip
    assert f"train: rejected train/n00000001/{REJECTED}: empty file" in caplog.text
    rows = source_map_rows(src=str(src), out=str(out), key=key, splits=("train", "val"))
    rejected = [r for r in rows if r[5] is not None]
    assert [(r[0], r[2], r[3], r[4]) for r in rejected] == [
        ("train", None, 1, f"train/n00000001/{REJECTED}")
    ]


def test_an_attacker_who_knows_the_tree_places_no_sample_better_than_chance(built):
    """Today's recomputation: list the tree, sort by SHA-256 of the default seed and path,
    and read each sample's label; measured against the owner's map, at chance."""
    src, out, key = built
    truth = {
        (r[0], r[1]): r[4]
        for r in source_map_rows(src=str(src), out=str(out), key=key, splits=("train", "val"))
        if r[5] is None
    }
    hits = trials = 0
    chance = 0.0
    for split in ("train", "val"):
        items = list_split(src, split, [f"n{c:08d}" for c in range(3)])
        recomputed = select_subset(items, seed=0)  # what worked against version 1 output
        keys = sorted(k for s, k in truth if s == split)
        for k in keys:  # the attacker's guess for the sample at position k
            hits += recomputed[int(k)].path == truth[split, k]
            trials += 1
        chance += len(keys) / len(items)  # P(hit) of a blind guess: 1/len(items) per sample
    assert trials == 33
    # Probability that chance alone gives `hits` or more: the recomputation is no better.
    assert binom.sf(hits - 1, trials, chance / trials) > 0.01, (hits, trials)


def test_source_map_file_is_private_complete_and_not_beside_the_shards(built, tmp_path):
    src, out, key = built
    path = tmp_path / "keys" / "k.sources.parquet"
    n = write_source_map(str(path), src=str(src), out=str(out), key=key, splits=("train", "val"))
    assert n == 34 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    table = pq.read_table(path).to_pylist()
    assert [c for c in table[0]] == ["split", "key", "shard", "label", "source", "rejected"]
    samples = pq.read_table(out / "train.samples.parquet").to_pylist()
    assert {r["source"] for r in samples} == {None}
    by_key = {r["key"]: r for r in table if r["split"] == "train" and r["rejected"] is None}
    assert [(r["key"], r["shard"], r["label"]) for r in samples] == [
        (k, by_key[k]["shard"], by_key[k]["label"]) for k in sorted(by_key)
    ]
    assert all(r["source"].split("/")[1] == f"n{r['label']:08d}" for r in table)
    with pytest.raises(SourceMapError, match="inside --out"):
        write_source_map(str(out / "map.parquet"), src=str(src), out=str(out), key=key,
                         splits=("val",))  # fmt: skip
    with pytest.raises(SourceMapError, match="are key 0b4144ea.*not key 3cc9a143"):
        write_source_map(str(path), src=str(src), out=str(out), key=Key(bytes(32)),
                         splits=("val",))  # fmt: skip
    (src / "val" / "n00000000" / f"{WORD}_new.JPEG").write_bytes(b"x")
    try:
        with pytest.raises(SourceMapError, match="no longer lists the files"):
            write_source_map(str(path), src=str(src), out=str(out), key=key, splits=("val",))
    finally:
        (src / "val" / "n00000000" / f"{WORD}_new.JPEG").unlink()


def test_source_map_to_s3(built, s3_env):
    import fsspec

    src, out, key = built
    url = f"s3://{s3_env}/owner/k.sources.parquet"
    assert write_source_map(url, src=str(src), out=str(out), key=key, splits=("val",)) == 9
    with fsspec.open(url, "rb") as f:
        assert len(pq.read_table(f)) == 9


V1 = Path(__file__).parent / "data" / "v1-encrypted"


def test_output_of_format_version_1_still_reads(tmp_path, caplog):
    """Shards made by the previous release (commit f0d02e3), whose samples name their source:
    the loader, verify and the source map still work on them, and verify says to rebuild."""
    import json

    from pipeline.model.evaluation import load_split
    from pipeline.shards.verify import verify_shards

    assert json.loads((V1 / "val.manifest.json").read_text())["version"] == 1
    with caplog.at_level(logging.WARNING, logger="pipeline.shards.verify"):
        report = verify_shards(str(V1))
    assert report.ok and report.checked_samples == 10, report.problems
    assert "name their source files" in caplog.text and "--overwrite" in caplog.text
    split = load_split(str(V1), "val")
    assert split.images.shape == (4, 8, 8, 3)
    assert split.key_fingerprint == Key(FIXED_SECRET).fingerprint
    rows = source_map_rows(src=str(tmp_path), out=str(V1), key=Key(FIXED_SECRET), splits=("val",))
    assert [r[4].split("/")[1] for r in rows] == [f"n{r[3]:08d}" for r in rows]


def test_a_shard_naming_its_source_fails_verify(built, tmp_path):
    """Version 2 encrypted output must not name a source; verify checks each sample."""
    from pipeline.shards.format import ShardWriter, sample_files
    from pipeline.shards.verify import verify_shards

    src, out, key = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    with ShardWriter(copy / "val-000000.tar", "val-000000.tar") as writer:
        for i in range(5):
            image = np.zeros((32, 32, 3), np.uint8)
            writer.write(f"{i:08d}", sample_files(image, 0, "val/n00000000/x.JPEG", "val"))
    report = verify_shards(str(copy), splits=("val",))
    assert any("names its source file" in p for p in report.problems), report.problems


def test_a_run_with_a_source_map_lists_the_tree_once(built, tmp_path, monkeypatch):
    """``make_shards --source-map``: the map takes the run's own selection (checked against
    the manifest's digest), not a second listing of the tree; the same map as one made later."""
    from pipeline.offline import sources
    from pipeline.offline.job import ShardJob
    from pipeline.offline.workgroup import WorkGroup

    src, _, key = built
    scans: list[str] = []
    real_scan = sources.scan_split

    def scan_split(root, split, *args, **kwargs):
        scans.append(split)
        return real_scan(root, split, *args, **kwargs)

    monkeypatch.setattr(sources, "scan_split", scan_split)
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=32, decoder="pil",
                         shard_size="5", batch_size=4, max_reject_fraction=0.1)  # fmt: skip
    map_path = tmp_path / "keys" / "map.parquet"
    ShardJob(config, key, source_map=str(map_path)).run(WorkGroup())
    assert scans == ["train", "val"]  # once per split, by the build
    later = tmp_path / "keys" / "later.parquet"
    write_source_map(str(later), src=str(src), out=config.out, key=key, splits=("train", "val"))
    assert pq.read_table(map_path).to_pylist() == pq.read_table(later).to_pylist()
    with pytest.raises(SourceMapError, match="no longer lists the files"):  # still checked
        write_source_map(str(later), src=str(src), out=config.out, key=key, splits=("val",),
                         selected={"val": []})  # fmt: skip
