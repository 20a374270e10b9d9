"""How one rank makes its shards, in one of two ways.

- :class:`ShardMaker`: a decoder hands this process its images (DALI, nvJPEG, or PIL before
  GPU encryption); batches decode two ahead while this process encrypts one and a writer
  thread writes the one before.
- :class:`ShardProcesses`: all the work is on the CPU (PIL, numpy encryption), so each of
  ``--threads`` worker processes reads, decodes, encrypts and writes whole shards, and this
  process only publishes them (``pipeline.offline.build``).

Either way a shard's bytes depend on its items and the key alone.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cipher.blockwise import encrypt
from pipeline.cipher.keys import Key
from pipeline.cipher.seal import Sealer
from pipeline.errors import ConfigError
from pipeline.offline.decode import (
    DecodeError,
    DecoderCrashed,
    InlinePilDecoder,
    forkserver_context,
    interrupts_held,
    probe,
)
from pipeline.offline.sourcemap import reject_entry
from pipeline.offline.sources import SourceItem
from pipeline.shards.format import ShardRecord, ShardWriter, sample_files, shard_name
from pipeline.storage import Storage

if TYPE_CHECKING:  # build.py imports this module
    from pipeline.offline.config import BuildStats, ShardConfig
    from pipeline.offline.plan import SplitPlan
    from pipeline.offline.workgroup import WorkGroup


DECODE_AHEAD = 2  # batches decoding while the builder encrypts and writes the one before
# a batch's files are read in this many parts at once: one file at a time, a network file
# system's latency would cap a rank (2 ms a file, two batches ahead: 1,000 img/s, under what a
# GPU decoder does)
READ_PARTS = 8


@dataclass
class ShardResult:
    """One shard's outcome: its record (None if every file was rejected), rejects, and rows
    ``[key, label, source]`` for the per-sample table."""

    record: ShardRecord | None
    rejects: list[dict]
    rows: list[list]


def make_decoder(config: ShardConfig, decoder: str, device: str, device_id: int = 0):
    """This rank's ``decoder`` (as chosen by :func:`choose_decoder`), on GPU ``device_id``
    (``pipeline.device.rank_gpu``) when it decodes on the GPU."""
    if decoder == "pil":
        from pipeline.offline.decode import PilDecoder

        return PilDecoder(config.size, num_threads=config.num_threads, max_pixels=config.max_pixels)
    if decoder == "nvjpeg":
        from pipeline.offline.nvjpeg import NvjpegDecoder

        return NvjpegDecoder(config.size, device_id=device_id, num_threads=config.num_threads,
                             max_pixels=config.max_pixels)  # fmt: skip
    if decoder == "dali":
        from pipeline.offline.dali import DaliDecoder

        return DaliDecoder(
            config.size,
            device=device,
            batch_size=config.batch_size,
            num_threads=config.num_threads,
            device_id=device_id,
        )
    raise ConfigError(f"--decoder {decoder!r} must be dali, nvjpeg or pil")


def _batches(items: Sequence[SourceItem], size: int) -> Iterator[Sequence[SourceItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _decode_ahead(
    pool: ThreadPoolExecutor,
    batches: Iterable[Sequence[SourceItem]],
    config: ShardConfig,
    decoder,
    depth: int = DECODE_AHEAD,
    read_pool: ThreadPoolExecutor | None = None,
    seconds: dict[str, float] | None = None,
) -> Generator[tuple[list[DecodeError | None], Any], None, None]:
    """``_decode_stage`` of each batch, in order, with up to ``depth`` batches decoding on
    ``pool`` (which has ``depth`` workers) meanwhile, across shard boundaries. With one batch in
    flight a decoder's threads idled at each batch's tail and while the batch was read, checked
    and stacked; with two, the next batch's images queue behind this one's on the decoder's
    threads. Results come back in order, so the bytes do not depend on ``depth``."""
    src, pending = Path(config.src), deque[Future]()
    seconds = seconds if seconds is not None else {}

    def result(future: Future) -> tuple[list[DecodeError | None], Any]:
        decoded, clock = future.result()
        for stage, spent in clock.items():  # added up here, in the one consuming thread
            seconds[stage] = seconds.get(stage, 0.0) + spent
        return decoded

    try:
        for batch in batches:
            pending.append(
                pool.submit(_decode_timed, src, batch, config.max_pixels, decoder, read_pool)
            )
            if len(pending) > depth:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
    finally:  # closed early (an error): let the decodes in flight end before the decoder closes
        for future in pending:
            future.cancel()
        for future in pending:
            with contextlib.suppress(BaseException):
                future.result()


def _read_all(paths: Sequence[Path]) -> list[bytes]:
    return [path.read_bytes() for path in paths]


def _read_files(
    src: Path, batch: Sequence[SourceItem], pool: ThreadPoolExecutor | None
) -> list[bytes]:
    """The batch's files, in order; on ``pool``, in up to ``READ_PARTS`` parts at once (a
    part per thread, not a file: on a local disk that costs nothing more)."""
    paths = [src / it.path for it in batch]
    if pool is None or len(paths) < 2:
        return _read_all(paths)
    size = -(-len(paths) // READ_PARTS)
    parts = [paths[i : i + size] for i in range(0, len(paths), size)]
    return [blob for part in pool.map(_read_all, parts) for blob in part]


def _decode_timed(
    src: Path,
    batch: Sequence[SourceItem],
    max_pixels: int,
    decoder,
    read_pool: ThreadPoolExecutor | None,
) -> tuple[tuple[list[DecodeError | None], Any], dict[str, float]]:
    """``_decode_stage``, and the wall seconds it spent reading the files and decoding them."""
    clock: dict[str, float] = {}
    return _decode_stage(src, batch, max_pixels, decoder, read_pool, clock), clock


def _decode_stage(
    src: Path,
    batch: Sequence[SourceItem],
    max_pixels: int,
    decoder,
    read_pool: ThreadPoolExecutor | None = None,
    clock: dict[str, float] | None = None,
) -> tuple[list[DecodeError | None], Any]:
    """Read, check and decode one batch. Returns a ``DecodeError`` or None per item, and the
    decoded images stacked into one array (numpy, or a CUDA tensor from the GPU decoder);
    ``clock`` receives the seconds spent reading and decoding."""
    started = time.perf_counter()
    blobs = _read_files(src, batch, read_pool)
    read = time.perf_counter()
    if clock is not None:
        clock["read"] = read - started
    errors: list[DecodeError | None] = [probe(b, max_pixels) for b in blobs]
    good = [i for i, e in enumerate(errors) if e is None]
    images = []
    for i, image in zip(good, decoder.decode([blobs[i] for i in good]), strict=True):
        if isinstance(image, DecodeError):
            errors[i] = image
        else:
            images.append(image)
    stacked: Any = None  # numpy, or a CUDA tensor
    if images and isinstance(images[0], np.ndarray):
        stacked = np.stack(images)
    elif images:
        import torch

        stacked = torch.stack(images)
    if clock is not None:
        clock["decode"] = time.perf_counter() - read
    return errors, stacked


def _samples(
    batch: Sequence[SourceItem],
    errors: list[DecodeError | None],
    images: Iterator[np.ndarray],
    position: int,
    *,
    encrypted: bool,
    split: str,
) -> tuple[list[tuple[str, dict[str, bytes]]], list[dict], list[list]]:
    """One decoded batch's samples (key, files), rejects and per-sample table rows; the keys
    count on from ``position``, rejected files included."""
    samples, rejects, rows = [], [], []
    for offset, (item, error) in enumerate(zip(batch, errors, strict=True)):
        sample_key = f"{position + offset:08d}"
        if error is not None:
            rejects.append(reject_entry(item, sample_key, error.reason, encrypted=encrypted))
            continue
        source = None if encrypted else item.path  # encrypted: names no source
        samples.append((sample_key, sample_files(next(images), item.label, source, split)))
        rows.append([sample_key, item.label, source])
    return samples, rejects, rows


def _finish_shard(
    writer: ShardWriter, rejects: list[dict], rows: list[list]
) -> tuple[ShardResult, str | None]:
    record = writer.close()
    if record.samples == 0:
        writer.path.unlink(missing_ok=True)
        return ShardResult(None, rejects, []), None
    return ShardResult(record, rejects, rows), writer.index_text()


def _stage_seconds() -> dict[str, float]:
    """Wall seconds of the builder (one thread) in build(), and waiting or encrypting within it;
    "read" and "decode": the decode threads' (DECODE_AHEAD of them), added up."""
    return dict.fromkeys(("build", "decoded", "encrypt", "writer", "read", "decode"), 0.0)


@dataclass(frozen=True)
class ShardMaker:
    """What every shard of one rank's share of a split is made with when a decoder hands this
    process its images (DALI, nvJPEG, or PIL before GPU encryption): the plan, the key, the
    decoded batches (two batches ahead, across shards), the writer thread and where to encrypt."""

    config: ShardConfig
    plan: SplitPlan
    key: Key | None = field(repr=False)
    storage: Storage
    decoded: Generator[tuple[list[DecodeError | None], Any], None, None]
    write_pool: ThreadPoolExecutor
    stats: BuildStats
    decoder: Any
    decode_pool: ThreadPoolExecutor
    read_pool: ThreadPoolExecutor
    encrypt_on: str = "auto"  # resolved for this rank by encryption_device()
    seconds: dict[str, float] = field(default_factory=_stage_seconds)

    @classmethod
    def start(
        cls,
        config: ShardConfig,
        plan: SplitPlan,
        key: Key | None,
        storage: Storage,
        stats: BuildStats,
        todo: Iterator[int],
        encrypt_on: str,
        group: WorkGroup,
    ) -> ShardMaker:
        gpu = 0
        if plan.device == "gpu":
            from pipeline.device import rank_gpu

            gpu = rank_gpu(group.local_rank)
        decoder = make_decoder(config, plan.decoder, plan.device, device_id=gpu)
        decode_pool = ThreadPoolExecutor(DECODE_AHEAD, thread_name_prefix="shard-decode")
        read_pool = ThreadPoolExecutor(DECODE_AHEAD * READ_PARTS, thread_name_prefix="shard-read")
        batches = (b for i in todo for b in _batches(plan.chunk(i), config.batch_size))
        seconds = _stage_seconds()  # shared with the decode stage, which adds its own
        return cls(config=config, plan=plan, key=key, storage=storage, seconds=seconds,
                   decoded=_decode_ahead(decode_pool, batches, config, decoder,
                                         read_pool=read_pool, seconds=seconds),
                   write_pool=ThreadPoolExecutor(1, thread_name_prefix="shard-write"),
                   stats=stats, decoder=decoder, decode_pool=decode_pool, read_pool=read_pool,
                   encrypt_on=encrypt_on)  # fmt: skip

    def close(self) -> None:
        self.decoded.close()
        self.decode_pool.shutdown()
        self.read_pool.shutdown()
        self.write_pool.shutdown()
        self.decoder.close()
        self.stats.worker_cpu_seconds += getattr(self.decoder, "cpu_seconds", 0.0)

    def build(self, index: int) -> tuple[ShardResult, str | None]:
        """Shard ``index``, in three overlapping stages: batches k+1 and k+2 decode while batch k is
        encrypted here and batch k-1 is written (another thread). Returns its result and DALI
        index text; the shard is left at its staging path, for ``_Publisher`` to move."""
        split, key, chunk = self.plan.split, self.key, self.plan.chunk(index)
        name = shard_name(split, index)
        rejects: list[dict] = []
        rows: list[list] = []
        # unsynced: the publisher's thread syncs it before it takes its name (an upload needs
        # no sync), so this thread never waits on the disk (an fsync was ~15% of its time)
        writer = ShardWriter(self.storage.staging_path(name), name,
                             sealer=self.storage.sealer, sync=False)  # fmt: skip
        writing: Future | None = None
        seconds, begun = self.seconds, time.perf_counter()
        try:
            position = index * self.plan.per_shard
            for batch in _batches(chunk, self.config.batch_size):
                waited = time.perf_counter()
                errors, decoded = next(self.decoded)
                started, cpu = time.perf_counter(), time.thread_time()
                seconds["decoded"] += started - waited
                if self.stats.first_batch_at is None:
                    self.stats.first_batch_at = started
                    self.stats.first_batch_images = sum(e is None for e in errors)
                images = iter(_encrypt_batch(decoded, key, self.encrypt_on))
                encrypting = time.perf_counter() - started
                seconds["encrypt"] += encrypting
                self.stats.encrypt_seconds += encrypting
                self.stats.encrypt_cpu_seconds += time.thread_time() - cpu
                samples, more_rejects, more_rows = _samples(
                    batch, errors, images, position, encrypted=key is not None, split=split
                )
                rejects += more_rejects
                rows += more_rows
                position += len(batch)
                waited = time.perf_counter()
                if writing is not None:
                    writing.result()
                seconds["writer"] += time.perf_counter() - waited
                writing = self.write_pool.submit(_write_samples, writer, samples)
            waited = time.perf_counter()
            if writing is not None:
                writing.result()
            seconds["writer"] += time.perf_counter() - waited
            result = _finish_shard(writer, rejects, rows)
        except BaseException:
            if writing is not None:  # let the writer finish before cleaning up
                with contextlib.suppress(BaseException):  # the first error is re-raised below
                    writing.result()
            writer.abort()
            raise
        self.stats.images += len(chunk) - len(rejects)  # made: the rejected ones are not
        self.stats.rejected += len(rejects)
        seconds["build"] += time.perf_counter() - begun
        return result

    def time_report(self) -> str:
        """Where this rank's builder spent its time: the stage that held it up. Mostly waiting
        for decoded batches: the decoder (or reading the files) is the limit; mostly elsewhere:
        this process's own work per image is."""
        s = self.seconds
        total = max(s["build"], 1e-9)
        rest = max(total - s["decoded"] - s["encrypt"] - s["writer"], 0.0)
        return (
            f"the builder spent {_duration(s['build'])}: {s['decoded'] / total:.0%} waiting for "
            f"decoded batches, {s['encrypt'] / total:.0%} encrypting (and copying to the host), "
            f"{s['writer'] / total:.0%} waiting for the writer, {rest / total:.0%} making samples; "
            f"its {DECODE_AHEAD} decode threads spent {_duration(s['read'])} reading files and "
            f"{_duration(s['decode'])} decoding"
        )


def _duration(seconds: float) -> str:
    """Seconds as a person reads them: milliseconds below one second, so that a short run's
    stages do not all read 0.0 s."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


@dataclass(frozen=True)
class _ShardJob:
    """One shard for a shard-building process: everything that shapes its bytes but the key."""

    name: str
    split: str
    staging: Path
    items: list[SourceItem]
    position: int  # the first sample's number
    src: str
    size: int
    max_pixels: int
    batch_size: int
    sync: bool  # a local output: synced here, in parallel (the publisher's sync is then cheap)


_process_keys: dict[str, Any] = {}  # a shard-building process's key and sealer


def _start_shard_process(key: Key | None, sealing: tuple[str, str] | None) -> None:
    sealer = None if sealing is None else Sealer.from_secret_parts(sealing)
    _process_keys.update(key=key, sealer=sealer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _make_shard(job: _ShardJob) -> tuple[ShardResult, str | None, dict[str, float]]:
    """In a shard-building process: read, check, decode (PIL), encrypt (numpy) and write one
    whole shard to its staging path; its result, DALI index and what it counted."""
    key, sealer = _process_keys["key"], _process_keys["sealer"]
    started, encrypt_cpu = time.process_time(), 0.0
    decoder = InlinePilDecoder(job.size, max_pixels=job.max_pixels)
    split = job.split
    rejects: list[dict] = []
    rows: list[list] = []
    writer = ShardWriter(job.staging, job.name, sealer=sealer, sync=job.sync)
    try:
        position = job.position
        for batch in _batches(job.items, job.batch_size):
            errors, decoded = _decode_stage(Path(job.src), batch, job.max_pixels, decoder)
            encrypting = time.process_time()
            images = iter(_encrypt_batch(decoded, key))  # numpy: no torch import here
            encrypt_cpu += time.process_time() - encrypting
            samples, more_rejects, more_rows = _samples(
                batch, errors, images, position, encrypted=key is not None, split=split
            )
            _write_samples(writer, samples)
            rejects += more_rejects
            rows += more_rows
            position += len(batch)
        result, index_text = _finish_shard(writer, rejects, rows)
    except BaseException:
        writer.abort()
        raise
    counts = {"images": len(job.items) - len(rejects), "rejected": len(rejects),
              "encrypt_cpu": encrypt_cpu, "cpu": time.process_time() - started}  # fmt: skip
    return result, index_text, counts


class ShardProcesses:
    """Whole shards built in ``--threads`` processes when all the work is on the CPU (PIL,
    numpy encryption): each process reads, decodes, encrypts and writes its own shards, so
    this process handles no image. With the images passing through one builder (encryption,
    the tar writer, hashing), one rank stopped at about 1,300 img/s on 16 cores (GPU check,
    2026-12-04). Shards come back in order; a shard's bytes depend on its items alone."""

    def __init__(
        self,
        config: ShardConfig,
        plan: SplitPlan,
        key: Key | None,
        storage: Storage,
        stats: BuildStats,
        todo: Iterator[int],
    ) -> None:
        self.config, self.plan, self.storage, self.stats = config, plan, storage, stats
        workers = max(1, config.num_threads)
        # shards building or waiting their turn to be published: at most this many are staged
        self.ahead = workers + 2
        self.todo = todo  # taken as processes come free (each taken shard is this rank's)
        self.futures: dict[int, Future] = {}
        self.workers, self.started = workers, time.perf_counter()
        # the processes' CPU seconds, and this process's wall seconds waiting for their shards
        self.seconds = {"cpu": 0.0, "waited": 0.0, "last": self.started}
        # the keys travel once per process, through its start-up pipe
        sealing = None if storage.sealer is None else storage.sealer.secret_parts()
        self.pool = ProcessPoolExecutor(workers, mp_context=forkserver_context(__name__),
                                        initializer=_start_shard_process,
                                        initargs=(key, sealing))  # fmt: skip

    def _submit_ahead(self) -> None:
        while len(self.futures) < self.ahead:
            index = next(self.todo, None)
            if index is None:
                return
            name = shard_name(self.plan.split, index)
            job = _ShardJob(name=name, split=self.plan.split,
                            staging=self.storage.staging_path(name),
                            items=self.plan.chunk(index), position=index * self.plan.per_shard,
                            src=self.config.src, size=self.config.size,
                            max_pixels=self.config.max_pixels,
                            batch_size=self.config.batch_size,
                            sync=self.storage.is_local)  # fmt: skip
            with interrupts_held():  # a submit may start a process
                self.futures[index] = self.pool.submit(_make_shard, job)

    def build(self, index: int) -> tuple[ShardResult, str | None]:
        self._submit_ahead()
        future = self.futures.pop(index)
        waited = time.perf_counter()
        try:
            result, index_text, counts = future.result()
        except BrokenProcessPool as exc:
            raise DecoderCrashed.of(exc) from None
        self.seconds["last"] = time.perf_counter()
        self.seconds["waited"] += self.seconds["last"] - waited
        self.seconds["cpu"] += counts["cpu"]
        self._submit_ahead()
        if self.stats.first_batch_at is None:  # here: the first shard back
            self.stats.first_batch_at = time.perf_counter()
            self.stats.first_batch_images = int(counts["images"])
        self.stats.images += int(counts["images"])
        self.stats.rejected += int(counts["rejected"])
        self.stats.encrypt_cpu_seconds += counts["encrypt_cpu"]
        self.stats.worker_cpu_seconds += counts["cpu"]
        return result, index_text

    def time_report(self) -> str:
        """How busy the shard processes were: their CPU seconds over processes x the time to
        the last shard. Well below 100%: they waited (for the disk, for the publisher, at the
        start and the tail); near it, the cores are the limit."""
        wall = max(self.seconds["last"] - self.started, 1e-9)
        busy = self.seconds["cpu"] / (self.workers * wall)
        return (
            f"{self.workers} shard process(es) busy {busy:.0%} of {wall:.1f} s; this process "
            f"waited {self.seconds['waited'] / wall:.0%} of it for their shards"
        )

    def close(self) -> None:
        """Stop: shards not started are dropped, those building finish; none of them is
        published, so their staging files go (a rerun builds them)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for index in self.futures:
            self.storage.staging_path(shard_name(self.plan.split, index)).unlink(missing_ok=True)
        self.futures.clear()


def _encrypt_batch(batch: Any, key: Key | None, device: str = "auto") -> list[np.ndarray]:
    """Encrypt a decoded batch where it is (numpy, or a CUDA tensor: no host round trip) or
    on ``device``, then hand numpy images to the writer."""
    if batch is None:
        return []
    if key is not None:
        if device != "auto":  # already resolved for this rank by encryption_device()
            import torch

            target = torch.device(device)
            if isinstance(batch, np.ndarray) and target.type != "cpu":
                batch = torch.from_numpy(batch).to(target)
            elif isinstance(batch, torch.Tensor):
                batch = batch.to(target)
        batch = encrypt(batch, key)
    return list(batch if isinstance(batch, np.ndarray) else batch.cpu().numpy())


def _write_samples(writer: ShardWriter, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    for key, files in samples:
        writer.write(key, files)
