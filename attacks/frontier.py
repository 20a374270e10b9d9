"""The security frontier: how much of a fresh key the ciphertext-only estimate recovers, by
block size and by the number of leaked blocks, with the spread over keys.

    python -m attacks.frontier                          # embedded photos -> report/frontier
    python -m attacks.frontier --block-sizes 4,8 --keys 5 --budgets 1e4,1e5,1e6 \\
        --time-budget-s 600 --page docs/results/frontier.md          # make frontier
    python -m attacks.frontier --data /data/imagenet    # your images (SRC/train/<class>/*)
    python -m attacks.frontier --data s3://bucket/plain # or plain shards, local or S3
    python -m attacks.frontier --block-sizes 4 --checkpoint runs/demo/protected/checkpoint.pt \\
        --key runs/demo/k.bin --model-data runs/demo/shards   # also that model's accuracy

For each block size, each leaked-data budget (in blocks) and each of ``--keys`` fresh keys of
the scheme, the leaked blocks are encrypted with the key and the key is estimated from them
(``attacks.ciphertext_only``) with the attacker's natural-image statistics taken from other
images: other photos for the embedded photos, other files (or other samples) for ``--data``.
Every key part is reported as the median and range over the keys. A point where the data has
fewer blocks than the budget, or where an estimate runs out of ``--time-budget-s``, is "not
measured": it says nothing about the key. No model is needed; the 96 candidates that image
statistics cannot tell apart (block symmetries, each also negated) are resolved in the
attacker's favour (by eye or with a model an attacker tells an upright, positive image from
the others). The fresh keys come from ``--seed``: measurement keys, never printed or written.
``frontier.json`` is written after every point; a rerun with the same configuration (and the
same estimator) into the same ``--out`` resumes from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from attacks import frontier_report
from attacks.ciphertext_only import EstimateTimeout, estimate_key
from attacks.keyspace import key_recovery, random_material, to_blocks
from pipeline import BlockOp, Key, apply_op, cli, docblock
from pipeline.atomic import atomic_write
from pipeline.cipher.blockwise import TRANSFORMS, check_block_size, check_transforms
from pipeline.errors import KeyprotectError

if TYPE_CHECKING:
    from attacks.audit import Audit

logger = logging.getLogger("attacks.frontier")

PARTS = ("permutation", "np_mask", "ffx_mask", "ffx_table", "byte_maps", "key_recovered")


class FrontierError(KeyprotectError, ValueError):
    """A frontier that cannot run: no images, encrypted shards, a README without the block..."""


@dataclass(frozen=True)
class FrontierConfig:
    block_sizes: tuple[int, ...] = (4, 8, 16)
    transforms: tuple[str, ...] = TRANSFORMS
    keys: int = 3
    budgets: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    time_budget_s: float = 600.0
    data: str | None = None  # None: the embedded photos
    image_size: int = 224  # --data image folders: shorter side resized, centre crop
    statistics_images: int = 200  # --data: images whose plain statistics the attacker holds
    statistics_blocks: int = 200_000  # at most this many statistics blocks (a random subset)
    checkpoints: tuple[str, ...] = ()
    model_keys: tuple[str, ...] = ()
    model_data: tuple[str, ...] = ()
    out: str = "report/frontier"
    page: str | None = None  # a results page whose frontier-report block is replaced
    seed: int = 0
    device: str = "auto"


@dataclass
class Inputs:
    """Plain images: the leaked ones (encrypted with each fresh key) and the statistics ones."""

    leaked: np.ndarray
    statistics: np.ndarray
    description: str
    meta: dict = field(default_factory=dict)


def _rng(config: FrontierConfig, *names: object) -> np.random.Generator:
    """An independent, reproducible stream per purpose (``names``), from ``--seed``."""
    tag = hashlib.sha256(repr(names).encode()).digest()
    return np.random.default_rng([config.seed, int.from_bytes(tag[:8], "little")])


def load_inputs(config: FrontierConfig) -> Inputs:
    """The embedded photos split by photo, or ``--data`` (an image folder or plain shards)
    split by image, sampled to what the largest budget needs at the smallest block size."""
    if config.data is None:
        from pipeline.offline.photos import split_photos

        split = split_photos(seed=config.seed)
        return Inputs(
            split.leaked,
            split.statistics,
            f"the embedded photos ({len(split.leaked)} crops of "
            f"{', '.join(split.leaked_photos)} leaked; statistics from "
            f"{len(split.statistics)} crops of {', '.join(split.statistics_photos)})",
            {
                "leaked_photos": list(split.leaked_photos),
                "statistics_photos": list(split.statistics_photos),
            },
        )
    return _load_data(config)


def _images_needed(config: FrontierConfig, size: int) -> int:
    per_image = (size // min(config.block_sizes)) ** 2
    return max(1, math.ceil(max(config.budgets) / per_image))


def _load_data(config: FrontierConfig) -> Inputs:
    from pipeline.storage import Storage

    data = config.data
    assert data is not None
    if Storage(data).exists("train.manifest.json"):
        return _load_shards(config, data)
    if "://" not in data and not Path(data).exists():
        raise FrontierError(
            f"--data {data}: not found; pass an image folder (SRC/train/<class>/<image>) or "
            "plain shards (a folder or URL with train.manifest.json)"
        )
    if "://" in data:
        raise FrontierError(
            f"{data}: no train.manifest.json there; remote --data must be shards "
            "(tools/make_shards.py --plain), image folders only locally"
        )
    return _load_folder(config, Path(data))


def _load_folder(config: FrontierConfig, root: Path) -> Inputs:
    from pipeline.offline.decode import decode_pil
    from pipeline.offline.sources import find_classes, list_split

    split = "train" if (root / "train").is_dir() else "val"
    items = list_split(root, split, find_classes(root, split))
    order = _rng(config, "data").permutation(len(items))
    n_stats = config.statistics_images
    n_leaked = _images_needed(config, config.image_size)
    if len(items) <= n_stats:
        raise FrontierError(
            f"{root / split}: {len(items)} images, but --statistics-images {n_stats} plus leaked "
            "images need more; lower --statistics-images"
        )
    chosen = [items[i] for i in order[: n_stats + n_leaked]]

    def decode(item) -> np.ndarray:
        path = root / item.path
        try:
            return decode_pil(path.read_bytes(), config.image_size)
        except Exception as exc:
            raise FrontierError(
                f"{path}: cannot decode it ({exc}); remove or replace the file"
            ) from None

    images = np.stack([decode(item) for item in tqdm(chosen, desc="images", leave=False)])
    return Inputs(
        images[n_stats:],
        images[:n_stats],
        f"`{root}` ({split}: {len(images) - n_stats} of {len(items)} images leaked, statistics "
        f"from {n_stats} other images, {config.image_size}x{config.image_size} centre crops)",
    )


def _load_shards(config: FrontierConfig, data: str) -> Inputs:
    from pipeline.model.evaluation import load_split
    from pipeline.shards.manifest import load_manifest
    from pipeline.storage import Storage

    manifest = load_manifest(Storage(data), "train")
    if manifest.encrypted:
        raise FrontierError(
            f"{data}: shards encrypted with key {manifest.key_fingerprint}; the frontier "
            "encrypts with fresh keys itself and needs plain shards (tools/make_shards.py "
            "--plain), or use --checkpoint/--key/--model-data for an encrypted model's own data"
        )
    size = manifest.image_shape[0]
    n_stats = config.statistics_images
    limit = n_stats + _images_needed(config, size)
    # shards are in the offline stage's hashed order, so the first images are a sample
    images = load_split(data, "train", limit=limit).images
    if len(images) <= n_stats:
        raise FrontierError(
            f"{data}: {len(images)} train images, too few for --statistics-images {n_stats}"
        )
    return Inputs(
        images[n_stats:],
        images[:n_stats],
        f"`{data}` (plain shards: {len(images) - n_stats} of {manifest.total_samples} train "
        f"images leaked, statistics from {n_stats} other images)",
    )


def measured_budgets(config: FrontierConfig, available: int) -> list[tuple[int, int | None]]:
    """(budget, blocks used or None when the data has too few) for each budget, plus one
    point with every available block when some budget exceeds them."""
    points = [(b, b if b <= available else None) for b in sorted(set(config.budgets))]
    if any(used is None for _, used in points) and available not in config.budgets:
        points.append((available, available))
        points.sort(key=lambda p: (p[0], p[1] is None))
    return points


def _summarise(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": values,
    }


def _estimate_point(
    config: FrontierConfig,
    cipher: np.ndarray,
    plain_stats: np.ndarray,
    truth: BlockOp,
    block_size: int,
    rng: np.random.Generator,
) -> tuple[dict, float, int]:
    """One key at one budget: the recovery by part, seconds, and candidates resolved."""

    def oracle(op: BlockOp) -> float:
        return key_recovery(op, truth, config.transforms).key_recovered

    started = time.perf_counter()
    estimate = estimate_key(
        cipher,
        plain_stats,
        block_size,
        config.transforms,
        rng=rng,
        scorer=oracle,
        time_budget_s=config.time_budget_s,
    )
    seconds = time.perf_counter() - started
    recovered = key_recovery(estimate.op, truth, config.transforms)
    return (
        recovered.to_json(),
        seconds,
        estimate.candidates,
    )


def _block_size_points(
    config: FrontierConfig,
    inputs: Inputs,
    block_size: int,
    bar: tqdm,
    done: dict[tuple[int, int], dict],
    save: Callable[[list[dict]], None],
) -> list[dict]:
    """Every budget's point at one block size; points in ``done`` (an earlier run of the same
    configuration) are kept, and ``save`` gets the points so far after each new one."""
    leaked = to_blocks(inputs.leaked, block_size)
    stats = to_blocks(inputs.statistics, block_size)
    rng = _rng(config, "statistics", block_size)
    if len(stats) > config.statistics_blocks:
        stats = stats[np.sort(rng.choice(len(stats), config.statistics_blocks, replace=False))]
    key_rng = _rng(config, "keys", block_size)
    truths = [
        random_material(block_size, config.transforms, key_rng).encrypt_op
        for _ in range(config.keys)
    ]
    points, out_of_time = [], False
    for budget, used in measured_budgets(config, len(leaked)):
        if (block_size, budget) in done:
            point = done[block_size, budget]
            out_of_time = out_of_time or "time" in point.get("reason", "")
            points.append(point)
            bar.update(config.keys)
            continue
        point = {
            "block_size": block_size,
            "transforms": list(config.transforms),
            "budget_blocks": budget,
            "leaked_blocks": used,
            "keys": config.keys,
            "statistics_blocks": len(stats),
        }
        if used is None:
            point.update(measured=False, reason=f"the data has {len(leaked):,} blocks")
        elif out_of_time:
            point.update(measured=False, reason="a smaller budget ran out of time")
        if "measured" in point:
            bar.update(config.keys)
            points.append(point)
            save(points)
            continue
        results, seconds, candidates = [], [], 1
        for k, truth in enumerate(truths):
            sample_rng = _rng(config, "sample", block_size, budget, k)
            chosen = np.sort(sample_rng.choice(len(leaked), used, replace=False))
            m = block_size
            # each block is an M x M image, so the blocks encrypt on their own
            cipher = to_blocks(apply_op(leaked[chosen].reshape(-1, m, m, 3), truth), m)
            try:
                parts, s, candidates = _estimate_point(config, cipher, stats, truth, m, sample_rng)
                results.append(parts)
                seconds.append(s)
            except EstimateTimeout:
                seconds.append(config.time_budget_s)
                bar.update(config.keys - k)
                break  # the other keys would run out too: their time says nothing either
            bar.update(1)
        point["seconds"] = _summarise(seconds)
        if len(results) < config.keys:
            out_of_time = True
            point.update(
                measured=False,
                reason=f"key {len(results) + 1} of {config.keys} ran out of the "
                f"{config.time_budget_s:g} s time budget",
            )
        else:
            point.update(measured=True, candidates=candidates)
            point["parts"] = {
                p: _summarise([r[p] for r in results]) for p in PARTS if p in results[0]
            }
        points.append(point)
        save(points)
        logger.info("frontier: %s", frontier_report.point_line(point))
    return points


def model_points(config: FrontierConfig, block_sizes: set[int]) -> list[dict]:
    """For each ``--checkpoint`` (with its ``--key`` and ``--model-data``) whose block size is
    measured: the ciphertext-only estimate of its own key from its own encrypted train shards,
    at each budget, and the model's top-1 with that key (the audit's evaluation path)."""
    from pipeline import load_key

    rows = []
    for checkpoint, key_file, data in zip(
        config.checkpoints, config.model_keys, config.model_data, strict=True
    ):
        key = load_key(key_file)
        if key.block_size not in block_sizes:
            logger.warning(
                "frontier: %s has block size %d, not measured here; skipped",
                checkpoint,
                key.block_size,
            )
            continue
        rows += _one_model_points(config, checkpoint, key_file, data, key)
    return rows


def _one_model_points(
    config: FrontierConfig, checkpoint: str, key_file: str, data: str, key: Key
) -> list[dict]:
    """One model's rows, a budget each: its audit's data, then an estimate per budget."""
    from attacks.audit import AuditConfig, Scenario, prepare

    audit = prepare(
        AuditConfig(
            checkpoint=checkpoint,
            key=key_file,
            data=data,
            seed=config.seed,
            device=config.device,
            attacker_images=100,
            leaked_images=10**9,  # every train image (capped below)
            scenarios=(Scenario.CIPHERTEXT_ONLY,),
            known_pairs=(),
            finetune_fractions=(),
        )
    )
    natural = audit.attacker_set()[0]
    leaked = to_blocks(audit.train_encrypted[len(natural) :], key.block_size)
    rows = []
    for budget, used in measured_budgets(config, len(leaked)):
        row = {
            "checkpoint": checkpoint,
            "key_fingerprint": key.fingerprint,
            "block_size": key.block_size,
            "budget_blocks": budget,
            "leaked_blocks": used,
            "top1_correct_key": audit.correct_top1,
        }
        if used is None:
            reason = f"the model's train shards have {len(leaked):,} blocks"
            rows.append({**row, "measured": False, "reason": reason})
            continue
        rows.append({**row, **_model_estimate(config, audit, key, natural, leaked, budget, used)})
    return rows


def _model_estimate(
    config: FrontierConfig,
    audit: Audit,
    key: Key,
    natural: np.ndarray,
    leaked: np.ndarray,
    budget: int,
    used: int,
) -> dict:
    """The estimate from ``used`` of the model's leaked blocks, the model ranking the
    symmetric candidates by its confidence on the attacker's plain images; its top-1."""
    from pipeline.model.evaluation import predict

    def confidence(op: BlockOp) -> float:
        logits = torch.from_numpy(predict(audit.model, apply_op(natural, op)))
        return float(logits.softmax(1).max(1).values.mean())

    rng = _rng(config, "model", audit.config.checkpoint, budget)
    chosen = np.sort(rng.choice(len(leaked), used, replace=False))
    started = time.perf_counter()
    try:
        estimate = estimate_key(
            leaked[chosen],
            to_blocks(natural, key.block_size),
            key.block_size,
            key.transforms,
            rng=rng,
            scorer=confidence,
            time_budget_s=config.time_budget_s,
        )
    except EstimateTimeout:
        return {"measured": False,
                "reason": f"ran out of the {config.time_budget_s:g} s time budget"}  # fmt: skip
    recovered = audit.recovery(estimate.op)
    return {
        "measured": True,
        "top1_estimated_key": audit.accuracy(estimate.op),
        "key_recovered": recovered.key_recovered,
        "parts": recovered.parts,
        "seconds": time.perf_counter() - started,
        "statistics_images": len(natural),
    }


def _signature(config: FrontierConfig, inputs: Inputs) -> dict:
    """What a point's result depends on: a later run with the same signature reuses it."""
    import attacks.ciphertext_only

    estimator = Path(attacks.ciphertext_only.__file__).read_bytes()
    return {
        "data": inputs.description,
        "transforms": list(config.transforms),
        "keys": config.keys,
        "seed": config.seed,
        "time_budget_s": config.time_budget_s,
        "statistics_blocks": config.statistics_blocks,
        "estimator_sha256": hashlib.sha256(estimator).hexdigest()[:16],
    }


def _earlier_points(path: Path, signature: dict) -> dict[tuple[int, int], dict]:
    """The points of an earlier run of the same configuration at ``path``, if any."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("meta", {}).get("signature") != signature:
        return {}
    return {(p["block_size"], p["budget_blocks"]): p for p in earlier.get("points", [])}


def run_frontier(config: FrontierConfig) -> dict:
    started = time.perf_counter()
    if config.page:  # fail before hours of work, not after
        docblock.check_block(config.page, frontier_report.PAGE_BLOCK)
    inputs = load_inputs(config)
    for m in config.block_sizes:
        if inputs.leaked.shape[1] % m or inputs.statistics.shape[1] % m:
            raise FrontierError(
                f"images of {inputs.leaked.shape[1]}x{inputs.leaked.shape[2]} do not divide into "
                f"{m}x{m} blocks; choose --image-size a multiple of every block size"
            )
    logger.info("frontier: %s", inputs.description)
    out = Path(config.out)
    signature = _signature(config, inputs)
    done = _earlier_points(out / "frontier.json", signature)
    if done:
        logger.info("frontier: resuming: %d point(s) from %s", len(done), out / "frontier.json")
    meta = {"data": inputs.description, **inputs.meta, "keys": config.keys,
            "transforms": list(config.transforms), "seed": config.seed,
            "time_budget_s": config.time_budget_s, "signature": signature}  # fmt: skip
    points: list[dict] = []

    def save(block_points: list[dict]) -> None:  # a long run resumes from here
        partial = {"meta": {**meta, "complete": False}, "points": points + block_points}
        atomic_write(out / "frontier.json", json.dumps(partial, indent=1) + "\n")

    total = len(config.block_sizes) * config.keys * (len(set(config.budgets)) + 1)
    with logging_redirect_tqdm(), tqdm(total=total, desc="frontier", unit="estimate") as bar:
        for m in config.block_sizes:
            points += _block_size_points(config, inputs, m, bar, done, save)
        bar.total = bar.n
    models = model_points(config, set(config.block_sizes)) if config.checkpoints else []
    meta.update(complete=True, seconds=round(time.perf_counter() - started, 1),
                resumed_points=len(done))  # fmt: skip
    result = {"meta": meta, "points": points, "models": models}
    table = frontier_report.write_frontier(out, result)
    if config.page:
        docblock.replace_block(config.page, frontier_report.PAGE_BLOCK,
                               frontier_report.page_block(result),
                               docblock.Provenance.here(data=inputs.description))  # fmt: skip
    print(table, end="", flush=True)
    logger.info("frontier: %s; wrote %s", frontier_report.summary(result), out / "frontier.md")
    return result


def _ints(text: str, name: str, p: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        values = tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        p.error(f"--{name} {text!r}: give comma-separated whole numbers >= 1, e.g. 1e4,1e5")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = {f.name: f.default for f in fields(FrontierConfig) if f.default is not f.default_factory}
    p = cli.build_parser(__doc__, prog="python -m attacks.frontier")
    p.add_argument("--block-sizes", default="4,8,16", help="comma-separated block sizes M")
    p.add_argument(
        "--transforms",
        default=",".join(TRANSFORMS),
        help="the scheme's transforms, comma-separated, in order",
    )
    p.add_argument("--keys", type=int, default=d["keys"], help="fresh keys per point")
    p.add_argument(
        "--budgets",
        default="1e4,1e5,1e6",
        help="comma-separated numbers of leaked blocks, a point each",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=d["time_budget_s"],
        help="seconds one estimate may take; longer ones are 'not measured'",
    )
    p.add_argument(
        "--data",
        help="an image folder (SRC/train/<class>/*) or plain shards, local "
        "or an fsspec URL; left out: the embedded photos",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=d["image_size"],
        help="--data image folders: the centre crop's size",
    )
    p.add_argument(
        "--statistics-images",
        type=int,
        default=d["statistics_images"],
        help="--data: images whose plain statistics the attacker holds",
    )
    p.add_argument(
        "--statistics-blocks",
        type=int,
        default=d["statistics_blocks"],
        help="blocks of the attacker's plain statistics images used",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="a protected model (repeatable); its --key and --model-data follow",
    )
    p.add_argument("--key", action="append", default=[], help="the key of each --checkpoint")
    p.add_argument(
        "--model-data",
        action="append",
        default=[],
        help="the encrypted shards each --checkpoint was trained on",
    )
    p.add_argument("--out", default=d["out"], help="report folder")
    p.add_argument(
        "--page",
        help="also replace the generated frontier-report block in this Markdown page "
        "(e.g. docs/results/frontier.md)",
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of keys and draws")
    p.add_argument("--device", default=d["device"], help="where the --checkpoint models run")
    return p


def parse_args(argv: list[str] | None) -> FrontierConfig:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        block_sizes = tuple(check_block_size(m) for m in _ints(a.block_sizes, "block-sizes", p))
        transforms = check_transforms([t for t in a.transforms.split(",") if t])
    except ValueError as exc:
        p.error(str(exc))
    if not (len(a.checkpoint) == len(a.key) == len(a.model_data)):
        p.error("give one --key and one --model-data per --checkpoint")
    for name in ("keys", "image_size", "statistics_images", "statistics_blocks"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.time_budget_s <= 0:
        p.error("--time-budget-s must be positive")
    return FrontierConfig(
        block_sizes=block_sizes,
        transforms=transforms,
        keys=a.keys,
        budgets=_ints(a.budgets, "budgets", p),
        time_budget_s=a.time_budget_s,
        data=a.data,
        image_size=a.image_size,
        statistics_images=a.statistics_images,
        statistics_blocks=a.statistics_blocks,
        checkpoints=tuple(a.checkpoint),
        model_keys=tuple(a.key),
        model_data=tuple(a.model_data),
        out=a.out,
        page=a.page,
        seed=a.seed,
        device=a.device,
    )


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    config = parse_args(argv)

    def job() -> None:
        run_frontier(config)

    return cli.run("frontier", job, log=logger)


if __name__ == "__main__":
    raise SystemExit(main())
