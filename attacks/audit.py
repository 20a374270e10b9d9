"""The model owner's audit: every scenario of the threat model, one row each.

    python -m attacks --checkpoint runs/protected/checkpoint.pt --key k.bin   # ./shards -> report
    python -m attacks --checkpoint runs/demo/protected/checkpoint.pt --key runs/demo/k.bin \\
        --data runs/demo/shards --baseline runs/demo/baseline/checkpoint.pt --out report

The encrypted shards are reused: the val shards are decrypted with the owner's key (exactly)
and re-encrypted as each scenario needs; accuracy is always measured on those held-out val
images. The attackers' plain images come from the decrypted train split, and the encrypted
train shards are the "leaked data" of the ciphertext-only attack (other images than those its
natural-image statistics come from); the first train images and
their ciphertexts are the known-plaintext pairs. Budgets are options; the
defaults finish on the embedded demo on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attacks import report
from attacks.ciphertext_only import estimate_key
from attacks.finetune import finetune, stratified_subset
from attacks.key_search import heuristic_key_search, random_key_search
from attacks.keyspace import KeyRecovery, key_recovery, random_material, to_blocks
from attacks.known_plaintext import solve_key
from attacks.report import Row, Spread
from attacks.weight_matching import WeightMatchingError, recover_key
from pipeline import BlockOp, apply_op, cli, decrypt, docblock, load_key, paths
from pipeline.device import DEVICE_CHOICES, model_device, resolve_device
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.evaluation import EvalSet, load_model, load_split, predict, top1
from pipeline.model.factory import create_model
from pipeline.shards.manifest import load_manifest
from pipeline.storage import Storage

logger = logging.getLogger("attacks")


class Scenario(str, Enum):
    """The audit's scenarios, in the order they run (their values are the CLI and JSON names)."""

    CORRECT_KEY = "correct_key"
    NO_KEY = "no_key"
    WRONG_KEYS = "wrong_keys"
    RANDOM_KEY_SEARCH = "random_key_search"
    HEURISTIC_KEY_SEARCH = "heuristic_key_search"
    CIPHERTEXT_ONLY = "ciphertext_only"
    KNOWN_PLAINTEXT = "known_plaintext"
    FINETUNE = "finetune"
    WEIGHT_MATCHING = "weight_matching"


SCENARIOS = tuple(s.value for s in Scenario)  # the names, for command lines


class AuditError(KeyprotectError, ValueError):
    """An audit that cannot run: wrong key for the checkpoint, shards of another key, ..."""


@dataclass(frozen=True)
class AuditConfig:
    checkpoint: str
    key: str
    data: str
    out: str = "report"
    baseline: str | None = None
    scenarios: tuple[Scenario, ...] = tuple(Scenario)
    wrong_keys: int = 100
    attacker_images: int = 100  # the attacker's labelled plain set (key searches)
    search_keys: int = 200  # random key search: keys tried
    search_steps: int = 300  # heuristic key search: moves evaluated
    leaked_images: int = 2000  # ciphertext-only: encrypted train images used
    known_pairs: tuple[int, ...] = (1, 10)  # known-plaintext: (plain, cipher) pairs held
    finetune_fractions: tuple[float, ...] = (0.01, 0.10)
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    pretrained: str | None = None  # the public model; default: what the checkpoint started from
    eval_images: int | None = None  # cap on held-out val images (default: all)
    seed: int = 0
    device: str = "auto"
    page: str | None = None  # a results page whose attacks-report block is replaced
    reference: str | None = None  # weight matching: the weights the model started from


@dataclass
class Audit:
    """What the scenarios share: the model, the key, plain val and the attacker's data."""

    config: AuditConfig
    model: torch.nn.Module
    saved: Checkpoint  # the protected model's checkpoint, without its tensors
    val: EvalSet  # plain val images (decrypted with the owner's key)
    encrypted_val: EvalSet
    train_plain: EvalSet  # the attacker's pool of plain images
    train_encrypted: np.ndarray  # the leaked shards' images
    train_total: int
    true_op: BlockOp
    scheme: tuple[int, tuple[str, ...]]

    @property
    def device(self) -> torch.device:
        """Where the model is: every scenario runs there."""
        return model_device(self.model)

    @cached_property
    def correct_top1(self) -> float:
        """Top-1 on the encrypted val shards as stored (the authorized user)."""
        return top1(self.model, self.encrypted_val)

    def rng(self, name: str) -> np.random.Generator:
        """An independent, reproducible stream per scenario."""
        return np.random.default_rng([self.config.seed, *name.encode()])

    def accuracy(self, op: BlockOp | None) -> float:
        """Top-1 on held-out val, encrypted with ``op`` (plain when None)."""
        transform = None if op is None else (lambda x: apply_op(x, op))
        return top1(self.model, self.val, transform)

    def attacker_set(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.config.attacker_images
        return self.train_plain.images[:n], self.train_plain.labels[:n]

    def recovery(self, op: BlockOp) -> KeyRecovery:
        return key_recovery(op, self.true_op, self.scheme[1])


@dataclass(frozen=True)
class Outcome:
    """What a scenario gives: its report rows, and the keys it ends with (a column each in
    samples.png: what that key makes of the true ciphertext)."""

    rows: list[Row]
    keys: dict[str, BlockOp] = field(default_factory=dict)
    skipped: str | None = None  # why the scenario did not run, when it did not


def prepare(config: AuditConfig) -> Audit:
    device = resolve_device(config.device)
    model, saved = load_model(config.checkpoint, device)
    key = load_key(config.key, expected=saved.key_fingerprint)
    if saved.key_fingerprint is None:
        raise AuditError(f"{config.checkpoint}: a model trained on plain data has no key to audit")
    if saved.key_fingerprint != key.fingerprint:
        raise AuditError(
            f"{config.checkpoint}: trained with key {saved.key_fingerprint}, but {config.key} "
            f"is key {key.fingerprint}; audit a model with its own key"
        )
    crop = saved.crop_size
    encrypted_val = load_split(config.data, "val", crop_size=crop, limit=config.eval_images)
    if encrypted_val.key_fingerprint != key.fingerprint:
        raise AuditError(
            f"{config.data}: shards are encrypted with {encrypted_val.key_fingerprint}, not with "
            f"{config.key} ({key.fingerprint}); pass the shards this model was trained on"
        )
    train_total = load_manifest(Storage(config.data), "train").total_samples
    needed = max(
        config.attacker_images + config.leaked_images,  # ciphertext-only: disjoint sets
        max(config.known_pairs, default=0),
        math.ceil(max(config.finetune_fractions, default=0) * train_total),
    )
    train = load_split(config.data, "train", crop_size=crop, limit=needed)
    plain_val = replace(encrypted_val, images=decrypt(encrypted_val.images, key))
    train_plain = replace(train, images=decrypt(train.images, key))
    logger.info(
        "audit: %d val and %d train images, key %s (block size %d, %s), device %s",
        len(plain_val.labels),
        len(train.labels),
        key.fingerprint,
        key.block_size,
        "+".join(key.transforms),
        device,
    )
    return Audit(
        config=config, model=model, saved=saved, val=plain_val, encrypted_val=encrypted_val,
        train_plain=train_plain, train_encrypted=train.images, train_total=train_total,
        true_op=key.material.encrypt_op, scheme=(key.block_size, key.transforms),
    )  # fmt: skip


def correct_key(a: Audit) -> Outcome:
    rows = [Row("correct_key", a.correct_top1, 1.0)]
    if a.config.baseline:
        baseline, base = load_model(a.config.baseline, a.device)
        if base.key_fingerprint is not None:
            raise AuditError(f"{a.config.baseline}: --baseline must be a model of plain data")
        rows.append(Row("baseline", top1(baseline, a.val)))
    return Outcome(rows)


def no_key(a: Audit) -> Outcome:
    return Outcome([Row("no_key", a.accuracy(None))])


def wrong_keys(a: Audit) -> Outcome:
    rng = a.rng("wrong_keys")
    ops = [random_material(*a.scheme, rng).encrypt_op for _ in range(a.config.wrong_keys)]
    accuracies = [a.accuracy(op) for op in tqdm(ops, desc="wrong keys", leave=False)]
    row = Row("wrong_keys", statistics.fmean(accuracies), budget={"keys": len(accuracies)},
              spread=Spread.of(accuracies))  # fmt: skip
    report.wrong_keys_chart(accuracies, a.correct_top1, Path(a.config.out) / "wrong_keys.png")
    return Outcome([row], {"wrong key": ops[0]})


def key_row(a: Audit, scenario: str, op: BlockOp, budget: dict, **extra) -> Row:
    """The row of an attack that ends with a key: its accuracy and how much of the key it has."""
    recovered = a.recovery(op)
    return Row(scenario, a.accuracy(op), recovered.key_recovered, budget=budget,
               parts=recovered.parts, **extra)  # fmt: skip


def random_search(a: Audit) -> Outcome:
    images, labels = a.attacker_set()
    found = random_key_search(
        a.model, images, labels, a.scheme, keys=a.config.search_keys,
        rng=a.rng("random_key_search"),
    )  # fmt: skip
    op = found.material.encrypt_op
    row = key_row(a, "random_key_search", op, {"keys_tried": found.tried,
                  "attacker_images": len(labels)}, attacker_top1=found.accuracy)  # fmt: skip
    return Outcome([row], {"random key search": op})


def heuristic_search(a: Audit) -> Outcome:
    images, labels = a.attacker_set()
    found = heuristic_key_search(
        a.model, images, labels, a.scheme, steps=a.config.search_steps,
        rng=a.rng("heuristic_key_search"),
    )  # fmt: skip
    op = found.material.encrypt_op
    row = key_row(a, "heuristic_key_search", op, {"steps": a.config.search_steps,
                  "attacker_images": len(labels)}, attacker_top1=found.accuracy,
                  accepted_moves=found.accepted)  # fmt: skip
    return Outcome([row], {"heuristic key search": op})


def ciphertext_only(a: Audit) -> Outcome:
    block_size, transforms = a.scheme
    natural = a.attacker_set()[0]  # natural-image statistics: plain images, no labels
    # the leaked images are others than those: statistics from the very images whose
    # ciphertext is attacked would overstate the attack
    start = len(natural)
    leaked = a.train_encrypted[start : start + a.config.leaked_images]
    if len(leaked) == 0:
        raise AuditError(
            f"{a.config.data}: no train images left for the ciphertext-only attack after the "
            f"{start} statistics images; lower --attacker-images"
        )

    def confidence(op: BlockOp) -> float:
        logits = torch.from_numpy(predict(a.model, apply_op(natural, op)))
        return float(logits.softmax(1).max(1).values.mean())

    estimate = estimate_key(
        to_blocks(leaked, block_size),
        to_blocks(natural, block_size),
        block_size,
        transforms,
        rng=a.rng("ciphertext_only"),
        scorer=confidence,
    )
    row = key_row(a, "ciphertext_only", estimate.op, {"leaked_images": len(leaked),
                  "statistics_images": len(natural),
                  "model_ranked_candidates": estimate.candidates})  # fmt: skip
    return Outcome([row], {"ciphertext-only": estimate.op})


def known_plaintext(a: Audit) -> Outcome:
    rows, keys = [], {}
    for k in a.config.known_pairs:
        solved = solve_key(a.train_plain.images[:k], a.train_encrypted[:k], *a.scheme)
        rows.append(key_row(a, f"known_plaintext_{k}", solved.op,
                            {"pairs": solved.pairs, "blocks": solved.blocks}))  # fmt: skip
        keys[f"known plaintext, k={k}"] = solved.op
    return Outcome(rows, keys)


def finetune_attacks(a: Audit) -> Outcome:
    pool = a.train_plain
    pretrained = a.config.pretrained or a.saved.pretrained
    torch.manual_seed(a.config.seed)  # the new classifier head: the same on every run
    public = create_model(
        a.saved.model_name,
        num_classes=a.saved.num_classes,
        pretrained=pretrained,
        model_kwargs=a.saved.model_kwargs,
    ).to(a.device)
    rows: list[Row] = []
    stolen: list[Row] = []
    for fraction in a.config.finetune_fractions:
        share = min(1.0, fraction * a.train_total / len(pool.labels))
        chosen = stratified_subset(pool.labels, share, a.rng(f"finetune{fraction}"))
        images, labels = pool.images[chosen], pool.labels[chosen]
        budget = {
            "images": len(chosen),
            "steps": a.config.finetune_steps,
            "lr": a.config.finetune_lr,
        }
        tag = f"{round(100 * fraction)}pct"
        for name, start in (("finetune_attack", a.model), ("finetune_pretrained", public)):
            tuned = finetune(
                start,
                images,
                labels,
                steps=a.config.finetune_steps,
                lr=a.config.finetune_lr,
                seed=a.config.seed,
            )
            acc = top1(tuned, a.val)
            (stolen if name == "finetune_attack" else rows).append(
                Row(f"{name}_{tag}", acc, budget=budget)
            )
    return Outcome(stolen + rows)


def weight_matching(a: Audit) -> Outcome:
    if not a.config.reference:
        why = "it needs --reference (the weights the protected model started from)"
        logger.info("audit: weight_matching skipped: %s", why)
        return Outcome([], skipped=why)
    try:
        match = recover_key(a.model, a.config.reference,
                            image_size=a.saved.crop_size or a.saved.image_shape[0],
                            block_size=a.scheme[0], transforms=a.scheme[1])  # fmt: skip
    except WeightMatchingError as exc:
        raise AuditError(f"weight_matching: {exc}") from None
    row = key_row(a, "weight_matching", match.op, {"reference": Path(a.config.reference).name,
                  "mean_abs_correlation": round(match.correlation, 3)})  # fmt: skip
    return Outcome([row], {"weight matching": match.op})


def run_audit(config: AuditConfig) -> list[Row]:
    started = time.perf_counter()
    if config.page:  # fail before minutes of work, not after
        docblock.check_block(config.page, report.PAGE_BLOCK)
    audit = prepare(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[Scenario, Callable[[Audit], Outcome]] = {
        Scenario.CORRECT_KEY: correct_key, Scenario.NO_KEY: no_key,
        Scenario.WRONG_KEYS: wrong_keys, Scenario.RANDOM_KEY_SEARCH: random_search,
        Scenario.HEURISTIC_KEY_SEARCH: heuristic_search,
        Scenario.CIPHERTEXT_ONLY: ciphertext_only, Scenario.KNOWN_PLAINTEXT: known_plaintext,
        Scenario.FINETUNE: finetune_attacks, Scenario.WEIGHT_MATCHING: weight_matching,
    }  # fmt: skip
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    keys: dict[str, BlockOp] = {}
    for scenario, step in steps.items():
        if scenario not in config.scenarios:
            continue
        name = scenario.value
        t0 = time.perf_counter()
        outcome = step(audit)
        rows += outcome.rows
        keys.update(outcome.keys)
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
    report.sample_grid(columns, path)


def build_parser() -> argparse.ArgumentParser:
    d = {f.name: f.default for f in fields(AuditConfig) if f.default is not f.default_factory}
    p = cli.build_parser(__doc__, prog="python -m attacks")
    p.add_argument(
        "--checkpoint",
        default=paths.CHECKPOINT,
        help="the protected model's checkpoint",
    )
    p.add_argument("--key", required=True, help="the owner's key file")
    p.add_argument(
        "--data",
        default=paths.SHARDS,
        help="the encrypted shards it was trained on",
    )
    p.add_argument("--out", default=d["out"], help="report folder")
    p.add_argument("--baseline", help="checkpoint of a non-protected model, for reference")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--wrong-keys",
        type=int,
        default=d["wrong_keys"],
        help="wrong_keys: random keys of the same scheme tried (at least 100 for the audit)",
    )
    p.add_argument(
        "--attacker-images",
        type=int,
        default=d["attacker_images"],
        help="labelled plain images the key searches use",
    )
    p.add_argument(
        "--search-keys", type=int, default=d["search_keys"], help="random key search: keys tried"
    )
    p.add_argument(
        "--search-steps",
        type=int,
        default=d["search_steps"],
        help="heuristic key search: moves evaluated",
    )
    p.add_argument(
        "--leaked-images",
        type=int,
        default=d["leaked_images"],
        help="ciphertext-only: encrypted train images used",
    )
    p.add_argument(
        "--known-pairs",
        default="1,10",
        help="known-plaintext: comma-separated numbers of (plain, encrypted) image pairs the "
        "attacker holds, one row each, e.g. 1,10",
    )
    p.add_argument(
        "--finetune-fractions",
        default="0.01,0.1",
        help="comma-separated fractions in (0, 1] of the train set the fine-tuning attacks get, "
        "one row each, e.g. 0.01,0.1",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=d["finetune_steps"],
        help="fine-tuning attacks: optimiser steps",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=d["finetune_lr"],
        help="fine-tuning attacks: learning rate",
    )
    p.add_argument(
        "--pretrained",
        help="the public pre-trained weights (default: the checkpoint's own starting point)",
    )
    p.add_argument(
        "--eval-images", type=int, help="use the first N val images; left out: all of them"
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of every attack's draws")
    p.add_argument(
        "--device", default=d["device"], help=f"{DEVICE_CHOICES} (auto: CUDA when there)"
    )
    p.add_argument(
        "--page",
        help="also replace the generated attacks-report block in this Markdown page "
        "(e.g. docs/results/audit.md)",
    )
    p.add_argument(
        "--reference",
        help="weight_matching: the weights the protected model started from (the public "
        "pre-trained file, or a plain checkpoint); without it that scenario is skipped",
    )
    return p


def parse_args(argv: list[str] | None) -> AuditConfig:
    p = build_parser()
    a = p.parse_args(argv)
    names = [s for s in a.scenarios.split(",") if s]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    scenarios = tuple(Scenario(name) for name in names)
    try:
        resolve_device(a.device)
    except ValueError as exc:
        p.error(f"--device: {exc}")
    fractions = tuple(float(f) for f in a.finetune_fractions.split(",") if f)
    if any(not 0 < f <= 1 for f in fractions):
        p.error("--finetune-fractions must be in (0, 1]")
    try:
        pairs = tuple(int(k) for k in a.known_pairs.split(",") if k)
    except ValueError:
        pairs = (0,)
    if any(k < 1 for k in pairs):
        p.error(f"--known-pairs {a.known_pairs!r} must be whole numbers >= 1, e.g. 1,10")
    for name in ("wrong_keys", "attacker_images", "search_keys", "search_steps",
                 "leaked_images", "finetune_steps"):  # fmt: skip
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.wrong_keys < 100:
        logger.warning("attacks: %d wrong keys; the audit calls for at least 100", a.wrong_keys)
    values = {**vars(a), "scenarios": scenarios, "finetune_fractions": fractions,
              "known_pairs": pairs}  # fmt: skip
    return AuditConfig(**values)


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    config = parse_args(argv)

    def job() -> None:
        run_audit(config)

    return cli.run("attacks", job, log=logger)
