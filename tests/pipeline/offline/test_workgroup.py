"""The ranks' store protocol, with a real TCPStore on loopback and two groups in one process."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch.distributed as dist

from pipeline.offline import workgroup
from pipeline.offline.workgroup import WorkGroup, WorkGroupError, cores_per_rank
from pipeline.testing import free_port


@pytest.fixture
def pair(monkeypatch):
    monkeypatch.setattr(workgroup, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(workgroup, "CHECK_EVERY_S", 0.0)
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    groups = [WorkGroup(rank=r, world_size=2, store=s) for r, s in enumerate((server, client))]
    yield groups
    for group in groups:
        group.close()


def run_ranks(groups: list[WorkGroup], job) -> list[BaseException]:
    """``job(group)`` for each rank at once, in threads named ``rank<r>``; what they raised."""
    errors: list[BaseException] = []

    def run(group: WorkGroup) -> None:
        try:
            job(group)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    ranks = [threading.Thread(target=run, args=(g,), name=f"rank{g.rank}") for g in groups]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    return errors


def test_each_shard_goes_to_the_first_rank_that_asks_and_to_no_other(pair):
    """Two ranks take indices at once from a real store: each index once, in rising order per
    rank, none beyond the count; a slower rank takes fewer. A group of one takes them all."""
    taken: list[list[int]] = [[], []]

    def take(rank: int, pause: float) -> None:
        for index in pair[rank].claims("train", 40):
            taken[rank].append(index)
            time.sleep(pause)

    ranks = [threading.Thread(target=take, args=(r, p)) for r, p in ((0, 0.005), (1, 0.02))]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=30)
    assert sorted(taken[0] + taken[1]) == list(range(40))
    assert all(t == sorted(t) for t in taken) and len(taken[0]) > len(taken[1]) >= 1
    assert list(pair[1].claims("val", 3)) == [0, 1, 2]  # another split: its own counter
    assert list(pair[0].claims("val", 3)) == []  # all taken
    assert list(WorkGroup().claims("train", 5)) == [0, 1, 2, 3, 4]


def test_rank_zero_shares_a_value_and_waits_for_every_rank(pair):
    zero, one = pair
    got = []
    asked = threading.Event()
    real_wait = one._wait

    def wait(ready, what):  # rank 1 reaches its wait: then it must still have nothing
        asked.set()
        real_wait(ready, what)

    one._wait = wait
    reader = threading.Thread(target=lambda: got.append(one.share("setup")))
    reader.start()
    assert asked.wait(timeout=10) and not got  # rank 1 waits for rank 0
    zero.share("setup", "build:abc")
    reader.join(timeout=10)
    assert got == ["build:abc"]
    one.done("built")
    zero.done("built")
    zero.wait_all("built")


def test_a_failure_posted_by_one_rank_stops_the_others(pair):
    zero, one = pair
    one.fail("train-000003.tar: too many rejects")
    with pytest.raises(WorkGroupError, match="stopping: rank 1: train-000003.tar: too many"):
        zero.wait_all("built")
    with pytest.raises(WorkGroupError, match="rank 1"):
        zero.check()


def test_a_rank_without_heartbeat_is_declared_gone(pair, monkeypatch):
    zero, one = pair
    monkeypatch.setattr(workgroup, "DEAD_AFTER_S", 0.5)
    one.close()  # as if killed: its heartbeat stops, nothing is posted
    started = time.monotonic()
    with pytest.raises(WorkGroupError, match="rank 1 gave no sign of life"):
        zero.wait_all("built")
    assert time.monotonic() - started < 10


def test_threads_auto_is_this_ranks_share_of_the_cores_it_may_use(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_rank() == cores  # one process: every core it may use
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cores_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert cores_per_rank() == 1  # more ranks than cores: one each, never none


@pytest.fixture
def node_of_three(monkeypatch):
    """Three ranks of one node (local ranks 0-2) on a real TCPStore; closed by the test."""
    monkeypatch.setattr(workgroup, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(workgroup, "CHECK_EVERY_S", 0.0)
    port = free_port()
    stores = [dist.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False)]
    stores += [dist.TCPStore("127.0.0.1", port, 3, is_master=False) for _ in range(2)]
    return [WorkGroup(rank=r, world_size=3, local_rank=r, store=s, local_world_size=3)
            for r, s in enumerate(stores)]  # fmt: skip


def test_once_per_node_makes_it_on_the_first_rank_and_hands_the_others_its_bytes(node_of_three):
    made: list[int] = []

    def make() -> dict:
        made.append(1)
        return {"files": ["a", "b\tc"]}

    dump, load = (lambda value: json.dumps(value).encode()), json.loads
    first, *others = node_of_three
    assert first.once_per_node("listing/train", make, dump, load) == {"files": ["a", "b\tc"]}
    ((_, path),) = first._node_files
    assert path.is_file() and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    first.close()  # finished before the others read it (they are still starting): it stays
    assert path.is_file()
    got: dict[int, dict] = {}
    readers = [
        threading.Thread(
            target=lambda g=g: got.update(
                {g.rank: g.once_per_node("listing/train", make, dump, load)}
            )
        )  # fmt: skip
        for g in others
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=10)
    assert made == [1] and got == {r: {"files": ["a", "b\tc"]} for r in (1, 2)}
    assert not path.parent.exists()  # the last reader removed it
    for group in others:
        group.close()


def test_a_stopping_first_rank_removes_the_node_file_without_waiting(node_of_three):
    first = node_of_three[0]
    first.once_per_node("listing/val", lambda: b"x", bytes, bytes)  # nobody reads it
    ((_, path),) = first._node_files
    started = time.monotonic()
    first.close(finished=False)
    assert not path.parent.exists() and time.monotonic() - started < 5
    for group in node_of_three[1:]:
        group.close()


def test_a_group_of_one_per_node_makes_it_in_place(pair):
    made = pair[0].once_per_node("listing/train", lambda: [1, 2], None, None)  # type: ignore[arg-type]
    assert made == [1, 2] and not pair[0]._node_files


def test_without_room_for_the_node_file_each_rank_makes_its_own(node_of_three, monkeypatch, caplog):
    """A full (or private) temporary folder: slower, never wrong; the first rank says why."""
    import errno
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    made: list[int] = []

    def make() -> int:
        made.append(1)
        return 42

    first, *others = node_of_three
    dump = lambda value: str(value).encode()  # noqa: E731
    assert first.once_per_node("listing/train", make, dump, int) == 42
    assert "No space left on device" in caplog.text and "each makes its own" in caplog.text
    assert [g.once_per_node("listing/train", make, dump, int) for g in others] == [42, 42]
    assert made == [1, 1, 1] and not first._node_files
    for group in node_of_three:
        group.close()


def test_a_node_file_gone_before_it_is_read_is_made_again(node_of_three):
    first, second, third = node_of_three
    first.once_per_node("listing/val", lambda: 7, lambda v: str(v).encode(), int)
    ((_, path),) = first._node_files
    assert second.once_per_node("listing/val", lambda: 0, bytes, int) == 7  # read
    path.unlink()
    assert third.once_per_node("listing/val", lambda: 8, bytes, int) == 8  # made
    for group in node_of_three[::-1]:
        group.close()  # the first rank's close still sees both readers


def test_a_tally_adds_every_ranks_counts_and_a_wait_ticks(pair):
    zero, one = pair
    assert zero.tally("train/progress", 5) == 5 and one.tally("train/progress", 7) == 12
    assert zero.tally("train/progress") == 12 and WorkGroup().tally("x", 3) == 3
    ticks: list[int] = []
    one.done("built")
    waiting = threading.Thread(target=lambda: zero.wait_all("built", lambda: ticks.append(1)))
    waiting.start()
    time.sleep(0.5)  # zero waits for itself: it ticks meanwhile
    zero.done("built")
    waiting.join(timeout=10)
    assert not waiting.is_alive() and ticks


def test_rank_zeros_bar_shows_every_ranks_images(pair, tmp_path, monkeypatch):
    """Two ranks (threads, a real store) build one split: rank 0's bar ends at the split's
    images, its own and rank 1's, not its share."""
    from tqdm import tqdm

    from pipeline import Key
    from pipeline.offline import build
    from tests.conftest import FIXED_SECRET, write_jpeg_tree

    shown: list[tuple[int, int]] = []

    class Bar(tqdm):
        def close(self):
            if not self.disable:
                shown.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(build, "tqdm", Bar)
    monkeypatch.setenv("TQDM_DISABLE", "")  # rank 0's bar on, whatever the environment says
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=6, val=2, size=(48, 40))
    config = build.ShardConfig(src=str(src), out=str(tmp_path / "out"), splits=("train",),
                               size=32, decoder="pil", shard_size="3", batch_size=3,
                               encrypt_device="cpu", num_threads=1)  # fmt: skip
    errors = run_ranks(pair, lambda g: build.build_shards(config, Key(FIXED_SECRET), group=g))
    assert not errors, errors
    assert shown == [(12, 12)]  # one bar (rank 0's), every rank's 12 images


def test_a_resumed_job_spreads_the_shards_a_failed_rank_left_over_every_rank(
    pair, tmp_path, monkeypatch
):
    """A run made every shard but those a failed node held (1, 3, 5, 7: rank 1's of two under a
    fixed split). Resumed with two ranks (threads, a real store), both build some of them (each
    rank's first build waits until the other has one too: with a fixed split that wait would
    fail), none is built twice, and the output is the bytes of one clean process."""
    from pipeline import Key
    from pipeline.offline import build, makers
    from tests.conftest import FIXED_SECRET, write_jpeg_tree

    src = write_jpeg_tree(tmp_path / "src", classes=2, train=12, val=2, size=(48, 40))

    def config(out: str) -> build.ShardConfig:
        return build.ShardConfig(src=str(src), out=str(tmp_path / out), splits=("train",),
                                 size=32, decoder="pil", shard_size="3", batch_size=3,
                                 encrypt_device="cpu", num_threads=1)  # fmt: skip

    key = Key(FIXED_SECRET)
    with monkeypatch.context() as m:  # every shard made, then the job dies before its manifest
        m.setattr(build, "_finish_split", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build.build_shards(config("out"), key)
    for index in (1, 3, 5, 7):  # the failed node's shards: never published
        (tmp_path / "out" / "_progress" / f"train.{index:06d}.json").unlink()
        (tmp_path / "out" / f"train-{index:06d}.tar").unlink()

    built: dict[str, list[int]] = {"rank0": [], "rank1": []}
    both_started = threading.Barrier(2, timeout=60)
    real_build = makers.ShardProcesses.build

    def build_and_note(self, index):
        name = threading.current_thread().name
        if not built[name]:
            both_started.wait()
        built[name].append(index)
        return real_build(self, index)

    with monkeypatch.context() as m:
        m.setattr(makers.ShardProcesses, "build", build_and_note)
        errors = run_ranks(pair, lambda g: build.build_shards(config("out"), key, group=g))
    assert not errors, errors
    assert sorted(built["rank0"] + built["rank1"]) == [1, 3, 5, 7]
    assert built["rank0"] and built["rank1"]
    build.build_shards(config("clean"), key)
    made = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert made == {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}


def test_a_second_build_in_the_same_group_is_a_build_of_its_own(pair, tmp_path):
    """Two ranks (threads, a real store) build one output, then another: the second build's
    steps are not the first's (its shards are not taken already, its verdict is its own), and
    both outputs are whole."""
    from pipeline import Key
    from pipeline.offline import build
    from tests.conftest import FIXED_SECRET, write_jpeg_tree

    src = write_jpeg_tree(tmp_path / "src", classes=2, train=6, val=2, size=(48, 40))

    def config(out: str) -> build.ShardConfig:
        return build.ShardConfig(src=str(src), out=str(tmp_path / out), splits=("train",),
                                 size=32, decoder="pil", shard_size="3", batch_size=3,
                                 encrypt_device="cpu", num_threads=1)  # fmt: skip

    def two_builds(group: WorkGroup) -> None:
        for out in ("first", "second"):
            build.build_shards(config(out), Key(FIXED_SECRET), group=group)

    errors = run_ranks(pair, two_builds)
    assert not errors, errors
    first, second = (sorted((tmp_path / out).glob("train-*.tar")) for out in ("first", "second"))
    assert len(first) == 4 and [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
