"""A split's progress: the publisher runs behind the builder in a bounded queue."""

from __future__ import annotations

import time

from pipeline import Key
from pipeline.offline.config import ShardConfig
from pipeline.offline.makers import ShardResult
from pipeline.storage import Storage
from tests.conftest import FIXED_SECRET


def config(src, out) -> ShardConfig:
    return ShardConfig(src=str(src), out=str(out), size=64, shard_size="5", decoder="pil")


def test_publishing_runs_behind_the_builder_in_a_bounded_queue(jpeg_tree, tmp_path):
    """Two finished shards may wait for a slow store; the third waits for the first."""
    import threading

    from pipeline.offline.plan import plan_split
    from pipeline.offline.progress import Progress, Publisher

    class SlowStore(Storage):  # a real local store whose writes wait for the test's signal
        gate = threading.Event()

        def write_bytes(self, name: str, data: bytes) -> None:
            self.gate.wait(timeout=30)
            super().write_bytes(name, data)

    storage = SlowStore(tmp_path)
    plan = plan_split(config(jpeg_tree, tmp_path), "val", Key(FIXED_SECRET))
    publisher = Publisher(storage, Progress(storage, "val"), plan)
    empty = ShardResult(None, [], [])
    started = time.monotonic()
    publisher.submit(0, empty, None)
    publisher.submit(1, empty, None)
    assert time.monotonic() - started < 1  # the builder went on while nothing was written
    third = threading.Thread(target=publisher.submit, args=(2, empty, None))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # the queue is full: the builder waits
    SlowStore.gate.set()
    third.join(timeout=30)
    publisher.drain()
    publisher.close()
    assert sorted(p.name for p in (tmp_path / "_progress").iterdir()) == [
        "val.000000.json", "val.000001.json", "val.000002.json"]  # fmt: skip
