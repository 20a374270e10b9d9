"""The shard writer: the bytes tarfile itself writes, read back by stock tools."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from pipeline.shards.format import TAR_FORMAT, ShardWriter, sample_files


def samples(count: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):  # odd sizes: every member needs its own padding
        image = rng.integers(0, 256, (7 + i, 5, 3), dtype=np.uint8)
        out.append((f"{i:08d}", sample_files(image, i, None if i % 2 else f"a/{i}.JPEG", "train")))
    return out


def tarfile_bytes(members: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The same members through tarfile's own stream writer, with the writer's metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=TAR_FORMAT) as tar:
        for key, files in members:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(files[ext]), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(files[ext]))
    return buf.getvalue()


@pytest.mark.parametrize("count", [0, 1, 37])
def test_the_writer_writes_exactly_what_tarfile_writes(tmp_path, count) -> None:
    members = samples(count)
    path = tmp_path / "train-000000.tar"
    with ShardWriter(path, path.name) as writer:
        for key, files in members:
            writer.write(key, files)
    data = path.read_bytes()
    assert data == tarfile_bytes(members)
    record = writer.record
    assert record is not None and record.samples == count
    assert (record.bytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command here")
def test_stock_tar_lists_and_extracts_the_shard(tmp_path) -> None:
    members = samples(3)
    path = tmp_path / "train-000000.tar"
    with ShardWriter(path, path.name) as writer:
        for key, files in members:
            writer.write(key, files)
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == [f"{k}.{e}" for k, f in members for e in sorted(f)]
    subprocess.run(["tar", "-xf", str(path), "-C", str(tmp_path)], check=True)
    assert (tmp_path / "00000002.u8").read_bytes() == members[2][1]["u8"]
