"""Damaged shards stop both loaders with one line naming the shard and the sample.

Each test damages a copy of real shards the way storage or a hand edit does (a flipped byte, a
sample of the wrong size, a manifest count or an index that no longer matches the tar) and
checks the error, with and without the DALI index (the webdataset loader then walks the tar).
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.shards.checks import ShardError
from pipeline.shards.format import ShardWriter
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader

ROOT = Path(__file__).resolve().parents[3]
SHARD = "train-000001.tar"  # the shards fixture: train-000000..2 of 15, 15, 10 samples


def damaged(shards: str, tmp_path: Path, *, indexed: bool = True) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    if not indexed:
        for index in out.glob("*.idx"):
            index.unlink()
    return out


def member(path: Path, position: int, ext: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(f".{ext}")][position]


def overwrite(path: Path, position: int, ext: str, data: bytes) -> str:
    """Overwrite, in place and at the same size, the ``ext`` file of sample ``position``;
    return the sample's key."""
    info = member(path, position, ext)
    assert info.size == len(data)
    with open(path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(data)
    return info.name.partition(".")[0]


def read_all(data: Path, *, workers: int = 0) -> list:
    config = LoaderConfig(batch_size=4, num_workers=workers, train=False)
    dataset = ShardDataset(str(data), "train", config=config)
    if workers:
        return list(make_loader(dataset))
    return list(dataset)


def error_text(read: Callable[[], object]) -> str:
    """The ``ShardError`` that ``read`` raises, as text; nothing of it is kept (its traceback
    would keep DataLoader workers and DALI threads alive into the next tests' forks)."""
    try:
        read()
    except ShardError as exc:
        text = str(exc)
    else:
        pytest.fail("no ShardError")
    gc.collect()
    return text


def one_line_error(data: Path, *words: str, workers: int = 0) -> str:
    text = error_text(lambda: read_all(data, workers=workers))
    assert "\n" not in text and "Traceback" not in text, text
    for word in words:
        assert word in text, text
    assert f"tools/verify_shards.py {data}" in text  # and says what to do
    return text


def lower_manifest_count(data: Path, name: str, by: int) -> None:
    path = data / "train.manifest.json"
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
        if shard["name"] == name:
            shard["samples"] -= by
    manifest["total_samples"] -= by
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("indexed", [True, False])
def test_a_label_out_of_range_names_the_shard_and_sample(shards, tmp_path, indexed):
    data = damaged(shards, tmp_path, indexed=indexed)
    key = overwrite(data / SHARD, 4, "cls", b"9")  # 4 classes
    one_line_error(data, SHARD, f"sample {key} (#4)", "class 9 outside 0..3")


@pytest.mark.parametrize("indexed", [True, False])
def test_a_label_that_is_no_number_names_the_shard_and_sample(shards, tmp_path, indexed):
    data = damaged(shards, tmp_path, indexed=indexed)
    key = overwrite(data / SHARD, 7, "cls", b"x")
    one_line_error(data, SHARD, f"sample {key} (#7)", "is not a class index (b'x')")


@pytest.mark.parametrize("indexed", [True, False])
def test_an_image_of_the_wrong_size_names_the_shard_and_sample(shards, tmp_path, indexed):
    data = damaged(shards, tmp_path, indexed=indexed)
    path = data / SHARD
    with tarfile.open(path) as tar:
        samples: dict[str, dict[str, bytes]] = {}
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    small = sorted(samples)[3]
    samples[small]["u8"] = bytes(32 * 32 * 3)  # a 32x32 sample among 64x64 ones
    with ShardWriter(path, SHARD) as writer:
        for key, files in samples.items():
            writer.write(key, files)
    if indexed:  # as make_shards writes it: the index matches the tar
        (data / "train-000001.idx").write_text(writer.index_text())
    where = "train-000001.idx" if indexed else SHARD  # the index already says so
    one_line_error(data, where, f"sample {small}", "3072 image bytes, expected 12288")


@pytest.mark.parametrize("indexed", [True, False])
def test_a_manifest_count_lowered_is_refused(shards, tmp_path, indexed):
    data = damaged(shards, tmp_path, indexed=indexed)
    lower_manifest_count(data, SHARD, 5)
    if indexed:
        one_line_error(data, "train-000001.idx", "lists 15 samples, the manifest says 10")
    else:
        one_line_error(data, SHARD, "holds more samples than the manifest's 10")


def test_a_manifest_count_raised_is_refused_when_walking_the_tar(shards, tmp_path):
    data = damaged(shards, tmp_path, indexed=False)
    lower_manifest_count(data, SHARD, -3)
    one_line_error(data, SHARD, "the tar ends after 15 samples; the manifest says 18")


@pytest.mark.parametrize("keep_header", [True, False])
def test_index_lines_dropped_are_refused(shards, tmp_path, keep_header):
    data = damaged(shards, tmp_path)
    index = data / "train-000001.idx"
    lines = index.read_text().splitlines()
    head = lines[0] if keep_header else "v1.2 11"
    index.write_text("\n".join([head, *lines[1:12]]) + "\n")
    one_line_error(data, "train-000001.idx", "lists 11 samples, the manifest says 15")


def test_a_sample_missing_a_file_is_refused(shards, tmp_path):
    data = damaged(shards, tmp_path, indexed=False)
    path = data / SHARD
    with tarfile.open(path) as tar:
        gone = member(path, 2, "json").name
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != gone]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, content in kept:
            tar.addfile(info, io.BytesIO(content))
    key = member(path, 2, "cls").name.partition(".")[0]
    one_line_error(data, SHARD, f"sample {key} (#2) has files ['cls', 'u8']")


def test_a_worker_error_reaches_the_main_process_as_one_line(shards, tmp_path):
    data = damaged(shards, tmp_path)
    key = overwrite(data / SHARD, 4, "cls", b"9")
    one_line_error(data, SHARD, f"sample {key}", "class 9 outside", workers=2)


def test_the_training_command_line_ends_in_one_line_exit_2(shards, tmp_path):
    data = damaged(shards, tmp_path)
    key = overwrite(data / SHARD, 4, "cls", b"9")
    cmd = [sys.executable, str(ROOT / "train" / "ddp.py"), "--data", str(data),
           "--out", str(tmp_path / "run"), "--model", "test_efficientnet", "--pretrained",
           "none", "--batch-size", "8", "--workers", "2", "--epochs", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr[-3000:]
    said = errors[0].partition("train: error: ")[2]  # after a progress bar's carriage return
    assert said.startswith(str(data / SHARD)), errors[0]
    assert f"sample {key} (#4): class 9 outside 0..3" in said


def test_dali_refuses_an_index_that_does_not_match_the_manifest(shards, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    from pipeline.stream.dali import DaliShardLoader

    data = damaged(shards, tmp_path)
    lower_manifest_count(data, SHARD, 5)
    with pytest.raises(ShardError, match=r"train-000001\.idx: the DALI index lists 15 samples"):
        DaliShardLoader(str(data), "train", config=LoaderConfig(batch_size=4, num_workers=1))
    data = damaged(shards, tmp_path / "lines")
    index = data / "train-000001.idx"
    index.write_text("\n".join(index.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(ShardError, match="lists 12 samples, the manifest says 15"):
        DaliShardLoader(str(data), "train", config=LoaderConfig(batch_size=4, num_workers=1))


def test_dali_names_a_label_out_of_range(shards, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    from pipeline.stream.dali import DaliShardLoader

    data = damaged(shards, tmp_path)
    key = overwrite(data / SHARD, 4, "cls", b"9")
    config = LoaderConfig(batch_size=4, num_workers=1, train=False)
    text = error_text(lambda: list(DaliShardLoader(str(data), "train", config=config)))
    assert str(data / SHARD) in text and f"sample {key}: class 9 outside 0..3" in text
    assert "\n" not in text
