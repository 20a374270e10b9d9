"""One audit from start to end: prepare, run the chosen scenarios in order, and write the
report (Markdown, JSON, the charts, the samples and reconstruction figures), optionally into a
results page."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from attacks import report
from attacks.audit.config import Audit, AuditConfig, prepare
from attacks.audit.scenarios import STEPS, leaked_images
from attacks.report import Row
from pipeline import BlockOp, apply_op, docblock, load_key

logger = logging.getLogger("attacks")


def run_audit(config: AuditConfig) -> list[Row]:
    started = time.perf_counter()
    if config.page:  # fail before minutes of work, not after
        docblock.check_block(config.page, report.PAGE_BLOCK)
    audit = prepare(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    keys: dict[str, BlockOp] = {}
    reconstructions: dict[str, BlockOp] = {}
    for scenario, step in STEPS.items():
        if scenario not in config.scenarios:
            continue
        name = scenario.value
        t0 = time.perf_counter()
        outcome = step(audit)
        rows += outcome.rows
        keys.update(outcome.keys)
        reconstructions.update(outcome.reconstructions)
        if outcome.skipped:
            skipped[name] = outcome.skipped
        for row in outcome.rows:
            logger.info("audit: %-26s top-1 %5.1f%%", row.scenario, 100 * row.top1)
        logger.info("audit: %s took %.0f s", name, time.perf_counter() - t0)
    meta = {
        "checkpoint": config.checkpoint,
        "data": config.data,
        "seed": config.seed,
        "key_fingerprint": audit.saved.key_fingerprint,
        "block_size": audit.scheme[0],
        "transforms": list(audit.scheme[1]),
        "val_images": len(audit.val.labels),
        "num_classes": len(audit.saved.classes),
        "skipped": skipped,
        "key_space_bits": load_key(config.key).key_space_bits(),
    }
    report.accuracy_chart(rows, out / "accuracy.png", chance=1 / len(audit.saved.classes))
    _samples(audit, keys, out / "samples.png")
    if reconstructions:
        _reconstruction(audit, reconstructions, out / "reconstruction.png")
    table = report.write_report(out, rows, meta)
    if config.page:
        data = f"{meta['val_images']} held-out val images of {config.data}"
        docblock.replace_block(config.page, report.PAGE_BLOCK, report.page_block(rows),
                               docblock.Provenance.here(data=data))  # fmt: skip
    print(table, end="", flush=True)
    best = max(
        (r for r in rows if r.scenario not in ("correct_key", "baseline")),
        key=lambda r: r.best_top1,
        default=None,
    )
    wrong = next((r for r in rows if r.spread is not None and r.scenario == "wrong_keys"), None)
    wrong_text = (
        f", wrong keys {100 * wrong.top1:.1f}% (95% CI {100 * wrong.spread.ci95[0]:.1f}-"
        f"{100 * wrong.spread.ci95[1]:.1f}%, {wrong.budget['keys']} keys)"
        if wrong is not None and wrong.spread is not None
        else ""
    )
    said = report.verdicts(rows, meta)
    logger.info(
        "attacks: %d scenarios in %.0f s; correct key %.1f%%%s, best other %s %.1f%%; "
        "verdict: %s; wrote %s",
        len(rows),
        time.perf_counter() - started,
        100 * rows[0].top1 if rows else float("nan"),
        wrong_text,
        best.scenario if best else "-",
        100 * best.best_top1 if best else 0,
        report.verdict_line(said) or "none (no correct_key row)",
        out / "report.md",
    )
    return rows


def _samples(a: Audit, keys: dict[str, BlockOp], path: Path) -> None:
    _, first = np.unique(a.val.labels, return_index=True)  # one image per class, up to 6
    plain = a.val.images[np.sort(first)[:6]]
    encrypted = apply_op(plain, a.true_op)
    columns = {"plain": plain, "encrypted": encrypted}
    for name, op in keys.items():  # what each key makes of the true ciphertext
        columns[f"decrypted:\n{name}"] = apply_op(encrypted, op.inverse())
    # plain images beside their encryptions under the owner's key give the key away (one pair
    # is known plaintext): the figure is the owner's only
    report.sample_grid(columns, path, perm=0o600)
    logger.info("audit: %s shows plain images encrypted with your key: mode 0600, keep it "
                "with the key", path)  # fmt: skip


def _reconstruction(a: Audit, keys: dict[str, BlockOp], path: Path) -> None:
    where, leaked = leaked_images(a)
    shown = slice(0, 4)
    columns = {"plain": a.train_plain.images[where][shown], "encrypted": leaked[shown]}
    for name, op in keys.items():  # what the holder of the shards sees with each estimate
        columns[f"decrypted:\n{name}"] = apply_op(leaked[shown], op.inverse())
    # the plain leaked images beside their ciphertexts are known plaintext for the owner's key
    report.sample_grid(columns, path, perm=0o600)
    logger.info("audit: %s shows leaked images beside their plain versions: mode 0600, keep "
                "it with the key", path)  # fmt: skip
