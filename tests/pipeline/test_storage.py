"""Storage: a local put is synced before it is named; on S3 (moto_server on loopback), what
each call costs in requests, and that the cheaper calls answer as the generic ones did."""

from __future__ import annotations

import pytest

from pipeline.storage import Storage

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


NAMES = [
    "a.json",
    "train-000000.tar",
    "train-000000.idx",
    "_progress/train.000001.json",
    "_progress/train.options.json",
    "_progress/val.000000.json",
    "_progress/sub/x.json",
]


def fill(storage: Storage) -> None:
    for name in NAMES:
        storage.write_bytes(name, b"x")


def test_a_file_is_one_head_and_a_folder_is_not_a_file(s3_env, s3_requests):
    storage = Storage(f"s3://{s3_env}/out")
    fill(storage)
    s3_requests.clear()
    assert storage.exists("a.json") and storage.exists("_progress/train.options.json")
    assert not storage.exists("missing.json")
    assert not storage.exists("_progress")  # a prefix with objects below it, not a file
    heads = ["a.json", "_progress/train.options.json", "missing.json", "_progress"]
    assert s3_requests == [("HeadObject", f"out/{name}") for name in heads]


def test_removing_is_one_delete_and_a_missing_name_is_no_error(s3_env, s3_requests):
    storage = Storage(f"s3://{s3_env}/out")
    fill(storage)
    s3_requests.clear()
    storage.remove("a.json")
    storage.remove("a.json")
    assert s3_requests == [("DeleteObject", "out/a.json")] * 2
    assert not storage.exists("a.json") and storage.exists("train-000000.tar")


@pytest.mark.parametrize("prefix", ["_progress/train.", "train-", "_progress/", "_pro", "nothing"])
def test_listing_by_prefix_is_one_request_and_lists_what_a_folder_does(
    s3_env, s3_requests, tmp_path, prefix
):
    local, remote = Storage(tmp_path / "out"), Storage(f"s3://{s3_env}/out")
    fill(local)
    fill(remote)
    s3_requests.clear()
    assert remote.list_prefix(prefix) == local.list_prefix(prefix)
    if not prefix.endswith("/"):  # a folder's whole listing keeps s3fs's own calls
        assert [method for method, _ in s3_requests] == ["ListObjectsV2"]
    assert remote.list_prefix("missing/train.") == local.list_prefix("missing/train.") == []


def test_a_local_put_syncs_the_file_before_it_takes_its_name(tmp_path, monkeypatch):
    """A crash after ``put`` leaves no named file short of its bytes: the fsync comes first."""
    import os

    storage = Storage(tmp_path / "out")
    staged = storage.staging_path("train-000000.tar")
    staged.write_bytes(b"x" * 1000)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    storage.put(staged, "train-000000.tar")
    assert events == [("fsync", str(staged)), ("replace", str(staged))]
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == b"x" * 1000


def test_a_ctrl_c_inside_a_local_lookup_is_not_swallowed(tmp_path, monkeypatch):
    """fsspec's generic exists() has a bare except: a Ctrl-C landing in its stat was swallowed
    and make_shards ran on to the end, exit 0. Every local lookup lets it through; a missing
    name, or one under a file, is simply not there."""
    storage = Storage(str(tmp_path))
    (tmp_path / "a.tar").write_bytes(b"x")
    assert storage.exists("a.tar") and not storage.exists("b.tar")
    assert not storage.exists("a.tar/inside") and storage.list_prefix("none/x") == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.fs, "info", interrupted)
    for lookup in (lambda: storage.exists("a.tar"), storage.list,
                   lambda: storage.list_prefix("_progress/train."),
                   lambda: storage.remove("a.tar")):  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            lookup()
