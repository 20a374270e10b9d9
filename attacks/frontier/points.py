"""The frontier's points: for one block size, every leaked-data budget estimated with each
fresh key (``block_size_points``), and the protected models' own keys estimated the same way
from their own encrypted shards, with the model's top-1 (``model_points``)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from attacks.ciphertext_only import EstimateTimeout, estimate_key
from attacks.frontier import report
from attacks.frontier.config import FrontierConfig, _rng
from attacks.frontier.inputs import Inputs
from attacks.frontier.record import FrontierPoint, ModelPoint, Summary
from attacks.keyspace import key_recovery, random_material, to_blocks
from pipeline import BlockOp, Key, apply_op

if TYPE_CHECKING:
    from attacks.audit import Audit

logger = logging.getLogger("attacks.frontier")

PARTS = ("permutation", "np_mask", "ffx_mask", "ffx_table", "byte_maps", "key_recovered")
SHOWN_IMAGES = 8  # leaked images decrypted with each estimate: PSNR and SSIM, and the figure


def reconstruct(images: np.ndarray, truth: BlockOp, estimate: BlockOp) -> np.ndarray:
    """``images`` encrypted with the true key and decrypted with the estimated one: what the
    holder of leaked shards sees with the estimate."""
    return apply_op(apply_op(images, truth), estimate.inverse())


def image_quality(plain: np.ndarray, seen: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB; 100 for identical images) and mean SSIM of ``seen`` against ``plain``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr, ssim = [], []
    for a, b in zip(plain, seen, strict=True):
        psnr.append(100.0 if np.array_equal(a, b) else peak_signal_noise_ratio(a, b))
        ssim.append(structural_similarity(a, b, channel_axis=2, data_range=255))
    return float(np.mean(psnr)), float(np.mean(ssim))


def measured_budgets(config: FrontierConfig, available: int) -> list[tuple[int, int | None]]:
    """(budget, blocks used or None when the data has too few) for each budget, plus one
    point with every available block when some budget exceeds them."""
    points = [(b, b if b <= available else None) for b in sorted(set(config.budgets))]
    if any(used is None for _, used in points) and available not in config.budgets:
        points.append((available, available))
        points.sort(key=lambda p: (p[0], p[1] is None))
    return points


def _summarise(values: list[float]) -> Summary:
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
) -> tuple[dict, float, int, BlockOp]:
    """One key at one budget: the recovery by part, seconds, candidates resolved, and the
    estimated encryption op."""

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
    return recovered.to_json(), seconds, estimate.candidates, estimate.op


def block_size_points(
    config: FrontierConfig,
    inputs: Inputs,
    block_size: int,
    bar: tqdm,
    done: dict[tuple[int, int], FrontierPoint],
    save: Callable[[list[FrontierPoint]], None],
) -> list[FrontierPoint]:
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
    points: list[FrontierPoint] = []
    out_of_time = False
    side = min(inputs.leaked.shape[1:3]) // block_size * block_size
    shown = inputs.leaked[:SHOWN_IMAGES, :side, :side]
    for budget, used in measured_budgets(config, len(leaked)):
        if (block_size, budget) in done:
            point = done[block_size, budget]
            out_of_time = out_of_time or "time" in (point.reason or "")
            points.append(point)
            bar.update(config.keys)
            continue
        unmeasured = FrontierPoint(
            block_size=block_size,
            transforms=config.transforms,
            budget_blocks=budget,
            leaked_blocks=used,
            keys=config.keys,
            statistics_blocks=len(stats),
            measured=False,
        )
        if used is None or out_of_time:
            reason = (
                f"the data has {len(leaked):,} blocks"
                if used is None
                else "a smaller budget ran out of time"
            )
            bar.update(config.keys)
            points.append(replace(unmeasured, reason=reason))
            save(points)
            continue
        results, seconds, candidates = [], [], 1
        quality: list[tuple[float, float]] = []
        first_seen: np.ndarray | None = None
        for k, truth in enumerate(truths):
            sample_rng = _rng(config, "sample", block_size, budget, k)
            chosen = np.sort(sample_rng.choice(len(leaked), used, replace=False))
            m = block_size
            # each block is an M x M image, so the blocks encrypt on their own
            cipher = to_blocks(apply_op(leaked[chosen].reshape(-1, m, m, 3), truth), m)
            try:
                parts, s, candidates, op = _estimate_point(
                    config, cipher, stats, truth, m, sample_rng
                )
                results.append(parts)
                seconds.append(s)
                seen = reconstruct(shown, truth, op)
                quality.append(image_quality(shown, seen))
                if first_seen is None:
                    first_seen = seen
                    first_cipher = apply_op(shown, truth)
            except EstimateTimeout:
                seconds.append(config.time_budget_s)
                bar.update(config.keys - k)
                break  # the other keys would run out too: their time says nothing either
            bar.update(1)
        timed = replace(unmeasured, seconds=_summarise(seconds))
        if len(results) < config.keys:
            out_of_time = True
            point = replace(
                timed,
                reason=f"key {len(results) + 1} of {config.keys} ran out of the "
                f"{config.time_budget_s:g} s time budget",
            )
        else:
            parts = {p: _summarise([r[p] for r in results]) for p in PARTS if p in results[0]}
            point = replace(timed, measured=True, candidates=candidates, parts=parts,
                            psnr=_summarise([q[0] for q in quality]),
                            ssim=_summarise([q[1] for q in quality]))  # fmt: skip
            if first_seen is not None:  # the largest budget measured so far replaces it
                report.reconstruction_grid(
                    shown, first_cipher, first_seen, point,
                    Path(config.out) / f"reconstruction_M{block_size}.png",
                )  # fmt: skip
        points.append(point)
        save(points)
        logger.info("frontier: %s", report.point_line(point))
    return points


def model_points(config: FrontierConfig, block_sizes: set[int]) -> list[ModelPoint]:
    """For each ``--checkpoint`` (with its ``--key`` and ``--model-data``) whose block size is
    measured: the ciphertext-only estimate of its own key from its own encrypted train shards,
    at each budget, and the model's top-1 with that key (the audit's evaluation path)."""
    from pipeline import load_key

    rows: list[ModelPoint] = []
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
) -> list[ModelPoint]:
    """One model's rows, a budget each: its audit's data, then an estimate per budget."""
    from attacks.audit import AuditConfig, Scenario, prepare

    audit = prepare(
        AuditConfig(
            checkpoint=checkpoint,
            key=key_file,
            data=data,
            data_key=config.data_key,
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
        row = ModelPoint(
            checkpoint=checkpoint,
            key_fingerprint=key.fingerprint,
            block_size=key.block_size,
            budget_blocks=budget,
            leaked_blocks=used,
            top1_correct_key=audit.correct_top1,
            measured=False,
        )
        if used is None:
            reason = f"the model's train shards have {len(leaked):,} blocks"
            rows.append(replace(row, reason=reason))
            continue
        rows.append(_model_estimate(config, audit, key, natural, leaked, used, row))
    return rows


def _model_estimate(
    config: FrontierConfig,
    audit: Audit,
    key: Key,
    natural: np.ndarray,
    leaked: np.ndarray,
    used: int,
    row: ModelPoint,
) -> ModelPoint:
    """``row`` (not yet measured) with the estimate from ``used`` of the model's leaked blocks,
    the model ranking the symmetric candidates by its confidence on the attacker's plain
    images, and its top-1."""
    from pipeline.model.evaluation import predict

    def confidence(op: BlockOp) -> float:
        logits = torch.from_numpy(predict(audit.model, apply_op(natural, op)))
        return float(logits.softmax(1).max(1).values.mean())

    rng = _rng(config, "model", audit.config.checkpoint, row.budget_blocks)
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
        return replace(row, reason=f"ran out of the {config.time_budget_s:g} s time budget")
    recovered = audit.recovery(estimate.op)
    top1 = audit.accuracy(estimate.op)
    return replace(
        row,
        measured=True,
        top1_estimated_key=top1,
        key_recovered=recovered.key_recovered,
        parts=recovered.parts,
        seconds=time.perf_counter() - started,  # the estimate and that top-1, as always
        statistics_images=len(natural),
    )
