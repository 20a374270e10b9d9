"""The shard writer: the bytes tarfile itself writes, read back by stock tools."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.shards.format import MAX_NAME, TAR_FORMAT, ShardWriter, member_header, sample_files


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


def tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(TAR_FORMAT, tarfile.ENCODING, "surrogateescape")


@given(
    name=st.text(min_size=1, max_size=MAX_NAME).filter(
        lambda n: len(n.encode("utf-8", "surrogateescape")) <= MAX_NAME
    ),
    size=st.integers(0, 8 << 30),
)
def test_a_member_header_is_the_one_tarfile_builds(name: str, size: int) -> None:
    assert member_header(name, size) == tarfile_header(name, size)


def test_a_name_tarfile_would_spill_into_a_long_name_header_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="over 99 bytes"):
        member_header("\u00e9" * 50, 1)  # 50 characters, 100 bytes
    with ShardWriter(tmp_path / "s.tar", "s.tar") as writer, pytest.raises(ValueError, match="99"):
        writer.write("k" * 97, {"u8": b"x"})


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


@pytest.mark.parametrize("sealed", [False, True])
def test_an_unsynced_shard_has_the_same_bytes_and_skips_only_the_fsync(
    tmp_path, monkeypatch, sealed
) -> None:
    """``sync=False`` (the builder's: its publisher syncs later) changes nothing but the fsync."""
    import os

    from pipeline.cipher.seal import Sealer, generate_data_key

    sealer = Sealer(generate_data_key(), "an-output") if sealed else None
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    records, datas = [], []
    for sync in (True, False):
        synced.clear()
        path = tmp_path / f"{sync}" / "train-000000.tar"
        path.parent.mkdir()
        with ShardWriter(path, path.name, sealer=sealer, sync=sync) as writer:
            for key, files in samples(5):
                writer.write(key, files)
        assert len(synced) == int(sync)
        records.append(writer.record)
        data = path.read_bytes()
        datas.append(data if sealer is None else sealer.open(path.name, data))
    assert records[0] == records[1] and datas[0] == datas[1]
