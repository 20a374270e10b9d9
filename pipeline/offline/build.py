"""The offline stage: source images -> decoded, resized, encrypted WebDataset shards + manifest.

Shard ``k`` of a split always holds the selected items ``[k*S, (k+1)*S)`` minus the rejected
ones, so every shard can be built, skipped or rebuilt on its own. That is what makes resuming
exact: a finished shard leaves a record in ``OUT/_progress/`` (``pipeline.offline.progress``:
with the key's fingerprint and a digest of everything that shapes the data, so a shard made
under another key or other options never counts); a rerun with the same options skips recorded
shards whose file is present, rebuilds the rest byte for byte, and writes the manifest last.
What a split's shards hold (its items in their keyed order, the shard geometry, the identity)
is its plan (``pipeline.offline.plan``); what the run was asked for is its ``ShardConfig``
(``pipeline.offline.config``).

Under ``torchrun`` the same holds per rank: each rank takes the next shard when it is ready
for one (``WorkGroup.claims``), with its own decoder on its own device
(``LOCAL_RANK``); rank 0 checks the output first and writes the manifest and samples table
once every rank is done. The bytes do not depend on ``W``, so a rerun may use another world size.
One run at a time holds the output (``pipeline.offline.outlock``).

Making a rank's shards (``pipeline.offline.makers``: in this process from a decoder, or whole
in PIL's worker processes) and publishing them (moving or uploading a finished shard and its
record: another thread, ``Publisher``) overlap. Publishing is a queue of at most
``PUBLISH_QUEUE`` shards: the next shard is made while the previous one uploads, and if uploads
fall behind the maker waits, so few shards are staged on local disk at once and memory stays
flat (a staged shard is a file; one upload runs at a time, and s3fs holds at most 10 parts of
50 MiB of it in memory).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from tqdm import tqdm

from pipeline import __version__
from pipeline.cipher.keys import Key
from pipeline.cipher.seal import DataKey
from pipeline.errors import ConfigError
from pipeline.offline.config import (
    BuildStats,
    ShardBuildError,
    ShardConfig,
    choose_decoder,
    encryption_device,
)
from pipeline.offline.decode import decode_pil, is_grey
from pipeline.offline.makers import ShardMaker, ShardProcesses, ShardResult
from pipeline.offline.outlock import OutputLock
from pipeline.offline.plan import SplitIdentity, SplitPlan, made_with, plan_split
from pipeline.offline.progress import (
    PROGRESS_DIR,
    Progress,
    Publisher,
    finished_shard,
)
from pipeline.offline.sourcemap import log_rejects, reject_source
from pipeline.offline.sources import (
    SourceItem,
    SourceReject,
)
from pipeline.offline.workgroup import WorkGroup
from pipeline.shards.format import ShardRecord, shard_name
from pipeline.shards.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    manifest_name,
    samples_table_bytes,
    samples_table_name,
    write_manifest,
)
from pipeline.shards.sealing import join_output, prepare_output
from pipeline.storage import Storage

logger = logging.getLogger(__name__)


def build_split(
    config: ShardConfig,
    split: str,
    key: Key | None,
    storage: Storage,
    stats: BuildStats,
    *,
    group: WorkGroup | None = None,
    lock: OutputLock | None = None,
    selected: dict[str, list[SourceItem]] | None = None,
) -> Manifest | None:
    """Make (or finish, or confirm) the shards and manifest of one split: this rank's shards,
    and, on rank 0 once every rank is done, the manifest. Returns None on other ranks."""
    group = group or WorkGroup()
    kept = made_with(storage, split) if config.decoder == "auto" else None
    plan = plan_split(config, split, key, group, made_with=kept)
    if selected is not None and group.is_primary:
        selected[split] = plan.items
    state = Progress(storage, split)
    # rank 0 checks the output; every rank then checks that it selected the same data
    mine = _setup_split(config, plan, storage, state) if group.is_primary else None
    verdict = SetupVerdict.from_text(
        group.share(Handshake.SETUP.of(split), None if mine is None else mine.to_text())
    )
    if verdict.digest != plan.digest:
        raise ShardBuildError(
            f"rank {group.rank}: {split}: this rank's source listing or options differ from "
            "rank 0's; every rank must see the same --src and arguments"
        )
    if verdict.complete:
        return load_manifest(storage, split) if group.is_primary else None

    started, made_before = time.perf_counter(), stats.images
    stats.first_batch_at, stats.first_batch_images = None, 0
    progress = _progress_bar(plan, group)
    ranks: list[dict] = []
    try:
        results, held_up = _build_own_shards(config, plan, key, storage, state, stats, group,
                                             lock, progress)  # fmt: skip
        built = time.perf_counter()
        made = stats.images - made_before
        rate = 0.0  # this rank's img/s after its first batch
        if stats.first_batch_at is not None and made > stats.first_batch_images:
            rate = (made - stats.first_batch_images) / max(built - stats.first_batch_at, 1e-9)
        group.done(Handshake.BUILT.of(split), json.dumps({"made": made, "rate": rate}))

        def show_job() -> None:  # rank 0's bar goes on with the other ranks' shards
            _advance(progress, group, split, 0)

        if group.is_primary:
            ranks = [json.loads(r) for r in group.wait_all(Handshake.BUILT.of(split), show_job)]
            show_job()  # every rank tallied its images before it said it was done
    finally:
        progress.close()
    if held_up:  # the stage that held this rank up, once the bar is gone
        logger.info("%s: rank %d: %s", split, group.rank, held_up)
    if not group.is_primary:
        return None
    if ranks:  # the job's: every rank's images, and their steady rates together
        made, rate = sum(r["made"] for r in ranks), sum(r["rate"] for r in ranks)
    stats.job_images += made
    manifest = _finish_split(config, plan, storage, state, results)
    seconds = time.perf_counter() - started
    together = "" if group.world_size == 1 else ", the ranks together"
    steady = f" ({rate:.0f} after the first batch{together})" if rate else ""
    logger.info(
        "%s: %d images (%d made now%s) in %.1f s, %.0f img/s%s, %d rejected, %d shards, "
        "%.1f MB written to %s",
        split,
        manifest.total_samples,
        made,
        "" if group.world_size == 1 else f" by {group.world_size} ranks",
        seconds,
        made / max(seconds, 1e-9),
        steady,
        len(manifest.rejects),
        len(manifest.shards),
        manifest.total_bytes / 1e6,
        storage.url,
    )
    return manifest


class Handshake(str, Enum):
    """What the ranks of one build tell each other, per split (WorkGroup names)."""

    SEALING = "sealing"  # rank 0's word on the output's sealing: its id, or "" (unsealed)
    SETUP = "setup"  # rank 0's verdict on the output: build it, or it is complete
    BUILT = "built"  # a rank has made its shards
    PROGRESS = "progress"  # the images of the shards every rank has made or found made

    def of(self, split: str) -> str:
        return f"{split}/{self.value}"


@dataclass(frozen=True)
class SetupVerdict:
    """Rank 0's verdict on a split, shared with every rank before any shard is made: whether
    it is already complete, and the plan's digest (each rank checks it planned the same)."""

    complete: bool
    digest: str

    def to_text(self) -> str:
        return f"{'complete' if self.complete else 'build'}:{self.digest}"

    @classmethod
    def from_text(cls, text: str) -> SetupVerdict:
        status, _, digest = text.partition(":")
        if status not in ("complete", "build") or not digest:
            raise ShardBuildError(f"rank 0 sent a setup verdict this rank cannot read: {text!r}")
        return cls(status == "complete", digest)


def _setup_split(
    config: ShardConfig, plan: SplitPlan, storage: Storage, state: Progress
) -> SetupVerdict:
    """Rank 0, before any shard: complete if the split is already made with these options,
    else clear what --overwrite replaces, record the options, and build."""
    split = plan.split
    if _finished_and_same(storage, split, plan.identity, config.overwrite):
        logger.info(
            "%s: already complete in %s; nothing to do", split, storage.uri(manifest_name(split))
        )
        return SetupVerdict(complete=True, digest=plan.digest)
    previous, current = state.read_options(), plan.identity.to_json()
    if previous is not None and previous != current:
        if not config.overwrite:
            raise ShardBuildError(
                f"{storage.uri(PROGRESS_DIR)}: an unfinished {split} run with different options or "
                f"key is there ({_diff(previous, current)}); rerun with its options to "
                "resume, or pass --overwrite to start over"
            )
        _remove_split(storage, split, state)
    state.write_options(plan.identity)
    return SetupVerdict(complete=False, digest=plan.digest)


def _build_own_shards(
    config: ShardConfig,
    plan: SplitPlan,
    key: Key | None,
    storage: Storage,
    state: Progress,
    stats: BuildStats,
    group: WorkGroup,
    lock: OutputLock | None,
    progress: tqdm,
) -> tuple[dict[int, ShardResult], str | None]:
    """The shards this rank takes (:meth:`WorkGroup.claims`), each built unless recorded as
    finished; stops early when this rank's rejects alone exceed the split's limit. Also the
    stage that held it up (None when every shard it took was made already)."""
    limit = config.max_reject_fraction * len(plan.items)
    results: dict[int, ShardResult] = {}
    rejected = 0
    encrypt_on = encryption_device(config.encrypt_device, plan.device, group.local_rank)
    _announce(config, plan, key, group, encrypt_on)
    recorded = _recorded_shards(storage, state, plan, group)

    def todo() -> Iterator[int]:  # the shards taken and not made yet (a shard made is counted)
        nonlocal rejected
        for index in group.claims(plan.split, plan.n_shards):
            found = None
            if index in recorded:
                found = finished_shard(storage, state, index, plan.digest)
            if found is None:
                yield index
                continue
            results[index] = found
            rejected += len(found.rejects)
            _advance(progress, group, plan.split, len(plan.chunk(index)))

    # the maker reads ahead (decoding, or whole shards in processes) on one copy of the taken
    # shards; this loop collects them, in the same order, on the other
    ahead, taken = itertools.tee(todo())
    maker: ShardMaker | ShardProcesses
    if plan.decoder == "pil" and encrypt_on in ("auto", "cpu"):  # all CPU work: whole shards
        maker = ShardProcesses(config, plan, key, storage, stats, ahead)
    else:
        maker = ShardMaker.start(config, plan, key, storage, stats, ahead, encrypt_on, group)
    publisher = Publisher(storage, state, plan)
    built = False
    try:
        for index in taken:
            group.check()
            if lock is not None:
                lock.check()
            try:
                result, index_text = maker.build(index)
            except OSError as exc:  # an unreadable source file, a full staging disk, ...
                raise ShardBuildError(
                    f"{shard_name(plan.split, index)}: {exc}; finished shards are kept and "
                    "a rerun resumes"
                ) from exc
            publisher.submit(index, result, index_text)
            stats.shards += 1
            built = True
            results[index] = result
            rejected += len(result.rejects)
            if rejected > limit:
                raise ShardBuildError(
                    _too_many_rejects(
                        config, plan, rejected, results, shard_name(plan.split, index)
                    )
                )
            _advance(progress, group, plan.split, len(plan.chunk(index)))
        if rejected > limit:  # counted in shards found made
            raise ShardBuildError(_too_many_rejects(config, plan, rejected, results))
        publisher.drain()
    finally:
        maker.close()
        publisher.close()  # publishes what is finished (kept for a resume) before any error
    return results, maker.time_report() if built else None


def _recorded_shards(
    storage: Storage, state: Progress, plan: SplitPlan, group: WorkGroup
) -> set[int]:
    """The shards a previous run recorded as made (one listing); rank 0 says so in one line
    when there are any: the rerun resumes from them. Each is checked when a rank takes it."""
    recorded = {i for i in state.recorded() if i < plan.n_shards}
    if recorded and group.is_primary:
        logger.info(
            "%s: resuming: %d of %d shards (%d images) already made in %s; building the other %d",
            plan.split, len(recorded), plan.n_shards, sum(len(plan.chunk(i)) for i in recorded),
            storage.url, plan.n_shards - len(recorded),
        )  # fmt: skip
    return recorded


def _announce(
    config: ShardConfig,
    plan: SplitPlan,
    key: Key | None,
    group: WorkGroup,
    encrypt_on: str,
) -> None:
    """The line that says what this rank builds, and where it decodes and encrypts."""
    encrypts_on = encrypt_on  # "auto": where the decoder leaves the images
    if plan.device == "gpu":
        import torch

        from pipeline.device import rank_gpu

        gpu = rank_gpu(group.local_rank)
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
        encrypts_on = f"cuda:{gpu}" if encrypt_on == "auto" else encrypt_on
        where = f"the GPU (cuda:{gpu}{', shared by several ranks' if sharing else ''})"
    else:
        encrypts_on = "cpu" if encrypt_on == "auto" else encrypt_on
        where = "the CPU"
    logger.info(
        "%s: rank %d of %d builds %s; decoding with %s on %s (%s), encrypting on %s",
        plan.split,
        group.rank,
        group.world_size,
        f"{plan.n_shards} shards"
        if group.world_size == 1
        else f"the shards it takes of {plan.n_shards} (a faster rank takes more)",
        plan.decoder + _auto_note(config, plan),
        where,
        f"{config.num_threads} " + ("process(es)" if plan.decoder == "pil" else "CPU worker(s)"),
        "nothing (plain)" if key is None else encrypts_on,
    )


def _auto_note(config: ShardConfig, plan: SplitPlan) -> str:
    """How ``--decoder auto`` chose: as on any machine of this kind, or the output's own."""
    if config.decoder != "auto":
        return ""
    fresh = choose_decoder(config.decoder, config.device)
    if fresh == (plan.decoder, plan.device):
        return " (--decoder auto)"
    return (
        f" (--decoder auto: the one this output was made with; a new output here would get "
        f"{fresh[0]} on the {fresh[1].upper()})"
    )


def _progress_bar(plan: SplitPlan, group: WorkGroup) -> tqdm:
    """Rank 0's progress bar over the split's images, every rank's (the others' stays off)."""
    return tqdm(
        total=len(plan.items),
        desc=f"{plan.split} shards"
        + ("" if group.world_size == 1 else f" ({group.world_size} ranks)"),  # fmt: skip
        unit="img",
        leave=False,
        **({} if group.is_primary else {"disable": True}),  # passing False would beat TQDM_DISABLE
    )


def _advance(progress: tqdm, group: WorkGroup, split: str, images: int) -> None:
    """Count ``images`` of this rank's (a shard made or found made) into the job's tally; rank
    0's bar shows the tally, every rank's images."""
    if group.world_size == 1:
        progress.update(images)
        return
    done = group.tally(Handshake.PROGRESS.of(split), images)
    if group.is_primary:
        progress.update(done - progress.n)


def _too_many_rejects(
    config: ShardConfig,
    plan: SplitPlan,
    rejected: int,
    results: dict[int, ShardResult],
    where: str | None = None,
) -> str:
    rejects = [r for i in sorted(results) for r in results[i].rejects]
    examples = "; ".join(f"{reject_source(r, plan.items)}: {r['reason']}" for r in rejects[:5])
    return (
        f"{plan.split}: {rejected} of {len(plan.items)} files rejected"
        + (f" (up to shard {where})" if where else "")
        + f", more than --max-reject-fraction {config.max_reject_fraction} allows (e.g. "
        f"{examples}). Fix or remove the files, or raise --max-reject-fraction; finished shards "
        "are kept and a rerun resumes"
    )


def _finish_split(
    config: ShardConfig,
    plan: SplitPlan,
    storage: Storage,
    state: Progress,
    results: dict[int, ShardResult],
) -> Manifest:
    """Rank 0, once every shard is made: the samples table and the manifest, then no records."""
    split = plan.split
    missing = [i for i in range(plan.n_shards) if i not in results]
    with ThreadPoolExecutor(8, thread_name_prefix="read-progress") as pool:  # many GETs on S3
        found = pool.map(lambda i: finished_shard(storage, state, i, plan.digest), missing)
        for index, result in zip(missing, found, strict=True):
            if result is None:
                raise ShardBuildError(
                    f"{storage.uri(shard_name(split, index))}: no valid progress record after "
                    "every rank finished (was the output changed meanwhile?); rerun to rebuild it"
                )
            results[index] = result
    records: list[ShardRecord] = []
    rejects: list[dict] = []
    rows: list[list] = []
    for index in range(plan.n_shards):
        result = results[index]
        if result.record is not None:
            records.append(result.record)
            rows.extend([row[0], result.record.name, *row[1:]] for row in result.rows)
        rejects.extend(result.rejects)
    if len(rejects) > config.max_reject_fraction * len(plan.items):
        raise ShardBuildError(_too_many_rejects(config, plan, len(rejects), results))
    if not records:
        raise ShardBuildError(
            f"{split}: no samples: all {len(plan.items)} selected files were rejected (see "
            f"{storage.uri(PROGRESS_DIR)}); a split with no samples cannot be trained or "
            "evaluated. Fix the files, or leave the split out with --split"
        )
    log_rejects(split, rejects, plan.items)
    identity = plan.identity
    manifest_encrypted = identity.key_fingerprint is not None
    manifest = Manifest(
        split=split,
        encrypted=identity.key_fingerprint is not None,
        key_fingerprint=identity.key_fingerprint,
        block_size=identity.block_size,
        transforms=list(identity.transforms),
        image_shape=plan.shape,
        classes=list(identity.classes),
        source_digest=identity.source_digest,
        options=identity.options,
        tool_version=__version__,
        shards=records,
        rejects=rejects,
        samples_table=samples_table_name(split),
        input_stats=input_stats(
            config.src, plan.items, max_pixels=config.max_pixels, threads=config.num_threads
        ),
        source_rejects=source_reject_entries(plan.source_rejects, encrypted=manifest_encrypted),
    )
    storage.write_bytes(samples_table_name(split), samples_table_bytes(rows))
    write_manifest(storage, manifest)  # last: its presence means the split is complete
    state.clear()
    return manifest


STATS_SAMPLE = 64  # source images whose colour statistics the manifest records


def input_stats(
    src: str, items: Sequence[SourceItem], *, max_pixels: int, threads: int = 1
) -> dict:
    """Colour statistics of the split's first ``STATS_SAMPLE`` images in shard order (their
    plain pixels, decoded with PIL on ``threads`` threads): the fraction that are grey. Predict
    compares its inputs with them. A dataset-level figure: it names and predicts no image."""

    def grey(item: SourceItem) -> bool | None:
        try:
            rgb = decode_pil((Path(src) / item.path).read_bytes(), 32, max_pixels=max_pixels)
        except Exception:  # a rejected file: the build has named it already
            return None
        return is_grey(rgb)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="input-stats") as pool:
        found = [g for g in pool.map(grey, items[:STATS_SAMPLE]) if g is not None]
    seen = len(found)
    return {"grey_fraction": round(sum(found) / seen, 4) if seen else None, "sampled": seen}


def _finished_and_same(
    storage: Storage, split: str, identity: SplitIdentity, overwrite: bool
) -> bool:
    if not storage.exists(manifest_name(split)):
        return False
    try:
        existing = SplitIdentity.of_manifest(load_manifest(storage, split))
    except ManifestError:
        if overwrite:
            return False
        raise
    if existing == identity:
        return True
    if not overwrite:
        raise ShardBuildError(
            f"{storage.uri(manifest_name(split))}: finished shards made differently are there: "
            f"{_diff(existing.to_json(), identity.to_json())}. Pass --overwrite to replace "
            "them, or choose another --out"
        )
    _remove_split(storage, split, Progress(storage, split))
    return False


def _diff(old: dict, new: dict) -> str:
    """What differs between the output that is there and this run, in words."""
    said = []
    old_key, new_key = old.get("key_fingerprint"), new.get("key_fingerprint")
    if old_key != new_key:
        there = f"encrypted with key {old_key}" if old_key else "plain (no key)"
        asked = f"key {new_key}" if new_key else "--plain"
        said.append(f"they are {there}, this run has {asked}")
    elif old.get("block_size") != new.get("block_size") or old.get("transforms") != new.get(
        "transforms"
    ):
        said.append("the key's block size or transforms differ")
    # the listing's digest follows the key's order: only with one key does it say the sources
    if old_key == new_key and old.get("source_digest") != new.get("source_digest"):
        said.append(
            "the source images differ (other files under --src, or another selection: "
            "--per-class, --fraction, --seed, --classes)"
        )
    if old.get("classes") != new.get("classes"):
        said.append("the class list differs")
    opts = old.get("options", {}), new.get("options", {})
    said += [
        f"{k} was {opts[0].get(k)!r}, this run has {opts[1].get(k)!r}"
        for k in opts[1]
        if opts[0].get(k) != opts[1].get(k)
    ]
    return "; ".join(said)


def _remove_split(storage: Storage, split: str, state: Progress) -> None:
    for name in storage.list():
        if name.startswith(f"{split}-") and name.endswith((".tar", ".idx")):
            storage.remove(name)
    storage.remove(manifest_name(split))
    storage.remove(samples_table_name(split))
    state.clear()


def _open_output(out: str, data_key: DataKey | None, group: WorkGroup) -> Storage:
    """The output to write: rank 0 checks (or starts) its sealing and shares the output's id,
    which every sealed object's associated data carries."""
    if group.is_primary:
        storage = prepare_output(out, data_key)
        output_id = "" if storage.sealer is None else storage.sealer.output_id
        group.share(Handshake.SEALING.value, output_id)
        return storage
    return join_output(out, data_key, group.share(Handshake.SEALING.value) or None)


def source_reject_entries(rejects: Sequence[SourceReject], *, encrypted: bool) -> list[dict]:
    """The entries of the source tree that are not images, as the manifest records them: by
    name in plain shards; in encrypted ones only how many, per reason (names stay with the
    owner's log and source map)."""
    if not encrypted:
        return [{"source": r.path, "reason": r.reason} for r in rejects]
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return [{"reason": reason, "count": n} for reason, n in sorted(counts.items())]


def build_shards(
    config: ShardConfig,
    key: Key | None,
    *,
    data_key: DataKey | None = None,
    stats: BuildStats | None = None,
    group: WorkGroup | None = None,
    selected: dict[str, list[SourceItem]] | None = None,
) -> dict[str, Manifest]:
    """Make every split in ``config.splits``; ``key=None`` writes plain shards (``--plain``).

    ``data_key`` seals every object written (``make_shards --seal``; docs/sealing.md).
    ``stats``, when given, receives what the run did (images made, time spent encrypting).
    ``selected``, when given, receives each split's selected items in shard order on rank 0
    (the source map's, without listing the tree again).
    ``group`` (``WorkGroup.from_env()`` under torchrun) shares the shards among ranks; rank 0
    holds the output's lock and returns the manifests, the other ranks an empty dict.
    """
    if (key is None) != config.plain:
        raise ConfigError("pass a key to encrypt, or plain=True (and no key) for plain shards")
    if key is not None and config.size % key.block_size:
        raise ConfigError(
            f"--size {config.size} is not a multiple of the key's block size {key.block_size}; "
            f"use e.g. --size {config.size - config.size % key.block_size}"
        )
    group = group or WorkGroup()
    group.next_build()  # this build's steps under names of their own
    # a bad --encrypt-device or a missing GPU fails now, before anything is written
    encryption_device(
        config.encrypt_device, choose_decoder(config.decoder, config.device)[1], group.local_rank
    )
    logger.debug("config: %s", asdict(config))
    stats = stats if stats is not None else BuildStats()
    started, cpu = time.perf_counter(), time.process_time()
    workers_before = stats.worker_cpu_seconds
    lock = (  # the lock is a plain object: it is there while a run holds the output
        OutputLock(Storage(config.out), run_id=group.run_id, force=config.force_unlock)
        if group.is_primary
        else None
    )
    try:
        with lock or contextlib.nullcontext():
            storage = _open_output(config.out, data_key, group)
            manifests = {}
            for split in config.splits:
                manifest = build_split(config, split, key, storage, stats, group=group, lock=lock,
                                       selected=selected)  # fmt: skip
                if manifest is not None:
                    manifests[split] = manifest
    except BaseException as exc:
        group.fail(str(exc) or type(exc).__name__)
        raise
    stats.seconds += time.perf_counter() - started
    stats.cpu_seconds += time.process_time() - cpu + stats.worker_cpu_seconds - workers_before
    return manifests
