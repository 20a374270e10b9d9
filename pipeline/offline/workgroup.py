"""The ranks of one ``torchrun`` job building shards together (one process: a group of one).

Each rank takes the split's next shard when it is ready for one (a counter in the store,
:meth:`WorkGroup.claims`): a shard's bytes depend on its index alone, so who builds it does not
matter, and a faster rank (a free GPU, a nearer disk) takes more; with a fixed split (rank ``r``
the shards ``r`` modulo ``W``) the job waits for its slowest rank, and a resumed job for the
ranks whose shards a failed node left unbuilt. The ranks coordinate only
through torch.distributed's key-value store (``torch.distributed.rendezvous("env://")``: the
TCPStore that torchrun's agent hosts) and never through a collective, so a long healthy build
cannot run into a collective timeout: every wait is a poll of the store that also watches for

- a failure: a rank that fails posts its error (naming the shard) under ``failed``; the others
  see it before their next shard or while waiting, and stop with that message;
- a vanished rank (``kill -9``, a lost node): each rank bumps a heartbeat counter every
  ``HEARTBEAT_S`` seconds from a thread; a counter that does not move for ``DEAD_AFTER_S``
  seconds stops the others. On one node torchrun's agent already ends the job within a second
  of a worker's non-zero exit; the heartbeat covers a worker lost on another node.

Keys live under ``keyprotect/make_shards/<restart count>/`` so that a torchrun restart
(``--max-restarts``) does not see the previous attempt's flags, and each build's steps under
``build<n>/`` so that a second ``build_shards`` in the same job does not see the first's.

What every rank of a node needs but one can make (the source listing: millions of ``stat``
calls on a shared file system) goes through :meth:`WorkGroup.once_per_node`: the node's first
rank makes it and leaves its bytes in a private file for the node's other ranks; the store
carries only the file's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import KeyprotectError

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
DEAD_AFTER_S = 60.0
POLL_S = 0.2
CHECK_EVERY_S = 5.0  # how often check() looks at the heartbeats (the failure flag: every call)


def cores_per_rank() -> int:
    """The cores this process may use (its CPU affinity: a container's or Slurm's share) over
    the ranks torchrun started on this node (``LOCAL_WORLD_SIZE``); at least 1. ``make_shards
    --threads auto``: PIL's shard processes, or a GPU decoder's CPU threads, one per core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


T = TypeVar("T")


class WorkGroupError(KeyprotectError, RuntimeError):
    """Another rank failed or vanished, or the job's store is gone; the message says which."""


class WorkGroup:
    """This process's place in the job: ``rank`` of ``world_size`` and its ``local_rank``."""

    def __init__(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        run_id: str | None = None,
        store: Any = None,
        node: int = 0,
        local_world_size: int = 1,
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node, self.local_world_size = node, local_world_size  # torchrun's GROUP_RANK
        self.run_id = run_id
        self._store = store
        self._node_files: list[tuple[str, Path]] = []  # this node's shared files, by key
        self._build = 0  # the builds this group has started: each one's names are its own
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when it moved)
        self._checked = 0.0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        if store is not None:
            self._store.add(f"alive/{rank}", 1)
            self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            self._beat.start()

    @classmethod
    def from_env(cls) -> WorkGroup:
        """From torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
        ``MASTER_PORT``); without them, a group of one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or None
        if world <= 1:
            return cls(local_rank=local_rank, run_id=run_id)
        import torch.distributed as dist

        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(minutes=30)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"keyprotect/make_shards/{attempt}/", store)
        node = int(os.environ.get("GROUP_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return cls(rank=rank, world_size=world, local_rank=local_rank, run_id=run_id, store=store,
                   node=node, local_world_size=local_world)  # fmt: skip

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def next_build(self) -> None:
        """Start another build in this group (``build_shards``): the names of the steps below
        are then new ones, so a second build in the same job never sees the first's (every
        rank starts as many builds, so the ranks agree on the names)."""
        self._build += 1

    def _scoped(self, name: str) -> str:
        return f"build{self._build}/{name}"

    def claims(self, name: str, count: int) -> Iterator[int]:
        """The indices below ``count`` this rank takes, each taken by the first rank that asks
        for it (a counter in the job's store): a faster rank takes more, and a resumed job's
        unfinished shards go to every rank, not to those that held them when a node failed. A
        group of one takes them all, in order."""
        if self._store is None:
            yield from range(count)
            return
        counter = self._scoped(f"claims/{name}")
        while (index := int(self._store.add(counter, 1)) - 1) < count:
            yield index

    def share(self, name: str, value: str | None = None) -> str:
        """Rank 0 passes ``value``; every rank gets it back (the others wait for it)."""
        if self._store is None:
            assert value is not None
            return value
        key = self._scoped(name)
        if self.is_primary:
            assert value is not None
            self._store.set(key, value)
            return value
        self._wait(lambda: self._store.check([key]), f"rank 0 ({name})")
        return self._store.get(key).decode()

    def done(self, name: str, value: str = "1") -> None:
        """Say that this rank finished step ``name`` (with ``value``: what it reports)."""
        if self._store is not None:
            self._store.set(self._scoped(f"{name}/{self.rank}"), value)

    def wait_all(self, name: str, tick: Callable[[], None] | None = None) -> list[str]:
        """Wait until every rank said ``done(name)``; their values, by rank (none alone).
        ``tick`` is called at each poll (a progress bar's refresh)."""
        if self._store is None:
            return []
        keys = [self._scoped(f"{name}/{r}") for r in range(self.world_size)]
        self._wait(lambda: self._store.check(keys), f"every rank to finish {name}", tick)
        return [self._store.get(k).decode() for k in keys]

    def tally(self, name: str, count: int = 0) -> int:
        """Add ``count`` to the job's counter ``name`` (every rank's together); its total (in
        a group of one, ``count``: there is no job beyond this process)."""
        if self._store is None:
            return count
        return int(self._store.add(self._scoped(name), count))

    def once_per_node(
        self,
        name: str,
        make: Callable[[], T],
        dump: Callable[[T], bytes],
        load: Callable[[bytes], T],
    ) -> T:
        """``make()`` on this node's first rank (``LOCAL_RANK`` 0) alone; the node's other ranks
        get it through a file only this user can read (``dump``, then ``load``), named to
        them in the store. The last of them to read it removes it (or the first rank, when the
        job stops before they have: :meth:`close`). Where the file cannot be written or read
        (a full or private temporary folder), each rank makes its own, with a warning: slower,
        never wrong."""
        if self._store is None or self.local_world_size <= 1:
            return make()
        key = self._scoped(f"node/{self.node}/{name}")
        if self.local_rank == 0:
            value = make()
            folder = Path(tempfile.mkdtemp(prefix="keyprotect-node-"))  # mode 0700
            path = folder / "data"
            try:
                path.write_bytes(dump(value))
            except OSError as exc:
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning("%s: could not leave %s for this node's other ranks (%s); each "
                               "makes its own", folder, name, exc)  # fmt: skip
                self._store.set(key, "")
                return value
            self._node_files.append((key, path))
            self._store.set(key, str(path))
            return value
        self._wait(lambda: self._store.check([key]), f"this node's first rank ({name})")
        where = self._store.get(key).decode()
        try:
            if not where:  # the first rank could not write it
                return make()
            try:
                data = Path(where).read_bytes()
            except OSError as exc:
                logger.warning("rank %d: could not read %s from %s (%s); making it here",
                               self.rank, name, where, exc)  # fmt: skip
                return make()
            return load(data)
        finally:
            if int(self._store.add(f"{key}/read", 1)) >= self.local_world_size - 1 and where:
                shutil.rmtree(Path(where).parent, ignore_errors=True)  # the last reader

    def _remove_node_files(self, stopping: bool) -> None:
        """This node's shared files that the last reader has not removed: now when the job is
        stopping (a reader may never come), else left to that reader (one still starting)."""
        readers = self.local_world_size - 1
        for key, path in self._node_files:
            read = readers
            with contextlib.suppress(Exception):  # the store is gone: remove the file anyway
                read = int(self._store.add(f"{key}/read", 0))
            if stopping or read >= readers:
                shutil.rmtree(path.parent, ignore_errors=True)
        self._node_files.clear()

    def fail(self, message: str) -> None:
        """Tell the other ranks that this one failed (best effort: the store may be gone)."""
        if self._store is None:
            return
        try:
            if not self._store.check(["failed"]):
                self._store.set("failed", f"rank {self.rank}: {message}")
        except Exception:  # noqa: BLE001 - already failing; the caller reports the real error
            logger.debug("could not post the failure to the job's store", exc_info=True)

    def check(self) -> None:
        """Raise ``WorkGroupError`` if another rank failed or vanished."""
        if self._store is None:
            return
        try:
            if self._store.check(["failed"]):
                raise WorkGroupError(f"stopping: {self._store.get('failed').decode()}")
            if time.monotonic() - self._checked >= CHECK_EVERY_S:
                self._checked = time.monotonic()
                self._check_heartbeats()
        except WorkGroupError:
            raise
        except Exception as exc:  # the store's host (torchrun's agent on the first node) is gone
            raise WorkGroupError(
                f"rank {self.rank}: lost the job's store ({exc}); torchrun's first node has "
                "stopped. Finished shards are kept: rerun to resume"
            ) from None

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for r in range(self.world_size):
            count = int(self._store.add(f"alive/{r}", 0))
            seen = self._seen.get(r)
            if seen is None or seen[0] != count:
                self._seen[r] = (count, now)
            elif now - seen[1] > DEAD_AFTER_S:
                raise WorkGroupError(
                    f"stopping: rank {r} gave no sign of life for {DEAD_AFTER_S:.0f} s (killed, "
                    "or its node lost); finished shards are kept: rerun to resume"
                )

    def _wait(self, ready, what: str, tick: Callable[[], None] | None = None) -> None:
        logger.debug("rank %d: waiting for %s", self.rank, what)
        while True:
            self.check()
            if ready():
                return
            if tick is not None:
                tick()
            time.sleep(POLL_S)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._store.add(f"alive/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone; check() reports it
                return

    def close(self, *, finished: bool = True) -> None:
        """Stop the heartbeat; ``finished=False`` (an error, Ctrl-C) also removes this node's
        shared files that a rank has not read yet."""
        self._remove_node_files(stopping=not finished)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
