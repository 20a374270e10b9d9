"""One frontier run: the inputs, every block size's points (saved after each, so that a rerun
of the same configuration resumes), the protected models' points, and the outputs."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from attacks.frontier import report
from attacks.frontier.config import FrontierConfig, FrontierError
from attacks.frontier.inputs import Inputs, load_inputs
from attacks.frontier.points import block_size_points, model_points
from attacks.frontier.record import Frontier, FrontierPoint
from pipeline import docblock
from pipeline.atomic import atomic_write

logger = logging.getLogger("attacks.frontier")


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


def _earlier_points(path: Path, signature: dict) -> dict[tuple[int, int], FrontierPoint]:
    """The points of an earlier run of the same configuration at ``path``, if any (none when
    the file is unreadable, of another configuration, or its points are not point records)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("meta", {}).get("signature") != signature:
        return {}
    try:
        points = [FrontierPoint.from_json(p) for p in earlier.get("points", [])]
    except (KeyError, TypeError):
        return {}
    return {(p.block_size, p.budget_blocks): p for p in points}


def run_frontier(config: FrontierConfig) -> dict:
    started = time.perf_counter()
    if config.page:  # fail before hours of work, not after
        docblock.check_block(config.page, report.PAGE_BLOCK)
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
    points: list[FrontierPoint] = []

    def save(block_points: list[FrontierPoint]) -> None:  # a long run resumes from here
        partial = {"meta": {**meta, "complete": False},
                   "points": [p.to_json() for p in points + block_points]}  # fmt: skip
        atomic_write(out / "frontier.json", json.dumps(partial, indent=1) + "\n")

    total = len(config.block_sizes) * config.keys * (len(set(config.budgets)) + 1)
    with logging_redirect_tqdm(), tqdm(total=total, desc="frontier", unit="estimate") as bar:
        for m in config.block_sizes:
            points += block_size_points(config, inputs, m, bar, done, save)
        bar.total = bar.n
    models = model_points(config, set(config.block_sizes)) if config.checkpoints else []
    meta.update(complete=True, seconds=round(time.perf_counter() - started, 1),
                resumed_points=len(done))  # fmt: skip
    result = Frontier(meta, points, models)
    table = report.write_frontier(out, result)
    if config.page:
        docblock.replace_block(config.page, report.PAGE_BLOCK,
                               report.page_block(result),
                               docblock.Provenance.here(data=inputs.description))  # fmt: skip
    print(table, end="", flush=True)
    logger.info("frontier: %s; wrote %s", report.summary(result), out / "frontier.md")
    return result.to_json()
