"""The offline stage: source images -> decoded, resized, encrypted WebDataset shards + manifest.

Shard ``k`` of a split always holds the selected items ``[k*S, (k+1)*S)`` minus the rejected
ones, so every shard can be built, skipped or rebuilt on its own. That is what makes resuming
exact: a finished shard leaves a record in ``OUT/_progress/``; a rerun with the same options skips
recorded shards whose file is present, rebuilds the rest byte for byte, and writes the manifest
last. Decoding (DALI or PIL threads), encryption (numpy, GIL released) and writing (a writer
thread) overlap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import __version__, paths
from pipeline.blockwise import encrypt
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, probe
from pipeline.keys import Key
from pipeline.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    manifest_name,
    samples_table_bytes,
    samples_table_name,
    write_manifest,
)
from pipeline.shards import ShardRecord, ShardWriter, index_name, sample_files, shard_name
from pipeline.sourcemap import log_rejects, reject_entry, reject_source
from pipeline.sources import SPLITS, SourceItem, listing_digest, select_split
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
TAR_OVERHEAD = 3 * 512 + 3 * 512 + 256  # three headers, padding and the JSON, per sample


@dataclass
class BuildStats:
    """What a run did, for the summary line and the benchmark."""

    images: int = 0
    encrypt_seconds: float = 0.0  # wall-clock seconds inside encryption (other stages overlap)
    encrypt_cpu_seconds: float = 0.0  # CPU seconds of the encrypting thread while encrypting
    seconds: float = 0.0  # wall-clock seconds of the whole run
    cpu_seconds: float = 0.0  # CPU seconds of the whole process, every thread


@dataclass
class ShardResult:
    """One shard's outcome: its record (None if every file was rejected), rejects, and rows
    ``[key, label, source]`` for the per-sample table."""

    record: ShardRecord | None
    rejects: list[dict]
    rows: list[list]


class ShardBuildError(RuntimeError):
    """The run cannot go on (too many rejects, a mismatched existing output, ...)."""


@dataclass(frozen=True)
class ShardConfig:
    """Everything that decides the shards' bytes, plus how to run."""

    src: str
    out: str = paths.SHARDS
    splits: tuple[str, ...] = SPLITS
    size: int = 224
    per_class: int | None = None
    fraction: float | None = None
    seed: int = 0
    classes_file: str | None = None
    shard_size: str = "1000"  # samples, or bytes with a unit: "200MB"
    decoder: str = "dali"
    device: str = "auto"
    # where encryption runs: "auto" (where the decoder left the images: the GPU after DALI's
    # GPU decoder, else the CPU), "cpu", "cuda[:N]" (e.g. PIL decoding, encryption on a GPU).
    # The bytes are the same on every device, so it is not one of the data options.
    encrypt_device: str = "auto"
    plain: bool = False
    max_reject_fraction: float = 0.01
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 64
    num_threads: int = 2
    overwrite: bool = False

    def data_options(self, device: str) -> dict:
        """The options that shape the shards' content (recorded; a rerun must match them)."""
        return {
            "size": self.size,
            "per_class": self.per_class,
            "fraction": self.fraction,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "decoder": self.decoder,
            "decode_device": device,
            "plain": self.plain,
            "max_pixels": self.max_pixels,
        }


def samples_per_shard(shard_size: str, sample_bytes: int) -> int:
    """``"1000"`` -> 1000 samples; ``"200MB"`` -> as many samples as fit in 200 MB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?i?[bB])?\s*", str(shard_size))
    if not match:
        raise ValueError(
            f"--shard-size {shard_size!r} is neither a sample count (e.g. 1000) nor a size "
            "(e.g. 200MB, 1GB)"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if number < 1 or number != int(number):
            raise ValueError(f"--shard-size {shard_size!r} must be a whole number of samples >= 1")
        return int(number)
    scale = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit[0].lower()]
    if "i" in unit.lower():
        scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit[0].lower()]
    return max(1, int(number * scale) // (sample_bytes + TAR_OVERHEAD))


def resolve_device(device: str, decoder: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--device {device!r} must be one of auto, cpu, gpu")
    if decoder == "pil":
        if device == "gpu":
            raise ValueError(
                "--decoder pil decodes on the CPU; use --decoder dali for --device gpu"
            )
        return "cpu"
    if device != "auto":
        return device
    from pipeline.device import resolve_device as torch_device

    return "gpu" if torch_device("auto").type == "cuda" else "cpu"


def make_decoder(config: ShardConfig, device: str):
    if config.decoder == "pil":
        from pipeline.decode import PilDecoder

        return PilDecoder(config.size, num_threads=config.num_threads)
    if config.decoder == "dali":
        from pipeline.dali import DaliDecoder

        return DaliDecoder(
            config.size, device=device, batch_size=config.batch_size, num_threads=config.num_threads
        )
    raise ValueError(f"--decoder {config.decoder!r} must be dali or pil")


class _State:
    """Per-split progress records under ``OUT/_progress/``, and the options they were made with."""

    def __init__(self, storage: Storage, split: str) -> None:
        self.storage, self.split = storage, split

    def _name(self, leaf: str) -> str:
        return f"{PROGRESS_DIR}/{self.split}.{leaf}.json"

    def read_options(self) -> dict | None:
        name = self._name("options")
        return json.loads(self.storage.read_bytes(name)) if self.storage.exists(name) else None

    def write_options(self, options: dict) -> None:
        self.storage.fs.makedirs(self.storage.path(PROGRESS_DIR), exist_ok=True)
        self.storage.write_bytes(self._name("options"), _dumps(options))

    def read_shard(self, index: int) -> dict | None:
        name = self._name(f"{index:06d}")
        return json.loads(self.storage.read_bytes(name)) if self.storage.exists(name) else None

    def write_shard(self, index: int, result: ShardResult) -> None:
        entry = {
            "record": result.record.to_dict() if result.record else None,
            "rejects": result.rejects,
            "rows": result.rows,
        }
        self.storage.write_bytes(self._name(f"{index:06d}"), _dumps(entry))

    def clear(self) -> None:
        for name in self.storage.list_prefix(f"{PROGRESS_DIR}/{self.split}."):
            self.storage.remove(name)
        self.storage.remove_folder_if_empty(PROGRESS_DIR)


def _dumps(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def build_split(
    config: ShardConfig, split: str, key: Key | None, storage: Storage, stats: BuildStats
) -> Manifest:
    """Make (or finish, or confirm) the shards and manifest of one split."""
    order_key = None if key is None else key.order_key  # encrypted: an order nobody can redo
    classes, items = select_split(
        config.src,
        split,
        classes_file=config.classes_file,
        per_class=config.per_class,
        fraction=config.fraction,
        seed=config.seed,
        order_key=order_key,
    )
    device = resolve_device(config.device, config.decoder)
    shape = [config.size, config.size, 3]
    per_shard = samples_per_shard(config.shard_size, int(np.prod(shape)))
    identity = {
        "options": config.data_options(device),
        "classes": classes,
        "source_digest": listing_digest(items, order_key=order_key),
        "key_fingerprint": None if key is None else key.fingerprint,
        "block_size": None if key is None else key.block_size,
        "transforms": [] if key is None else list(key.transforms),
    }
    state = _State(storage, split)
    if _finished_and_same(storage, split, identity, config.overwrite):
        logger.info(
            "%s: already complete in %s; nothing to do", split, storage.uri(manifest_name(split))
        )
        return load_manifest(storage, split)
    previous = state.read_options()
    if previous is not None and previous != identity:
        if not config.overwrite:
            raise ShardBuildError(
                f"{storage.uri(PROGRESS_DIR)}: an unfinished {split} run with different options or "
                f"key is there ({_diff(previous, identity)}); rerun with its options to resume, "
                "or pass --overwrite to start over"
            )
        _remove_split(storage, split, state)
    state.write_options(identity)

    n_shards = math.ceil(len(items) / per_shard)
    records: list[ShardRecord] = []
    rejects: list[dict] = []
    rows: list[list] = []
    decoder = make_decoder(config, device)
    started, made_before = time.perf_counter(), stats.images
    progress = tqdm(total=len(items), desc=f"{split} shards", unit="img", leave=False)
    pools = (
        ThreadPoolExecutor(1, thread_name_prefix="shard-decode"),
        ThreadPoolExecutor(1, thread_name_prefix="shard-write"),
    )
    try:
        for index in range(n_shards):
            chunk = items[index * per_shard : (index + 1) * per_shard]
            result = _finished_shard(storage, state, index)
            if result is None:
                result = _build_shard(
                    config,
                    split,
                    index,
                    chunk,
                    index * per_shard,
                    key,
                    decoder,
                    storage,
                    pools,
                    stats,
                )
                state.write_shard(index, result)
            if result.record is not None:
                records.append(result.record)
                rows.extend([row[0], result.record.name, *row[1:]] for row in result.rows)
            rejects.extend(result.rejects)
            progress.update(len(chunk))
    finally:
        progress.close()
        for pool in pools:
            pool.shutdown()
        decoder.close()

    limit = config.max_reject_fraction * len(items)
    if len(rejects) > limit:
        examples = "; ".join(f"{reject_source(r, items)}: {r['reason']}" for r in rejects[:5])
        raise ShardBuildError(
            f"{split}: {len(rejects)} of {len(items)} files rejected, more than "
            f"--max-reject-fraction {config.max_reject_fraction} allows (e.g. {examples}). "
            "Fix or remove the files, or raise --max-reject-fraction; finished shards are kept "
            "and a rerun resumes"
        )
    log_rejects(split, rejects, items)
    manifest = Manifest(
        split=split,
        encrypted=key is not None,
        key_fingerprint=identity["key_fingerprint"],
        block_size=identity["block_size"],
        transforms=identity["transforms"],
        image_shape=shape,
        classes=classes,
        source_digest=identity["source_digest"],
        options=identity["options"],
        tool_version=__version__,
        shards=records,
        rejects=rejects,
        samples_table=samples_table_name(split),
    )
    storage.write_bytes(samples_table_name(split), samples_table_bytes(rows))
    write_manifest(storage, manifest)  # last: its presence means the split is complete
    state.clear()
    seconds = time.perf_counter() - started
    logger.info(
        "%s: %d images (%d made now) in %.1f s, %.0f img/s, %d rejected, %d shards, %.1f MB "
        "written to %s",
        split,
        manifest.total_samples,
        stats.images - made_before,
        seconds,
        (stats.images - made_before) / max(seconds, 1e-9),
        len(rejects),
        len(records),
        manifest.total_bytes / 1e6,
        storage.url,
    )
    return manifest


def _finished_and_same(storage: Storage, split: str, identity: dict, overwrite: bool) -> bool:
    if not storage.exists(manifest_name(split)):
        return False
    try:
        existing = load_manifest(storage, split)
    except ManifestError:
        if overwrite:
            return False
        raise
    current = {
        "options": existing.options,
        "classes": existing.classes,
        "source_digest": existing.source_digest,
        "key_fingerprint": existing.key_fingerprint,
        "block_size": existing.block_size,
        "transforms": existing.transforms,
    }
    if current == identity:
        return True
    if not overwrite:
        raise ShardBuildError(
            f"{storage.uri(manifest_name(split))}: finished shards made with different options "
            f"or key are there ({_diff(current, identity)}); pass --overwrite to replace them, "
            "or choose another --out"
        )
    _remove_split(storage, split, _State(storage, split))
    return False


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new.get(k)]
    opts = old.get("options", {}), new.get("options", {})
    if "options" in keys:
        keys.remove("options")
        keys += [f"options.{k}" for k in opts[1] if opts[0].get(k) != opts[1].get(k)]
    return "differs in " + ", ".join(keys)


def _remove_split(storage: Storage, split: str, state: _State) -> None:
    for name in storage.list():
        if name.startswith(f"{split}-") and name.endswith((".tar", ".idx")):
            storage.remove(name)
    storage.remove(manifest_name(split))
    storage.remove(samples_table_name(split))
    state.clear()


def _finished_shard(storage: Storage, state: _State, index: int) -> ShardResult | None:
    entry = state.read_shard(index)
    if entry is None:
        return None
    record = ShardRecord(**entry["record"]) if entry["record"] else None
    if record is not None and (
        not storage.exists(record.name) or storage.size(record.name) != record.bytes
    ):
        return None  # recorded but missing or different: rebuild it
    return ShardResult(record, entry["rejects"], entry["rows"])


def _batches(items: Sequence[SourceItem], size: int) -> Iterator[Sequence[SourceItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _decode_stage(
    src: Path, batch: Sequence[SourceItem], max_pixels: int, decoder
) -> tuple[list[DecodeError | None], Any]:
    """Read, check and decode one batch. Returns a ``DecodeError`` or None per item, and the
    decoded images stacked into one array (numpy, or a CUDA tensor from the GPU decoder)."""
    blobs = [(src / it.path).read_bytes() for it in batch]
    errors: list[DecodeError | None] = [probe(b, max_pixels) for b in blobs]
    good = [i for i, e in enumerate(errors) if e is None]
    images = []
    for i, image in zip(good, decoder.decode([blobs[i] for i in good]), strict=True):
        if isinstance(image, DecodeError):
            errors[i] = image
        else:
            images.append(image)
    if not images:
        return errors, None
    if isinstance(images[0], np.ndarray):
        return errors, np.stack(images)
    import torch

    return errors, torch.stack(images)


def _build_shard(
    config: ShardConfig,
    split: str,
    index: int,
    chunk: Sequence[SourceItem],
    first: int,
    key: Key | None,
    decoder,
    storage: Storage,
    pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor],
    stats: BuildStats,
) -> ShardResult:
    """One shard, in three overlapping stages: decode batch k+1 (a thread, plus the decoder's
    own threads) while batch k is encrypted here and batch k-1 is written (another thread)."""
    name = shard_name(split, index)
    tmp = storage.staging_path(name)
    decode_pool, write_pool = pools
    rejects: list[dict] = []
    rows: list[list] = []
    batches = list(_batches(chunk, config.batch_size))
    writer = ShardWriter(tmp, name)
    decoding: Future | None = None
    writing: Future | None = None
    try:
        decoding = decode_pool.submit(
            _decode_stage, Path(config.src), batches[0], config.max_pixels, decoder
        )
        position = first
        for k, batch in enumerate(batches):
            errors, decoded = decoding.result()
            decoding = None
            if k + 1 < len(batches):
                decoding = decode_pool.submit(
                    _decode_stage, Path(config.src), batches[k + 1], config.max_pixels, decoder
                )
            started, cpu = time.perf_counter(), time.thread_time()
            images = iter(_encrypt_batch(decoded, key, config.encrypt_device))
            stats.encrypt_seconds += time.perf_counter() - started
            stats.encrypt_cpu_seconds += time.thread_time() - cpu
            samples = []
            for offset, (item, error) in enumerate(zip(batch, errors, strict=True)):
                sample_key = f"{position + offset:08d}"
                if error is not None:
                    rejects.append(
                        reject_entry(item, sample_key, error.reason, encrypted=key is not None)
                    )
                    continue
                source = item.path if key is None else None  # encrypted: names no source
                files = sample_files(next(images), item.label, source, split)
                samples.append((sample_key, files))
                rows.append([sample_key, item.label, source])
            position += len(batch)
            if writing is not None:
                writing.result()
            writing = write_pool.submit(_write_samples, writer, samples)
        writing.result()
        record = writer.close()
    except BaseException:
        for future in (decoding, writing):  # let in-flight stages finish before cleaning up
            if future is not None:
                future.cancel()
                with contextlib.suppress(BaseException):  # the first error is re-raised below
                    future.result()
        writer.abort()
        raise
    stats.images += len(chunk)
    if record.samples == 0:
        tmp.unlink(missing_ok=True)
        return ShardResult(None, rejects, [])
    storage.write_bytes(index_name(name), writer.index_text().encode())  # before its shard
    storage.put(tmp, name)
    return ShardResult(record, rejects, rows)


def _encrypt_batch(batch: Any, key: Key | None, device: str = "auto") -> list[np.ndarray]:
    """Encrypt a decoded batch where it is (numpy, or a CUDA tensor: no host round trip) or
    on ``device``, then hand numpy images to the writer."""
    if batch is None:
        return []
    if key is not None:
        if device != "auto":
            import torch

            from pipeline.device import resolve_device

            target = resolve_device(device)
            if isinstance(batch, np.ndarray) and target.type != "cpu":
                batch = torch.from_numpy(batch).to(target)
            elif isinstance(batch, torch.Tensor):
                batch = batch.to(target)
        batch = encrypt(batch, key)
    return list(batch if isinstance(batch, np.ndarray) else batch.cpu().numpy())


def _write_samples(writer: ShardWriter, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    for key, files in samples:
        writer.write(key, files)


def build_shards(
    config: ShardConfig, key: Key | None, *, stats: BuildStats | None = None
) -> dict[str, Manifest]:
    """Make every split in ``config.splits``; ``key=None`` writes plain shards (``--plain``).

    ``stats``, when given, receives what the run did (images made, time spent encrypting).
    """
    if (key is None) != config.plain:
        raise ValueError("pass a key to encrypt, or plain=True (and no key) for plain shards")
    if key is not None and config.size % key.block_size:
        raise ValueError(
            f"--size {config.size} is not a multiple of the key's block size {key.block_size}; "
            f"use e.g. --size {config.size - config.size % key.block_size}"
        )
    if config.encrypt_device != "auto":  # a bad name fails now, not after the first decode
        from pipeline.device import resolve_device

        resolve_device(config.encrypt_device)
    storage = Storage(config.out)
    logger.debug("config: %s", asdict(config))
    stats = stats if stats is not None else BuildStats()
    started, cpu = time.perf_counter(), time.process_time()
    manifests = {split: build_split(config, split, key, storage, stats) for split in config.splits}
    stats.seconds += time.perf_counter() - started
    stats.cpu_seconds += time.process_time() - cpu
    return manifests
