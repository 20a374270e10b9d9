"""build_shards into S3 (moto_server on loopback): the s3_requests a shard costs, and resuming."""

from __future__ import annotations

import pytest

from pipeline import Key
from pipeline.offline.build import BuildStats, build_shards
from pipeline.storage import Storage
from tests.conftest import FIXED_SECRET
from tests.pipeline.offline.test_build import config

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

RUN_REQUESTS = 16  # the s3_requests of a one-split run that name no shard (lock, checks, manifest)


def test_a_shard_costs_three_puts_and_nothing_else(jpeg_tree, s3_env, s3_requests):
    url = f"s3://{s3_env}/out"
    manifest = build_shards(config(jpeg_tree, url, splits=("train",)), Key(FIXED_SECRET))["train"]
    names = [s.name for s in manifest.shards]
    assert len(names) == 5
    for index, name in enumerate(names):
        stem = name.removesuffix(".tar")
        record = f"out/_progress/train.{index:06d}.json"
        mine = [r for r in s3_requests if stem in r[1] or r[1] == record]
        # its DALI index, then the shard, then its progress record: one PUT each, in order
        assert mine == [("PutObject", f"out/{stem}.idx"), ("PutObject", f"out/{name}"),
                        ("PutObject", record)], mine  # fmt: skip
    rest = [r for r in s3_requests if not any(n.removesuffix(".tar") in r[1] for n in names)]
    assert len(rest) - len(names) <= RUN_REQUESTS, rest  # the records are counted above
    assert Storage(url).list_prefix("_progress/") == []  # no records left once complete


def test_a_resumed_s3_build_keeps_its_finished_shards(jpeg_tree, s3_env, tmp_path, monkeypatch):
    from pipeline.offline import build

    key, url = Key(FIXED_SECRET), f"s3://{s3_env}/out"
    with monkeypatch.context() as m:  # the first run dies after its shards, before its manifest
        m.setattr(build, "_finish_split", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build_shards(config(jpeg_tree, url, splits=("train",)), key)
    remote = Storage(url)
    assert len(remote.list_prefix("_progress/train.0")) == 5 and not remote.exists("_lock.json")
    stats = BuildStats()
    build_shards(config(jpeg_tree, url, splits=("train",)), key, stats=stats)
    assert stats.shards == 0 and stats.images == 0  # every shard found finished, none rebuilt
    build_shards(config(jpeg_tree, tmp_path / "clean", splits=("train",)), key)
    local = Storage(tmp_path / "clean")
    assert remote.list() == local.list()
    for name in local.list():
        assert remote.read_raw(name) == local.read_raw(name), name


@pytest.mark.parametrize("decoder", ["dali", "pil"])
def test_a_shard_staged_for_upload_is_never_synced(jpeg_tree, s3_env, monkeypatch, decoder):
    """A staged shard on its way to S3 is a scratch file (a crash rebuilds it): no fsync, in
    the builder's thread (DALI here) or in PIL's shard processes (run in-process here)."""
    import os

    from pipeline.offline import makers

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])  # fmt: skip
    if decoder == "pil":  # the processes' work, in this process, so that fsync is seen
        monkeypatch.setattr(makers, "ProcessPoolExecutor", _InProcessPool)
    url = f"s3://{s3_env}/out-{decoder}"
    manifest = build_shards(config(jpeg_tree, url, splits=("train",), decoder=decoder),
                            Key(FIXED_SECRET))["train"]  # fmt: skip
    assert len(manifest.shards) == 5 and Storage(url).exists(manifest.shards[0].name)
    assert not [path for path in synced if path.endswith(".partial")], synced


class _InProcessPool:
    """ProcessPoolExecutor's interface, each job run at submit, in this process."""

    def __init__(self, workers, mp_context=None, initializer=None, initargs=()):
        import signal

        handler = signal.getsignal(signal.SIGINT)
        if initializer is not None:
            initializer(*initargs)  # which ignores Ctrl-C, as a worker process should
        signal.signal(signal.SIGINT, handler)  # not this one

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass
