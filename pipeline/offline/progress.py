"""A split's progress under ``OUT/_progress/``: the options file of an unfinished run and a
record per finished shard (what makes a rerun resume exactly), and the publisher that moves a
finished shard, then its record, to the output."""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from pipeline.offline.config import ShardBuildError
from pipeline.offline.makers import ShardResult
from pipeline.shards.format import ShardRecord, index_name
from pipeline.storage import Storage

if TYPE_CHECKING:  # plan.py imports this module
    from pipeline.offline.plan import SplitIdentity, SplitPlan

logger = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
PUBLISH_QUEUE = 2  # finished shards waiting for (or in) their upload; the builder waits beyond


class Progress:
    """Per-split progress records under ``OUT/_progress/``, and the options they were made with."""

    def __init__(self, storage: Storage, split: str) -> None:
        self.storage, self.split = storage, split

    def _name(self, leaf: str) -> str:
        return f"{PROGRESS_DIR}/{self.split}.{leaf}.json"

    def read_options(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(self._name("options")))
        except FileNotFoundError:
            return None

    def write_options(self, identity: SplitIdentity) -> None:
        self.storage.fs.makedirs(self.storage.path(PROGRESS_DIR), exist_ok=True)
        self.storage.write_bytes(self._name("options"), record_bytes(identity.to_json()))

    def recorded(self) -> set[int]:
        """The shard indices with a progress record (one listing, not a request per shard)."""
        names = self.storage.list_prefix(f"{PROGRESS_DIR}/{self.split}.")
        leaves = (n.rsplit("/", 1)[1].split(".")[1] for n in names)
        return {int(leaf) for leaf in leaves if leaf.isdigit()}

    def read_shard(self, index: int) -> dict | None:
        name = self._name(f"{index:06d}")
        try:
            return json.loads(self.storage.read_bytes(name))
        except FileNotFoundError:
            return None

    def write_shard(self, index: int, result: ShardResult, plan: SplitPlan) -> None:
        entry = {
            "key_fingerprint": plan.identity.key_fingerprint,
            "identity_digest": plan.digest,
            "record": result.record.to_dict() if result.record else None,
            "rejects": result.rejects,
            "rows": result.rows,
        }
        self.storage.write_bytes(self._name(f"{index:06d}"), record_bytes(entry))

    def clear(self) -> None:
        self.storage.remove_many(self.storage.list_prefix(f"{PROGRESS_DIR}/{self.split}."))
        self.storage.remove_folder_if_empty(PROGRESS_DIR)


def record_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def finished_shard(
    storage: Storage, state: Progress, index: int, digest: str
) -> ShardResult | None:
    """Shard ``index`` as a previous run recorded it, when the record was made under this
    identity (``digest``) and its file is there at its recorded size; else None: rebuild it."""
    entry = state.read_shard(index)
    if entry is None or entry.get("identity_digest") != digest:
        return None  # not made, or made under another key or options: rebuild it
    record = ShardRecord(**entry["record"]) if entry["record"] else None
    if record is not None and (
        not storage.exists(record.name) or storage.size(record.name) != record.stored_bytes
    ):
        return None  # recorded but missing or different: rebuild it
    return ShardResult(record, entry["rejects"], entry["rows"])


class Publisher:
    """Moves finished shards (DALI index, then shard, then progress record) to the output on
    one background thread, in order. At most ``PUBLISH_QUEUE`` shards wait or move at once;
    ``submit`` waits for the oldest beyond that, so staging disk and memory stay bounded."""

    def __init__(self, storage: Storage, state: Progress, plan: SplitPlan) -> None:
        self.storage, self.state, self.plan = storage, state, plan
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-publish")
        self._pending: deque[Future] = deque()

    def submit(self, index: int, result: ShardResult, index_text: str | None) -> None:
        while len(self._pending) >= PUBLISH_QUEUE:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._publish, index, result, index_text))

    def _publish(self, index: int, result: ShardResult, index_text: str | None) -> None:
        if result.record is not None:
            name = result.record.name
            staged = self.storage.staging_path(name)
            try:
                assert index_text is not None  # every written shard has its index
                self.storage.write_bytes(index_name(name), index_text.encode())  # before its shard
                self.storage.put(staged, name)
            except OSError as exc:
                staged.unlink(missing_ok=True)
                raise ShardBuildError(
                    f"{self.storage.uri(name)}: could not write the finished shard ({exc}); "
                    "finished shards are kept and a rerun resumes"
                ) from exc
        self.state.write_shard(index, result, self.plan)
        logger.debug("%s: shard %d of %d finished (%d images)", self.plan.split, index,
                     self.plan.n_shards, len(self.plan.chunk(index)))  # fmt: skip

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Let queued shards finish publishing; errors here are logged (one is being raised)."""
        for future in self._pending:
            with contextlib.suppress(BaseException):
                future.result()
        self._pending.clear()
        self._pool.shutdown()
