"""The scenarios of the threat model, one function each: ``Audit`` in, ``Outcome`` out (report
rows, and the keys the attack ends with). ``STEPS`` is the order they run in."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attacks import report
from attacks.audit.config import Audit, AuditError, Outcome, Scenario
from attacks.ciphertext_only import estimate_key
from attacks.finetune import finetune, stratified_subset
from attacks.frontier.points import image_quality, reconstruct
from attacks.key_search import heuristic_key_search, random_key_search
from attacks.keyspace import random_material, to_blocks
from attacks.known_plaintext import solve_key
from attacks.report import RECONSTRUCTED, Row, Spread
from attacks.source_matching import source_matching_attack
from attacks.weight_matching import WeightMatchingError, recover_key
from pipeline import BlockOp, apply_op
from pipeline.model.evaluation import load_model, predict, top1
from pipeline.model.factory import PACKAGED, create_model, has_packaged_weights

logger = logging.getLogger("attacks")


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


def leaked_images(a: Audit) -> tuple[slice, np.ndarray]:
    """The leaked encrypted train images (``--leaked-images`` of them) and where they are in
    the train split: after the attacker's plain images, since statistics from the very images
    whose ciphertext is attacked would overstate the ciphertext-only attack."""
    start = len(a.attacker_set()[1])
    where = slice(start, start + a.config.leaked_images)
    leaked = a.train_encrypted[where]
    if len(leaked) == 0:
        raise AuditError(
            f"{a.config.data}: no train images left to leak after the {start} statistics "
            "images; lower --attacker-images"
        )
    return where, leaked


def quality(a: Audit, where: slice, op: BlockOp) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of the first leaked images decrypted with ``op``, against their
    plain versions: what the holder of the shards sees with the attack's key."""
    plain = a.train_plain.images[where][:RECONSTRUCTED]
    psnr, ssim = image_quality(plain, reconstruct(plain, a.true_op, op))
    return {"psnr": psnr, "ssim": ssim}


def ciphertext_only(a: Audit) -> Outcome:
    block_size, transforms = a.scheme
    natural = a.attacker_set()[0]  # natural-image statistics: plain images, no labels
    where, leaked = leaked_images(a)

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
                  "model_ranked_candidates": estimate.candidates},
                  **quality(a, where, estimate.op))  # fmt: skip
    keys = {"ciphertext-only": estimate.op}
    return Outcome([row], keys, reconstructions=keys)


def known_plaintext(a: Audit) -> Outcome:
    rows, keys = [], {}
    for k in a.config.known_pairs:
        solved = solve_key(a.train_plain.images[:k], a.train_encrypted[:k], *a.scheme)
        rows.append(key_row(a, f"known_plaintext_{k}", solved.op,
                            {"pairs": solved.pairs, "blocks": solved.blocks}))  # fmt: skip
        keys[f"known plaintext, k={k}"] = solved.op
    return Outcome(rows, keys)


def public_start(a: Audit) -> tuple[str | None, str | None]:
    """The public weights the reference rows start from, or None and why: ``--pretrained`` (a
    local file, ``package``, or ``hub`` when the user asks for it), else the packaged weights of
    the model. Never what the checkpoint records (untrusted: a file elsewhere, or the hub)."""
    if a.config.pretrained:
        return a.config.pretrained, None
    if has_packaged_weights(a.saved.model_name):
        return PACKAGED, None
    return None, (
        f"the finetune_pretrained rows need public weights of {a.saved.model_name}, and no "
        "package ships them: pass --pretrained PATH (a local weights file) or --pretrained hub"
    )


def source_matching(a: Audit) -> Outcome:
    """The leaked images paired with the public dataset they came from (the plain train split,
    shuffled: no names, no order), then the key solved from a few pairs; no model needed."""
    where, leaked = leaked_images(a)
    public = a.train_plain.images[a.rng("source_matching").permutation(len(a.train_plain.labels))]
    found = source_matching_attack(leaked, public, a.scheme[0], transforms=a.scheme[1],
                                   truth=a.true_op)  # fmt: skip
    logger.info("audit: source_matching: %s of %d pairs correct (checked with your key)",
                found.pairs_correct, len(found.pairs))  # fmt: skip
    budget = {"leaked_images": len(leaked), "public_images": len(public),
              "matched": len(found.pairs), "ambiguous": found.ambiguous,
              "pairs_used": found.pairs_used, "seconds": round(found.seconds, 2)}  # fmt: skip
    if found.solution is None:  # no pair, no key: the attacker has the model as it is
        return Outcome([Row("source_matching", a.accuracy(None), 0.0, budget=budget)])
    op = found.solution.op
    row = key_row(a, "source_matching", op, budget, **quality(a, where, op))
    keys = {"source matching": op}
    return Outcome([row], keys, reconstructions=keys)


def finetune_attacks(a: Audit) -> Outcome:
    pool = a.train_plain
    pretrained, why = public_start(a)
    torch.manual_seed(a.config.seed)  # the new classifier head: the same on every run
    public = None
    if pretrained is not None:
        public = create_model(
            a.saved.model_name,
            num_classes=a.saved.num_classes,
            pretrained=pretrained,
            model_kwargs=a.saved.model_kwargs,
        ).to(a.device)
    else:
        logger.info("audit: finetune_pretrained skipped: %s", why)
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
            if start is None:
                continue
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
    return Outcome(stolen + rows, skipped=why)


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


STEPS: dict[Scenario, Callable[[Audit], Outcome]] = {
    Scenario.CORRECT_KEY: correct_key, Scenario.NO_KEY: no_key,
    Scenario.WRONG_KEYS: wrong_keys, Scenario.RANDOM_KEY_SEARCH: random_search,
    Scenario.HEURISTIC_KEY_SEARCH: heuristic_search,
    Scenario.CIPHERTEXT_ONLY: ciphertext_only, Scenario.KNOWN_PLAINTEXT: known_plaintext,
    Scenario.SOURCE_MATCHING: source_matching,
    Scenario.FINETUNE: finetune_attacks, Scenario.WEIGHT_MATCHING: weight_matching,
}  # fmt: skip
