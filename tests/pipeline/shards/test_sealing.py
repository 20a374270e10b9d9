"""Sealed outputs (make_shards --seal) end to end in process: what is at rest, what a reader with
the data key gets, and every way a sealed object can be damaged, swapped or replayed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import Key
from pipeline.cipher.seal import SealError, generate_data_key, save_data_key
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.offline.digits import write_digits_tree
from pipeline.shards.manifest import load_manifest
from pipeline.shards.sealing import SEALED_NAME, open_output, read_seal_info
from pipeline.shards.verify import verify_shards
from pipeline.storage import Storage
from pipeline.stream.dataset import LoaderConfig, ShardDataset
from tests.conftest import FIXED_SECRET

SPLIT_SIZES = {"train": 1442, "val": 355}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits_tree(tmp_path_factory.mktemp("digits") / "tree", size=64)


def build(digits: Path, out: Path, data_key=None, **options) -> dict:
    settings = {"size": 32, "decoder": "pil", "shard_size": "200", **options}
    config = ShardConfig(src=str(digits), out=str(out), **settings)
    return build_shards(config, Key(FIXED_SECRET), data_key=data_key)


@pytest.fixture(scope="module")
def data_key():
    return generate_data_key()


@pytest.fixture(scope="module")
def plain_out(digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsealed")
    build(digits, out)
    return out


@pytest.fixture(scope="module")
def sealed_out(digits, data_key, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sealed")
    build(digits, out, data_key)
    return out


def copy(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "copy"))


def test_sealed_output_opens_to_exactly_the_unsealed_content(plain_out, sealed_out, data_key):
    plain, sealed = Storage(plain_out), open_output(sealed_out, data_key)
    assert sorted(plain.list()) == sorted(n for n in sealed.list() if n != SEALED_NAME)
    for split in ("train", "val"):
        ours, theirs = load_manifest(sealed, split), load_manifest(plain, split)
        assert [(s.name, s.samples, s.bytes, s.sha256) for s in ours.shards] == [
            (s.name, s.samples, s.bytes, s.sha256) for s in theirs.shards
        ]
        for record in ours.shards:
            assert sealed.read_bytes(record.name) == plain.read_bytes(record.name)
            assert record.sealed_bytes == sealed.size(record.name) != record.bytes
            assert theirs.shards[0].sealed_bytes is None
    assert verify_shards(str(sealed_out), data_key=data_key).ok


def test_nothing_readable_at_rest(sealed_out, plain_out):
    """Every byte written: no tar header, no member name, no manifest field, no index line
    (the digits' class names, one digit each, are too short to search random bytes for)."""
    needles = [b"ustar", b"00000000.cls", b"0.u8", b'"classes"', b"key_fingerprint", b"PAR1",
               b"v1.2 ", b"identity_digest"]  # fmt: skip
    assert all(n in (plain_out / "train-000000.tar").read_bytes() for n in needles[:3])
    for path in sealed_out.rglob("*"):
        if path.is_file() and path.name != SEALED_NAME:
            data = path.read_bytes()
            assert not [n for n in needles if n in data], path
    info = json.loads((sealed_out / SEALED_NAME).read_text())
    assert set(info) == {"format", "keyset_id", "output_id"}


def test_sealing_uses_fresh_randomness(digits, data_key, sealed_out, tmp_path):
    again = tmp_path / "again"
    build(digits, again, data_key)
    name = "val-000000.tar"
    assert (again / name).read_bytes() != (sealed_out / name).read_bytes()
    assert open_output(again, data_key).read_bytes(name) == open_output(
        sealed_out, data_key
    ).read_bytes(name)


def test_loader_reads_sealed_shards_as_the_unsealed_ones(plain_out, sealed_out, data_key):
    """Two ranks of two workers start inside shards: the sealed reader opens and skips."""

    def samples(out, key=None) -> list[tuple[bytes, int]]:
        got = []
        for rank in (0, 1):
            dataset = ShardDataset(str(out), "train", config=LoaderConfig(train=False,
                                   num_workers=0), rank=rank, world_size=2,
                                   data_key=key)  # fmt: skip
            got += [(image.numpy().tobytes(), label) for image, label, valid in dataset if valid]
        return got

    ours, theirs = samples(sealed_out, data_key), samples(plain_out)
    assert len(ours) == SPLIT_SIZES["train"] and ours == theirs


def test_without_or_with_another_data_key_one_line_names_the_key(sealed_out, tmp_path):
    keyset = read_seal_info(Storage(sealed_out)).keyset_id
    with pytest.raises(SealError, match=f"sealed with data key {keyset}, and no data key"):
        ShardDataset(str(sealed_out), "train", config=LoaderConfig())
    other = save_data_key(generate_data_key(), tmp_path / "other.key")
    with pytest.raises(SealError, match=f"sealed with data key {keyset}, not tink:"):
        verify_shards(str(sealed_out), data_key=str(other))


def test_environment_variable_names_the_data_key(sealed_out, data_key, tmp_path, monkeypatch):
    path = save_data_key(data_key, tmp_path / "data.key")
    monkeypatch.setenv("KEYPROTECT_DATA_KEY", str(path))
    assert verify_shards(str(sealed_out)).ok


def _read_all(out: Path, key) -> None:
    for _ in ShardDataset(str(out), "val", config=LoaderConfig(train=False, num_workers=0),
                          data_key=key):  # fmt: skip
        pass


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "replay", "manifest"])
def test_damaged_sealed_objects_fail_naming_them(damage, sealed_out, digits, data_key, tmp_path):
    out = copy(sealed_out, tmp_path)
    name = "val-000000.tar"
    if damage == "flip":
        data = bytearray((out / name).read_bytes())
        data[len(data) // 2] ^= 1
        (out / name).write_bytes(bytes(data))
    elif damage == "truncate":
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) - 100])
    elif damage == "swap":  # two shards of the same output, exchanged
        a, b = (out / name).read_bytes(), (out / "val-000001.tar").read_bytes()
        (out / name).write_bytes(b)
        (out / "val-000001.tar").write_bytes(a)
    elif damage == "replay":  # the same name from another output sealed with the same key
        other = tmp_path / "other"
        build(digits, other, data_key, splits=("val",))
        shutil.copy(other / name, out / name)
    elif damage == "manifest":
        name = "val.manifest.json"
        data = bytearray((out / name).read_bytes())
        data[200] ^= 1
        (out / name).write_bytes(bytes(data))
    with pytest.raises(SealError, match=f"{name}: does not authenticate"):
        _read_all(out, data_key)
    report = verify_shards(str(out), data_key=data_key)
    assert not report.ok and any(name in p for p in report.problems)


def test_resume_of_a_sealed_output_finishes_the_same_content(
    digits, data_key, sealed_out, tmp_path
):
    out = copy(sealed_out, tmp_path)
    storage, original = open_output(out, data_key), open_output(sealed_out, data_key)
    for name in ("train-000002.tar", "train.manifest.json", "_progress/train.000002.json"):
        assert storage.exists(name) or name.startswith("_progress")
        storage.remove(name)
    (out / "_progress").mkdir(exist_ok=True)
    build(digits, out, data_key)  # the run resumes: shard 2 is made again, then the manifest
    assert verify_shards(str(out), data_key=data_key).ok
    # sealed bytes are fresh, their sizes and the opened content are the same
    assert load_manifest(storage, "train") == load_manifest(original, "train")
    assert storage.read_bytes("train-000002.tar") == original.read_bytes("train-000002.tar")
    assert (out / "train-000002.tar").read_bytes() != (sealed_out / "train-000002.tar").read_bytes()


def test_output_sealing_must_not_change(digits, data_key, plain_out, sealed_out, tmp_path):
    with pytest.raises(SealError, match="holds unsealed shards"):
        build(digits, copy(plain_out, tmp_path), data_key)
    with pytest.raises(SealError, match="sealed with data key tink:.*pass --seal"):
        build(digits, sealed_out)
    with pytest.raises(SealError, match="not tink:"):
        build(digits, sealed_out, generate_data_key())
    # each refusal released the output's lock: the right key finds the output complete
    assert set(build(digits, sealed_out, data_key)) == {"train", "val"}


def test_dali_loader_reads_sealed_shards_from_memory(sealed_out, plain_out, data_key):
    pytest.importorskip("nvidia.dali")
    from pipeline.stream.dali import DaliShardLoader

    def labels(out, key=None) -> list[int]:
        loader = DaliShardLoader(str(out), "val", config=LoaderConfig(train=False,
                                 batch_size=64, num_workers=1), data_key=key)  # fmt: skip
        got = []
        for _images, label, valid in loader:
            got += label[valid].tolist()
        return got

    assert labels(sealed_out, data_key) == labels(plain_out)
    assert np.array_equal(np.bincount(labels(sealed_out, data_key)),
                          np.bincount(labels(plain_out)))  # fmt: skip


def test_reseal_rotates_the_data_key_and_resumes(sealed_out, data_key, tmp_path, monkeypatch):
    from pipeline.cipher.seal import Sealer
    from pipeline.shards import sealing

    out = copy(sealed_out, tmp_path)
    before = opened_objects(out, data_key)
    new_key = generate_data_key()
    # interrupted in phase 1 after a few objects: the output is still whole under the old key
    calls = {"n": 0}
    real_seal = Sealer.seal

    def failing_seal(self, name, data):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_seal(self, name, data)

    monkeypatch.setattr(Sealer, "seal", failing_seal)
    with pytest.raises(KeyboardInterrupt):
        sealing.reseal_output(out, data_key, new_key)
    monkeypatch.undo()
    assert (out / "_reseal").is_dir() and verify_shards(str(out), data_key=data_key).ok
    resealed = sealing.reseal_output(out, data_key, new_key)
    assert 0 < resealed < len(before)  # the staged ones were not sealed again
    assert not (out / "_reseal").exists()
    assert read_seal_info(Storage(out)).keyset_id == new_key.keyset_id
    assert opened_objects(out, new_key) == before
    assert verify_shards(str(out), data_key=new_key).ok
    with pytest.raises(SealError, match=f"not {data_key.keyset_id}"):
        verify_shards(str(out), data_key=data_key)
    assert sealing.reseal_output(out, data_key, new_key) == 0  # done: nothing to do


def opened_objects(out: Path, key) -> dict[str, bytes]:
    storage = open_output(out, key)
    names = [n for n in storage.list() if n not in (SEALED_NAME, "_progress")]
    return {n: storage.read_bytes(n) for n in names}


def test_overwrite_replaces_a_sealed_output_made_differently(
    digits, data_key, sealed_out, tmp_path
):
    out = copy(sealed_out, tmp_path)
    with pytest.raises(Exception, match="--overwrite"):
        build(digits, out, data_key, size=24)
    build(digits, out, data_key, size=24, overwrite=True)
    storage = open_output(out, data_key)
    assert load_manifest(storage, "train").image_shape == [24, 24, 3]
    assert verify_shards(str(out), data_key=data_key).ok
    assert read_seal_info(Storage(out)) == read_seal_info(Storage(sealed_out))  # same output


def test_a_damaged_sealed_shard_read_by_a_worker_is_one_line(sealed_out, data_key, tmp_path):
    """The error crosses the DataLoader's worker boundary as a SealError with one line."""
    import gc

    from pipeline.stream.dataset import make_loader

    out = copy(sealed_out, tmp_path)
    data = bytearray((out / "val-000001.tar").read_bytes())
    data[len(data) // 2] ^= 1
    (out / "val-000001.tar").write_bytes(bytes(data))
    dataset = ShardDataset(str(out), "val", config=LoaderConfig(train=False, num_workers=1,
                           batch_size=64), data_key=data_key)  # fmt: skip
    text = ""
    try:
        for _ in make_loader(dataset):
            pass
    except SealError as exc:
        text = str(exc)
    gc.collect()  # nothing of the worker's traceback is kept into later tests' forks
    assert "val-000001.tar: does not authenticate" in text
    assert "\n" not in text and "Traceback" not in text and "DataLoader worker" not in text
