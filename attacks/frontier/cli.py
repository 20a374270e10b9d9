"""``python -m attacks.frontier``: the command line, turned into a ``FrontierConfig`` and run."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from attacks.frontier.config import FrontierConfig
from attacks.frontier.run import run_frontier
from pipeline import cli
from pipeline.cipher.blockwise import TRANSFORMS, check_block_size, check_transforms

logger = logging.getLogger("attacks.frontier")


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
    import attacks.frontier  # the package's docstring, with its command lines, is the help

    p = cli.build_parser(attacks.frontier.__doc__, prog="python -m attacks.frontier")
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
    cli.add_data_key(p, "sealed --data or --model-data shards")
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
        data_key=a.data_key,
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
