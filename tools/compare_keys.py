"""The paper's effect, measured: a protected model with the correct key, no key and wrong keys.

    python tools/compare_keys.py --checkpoint runs/demo/protected/checkpoint.pt \\
        --baseline runs/demo/baseline/checkpoint.pt --data runs/demo/shards \\
        --plain-data runs/demo/shards-plain --wrong-keys 10 --out runs/demo/summary.json

Correct key: the encrypted val shards. No key: the plain val shards. Wrong keys: the plain val
shards encrypted with random keys of the same scheme (block size and transforms). The baseline,
a model trained the same way on plain shards, is evaluated on plain images. Writes JSON and a
Markdown table beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from pipeline import Key, encrypt
from pipeline.checkpoint import CheckpointError
from pipeline.evaluation import load_model, load_split, top1
from pipeline.manifest import ManifestError

logger = logging.getLogger("compare_keys")


def compare(args: argparse.Namespace) -> dict:
    model, meta = load_model(args.checkpoint)
    encrypted = load_split(args.data)
    plain = load_split(args.plain_data)
    if encrypted.key_fingerprint != meta["key_fingerprint"]:
        raise CheckpointError(
            f"{args.checkpoint}: trained with key {meta['key_fingerprint']}, but {args.data} is "
            f"encrypted with {encrypted.key_fingerprint}"
        )
    if plain.key_fingerprint is not None:
        raise ManifestError(f"{args.plain_data}: --plain-data must hold plain (unencrypted) shards")
    scheme = (encrypted.block_size, tuple(encrypted.transforms))  # wrong keys of the same scheme
    wrong = [Key.generate(*scheme) for _ in range(args.wrong_keys)]
    wrong_top1 = [top1(model, plain, lambda x, k=k: encrypt(x, k)) for k in wrong]
    summary = {
        "protected_correct_key_top1": top1(model, encrypted),
        "protected_plain_top1": top1(model, plain),
        "wrong_key_top1_mean": statistics.fmean(wrong_top1),
        "wrong_key_top1_max": max(wrong_top1),
        "wrong_key_top1_all": wrong_top1,
        "wrong_keys": len(wrong),
        "val_samples": len(plain.labels),
        "key_fingerprint": meta["key_fingerprint"],
        "block_size": encrypted.block_size,
        "transforms": encrypted.transforms,
    }
    if args.baseline:
        baseline, _ = load_model(args.baseline)
        summary["baseline_top1"] = top1(baseline, plain)
    for name, path in (
        ("train_seconds", args.checkpoint),
        ("baseline_train_seconds", args.baseline),
    ):
        run_summary = Path(path).parent / "summary.json" if path else None
        if run_summary and run_summary.exists():
            summary[name] = json.loads(run_summary.read_text())["train_seconds"]
    return summary


def table(summary: dict) -> str:
    rows = [("protected model, correct key", summary["protected_correct_key_top1"])]
    if "baseline_top1" in summary:
        rows.append(("non-protected model (baseline), plain images", summary["baseline_top1"]))
    rows += [
        ("protected model, plain images (no key)", summary["protected_plain_top1"]),
        (
            f"protected model, {summary['wrong_keys']} wrong keys: mean",
            summary["wrong_key_top1_mean"],
        ),
        (
            f"protected model, {summary['wrong_keys']} wrong keys: max",
            summary["wrong_key_top1_max"],
        ),
    ]
    lines = ["| scenario | val top-1 |", "|---|---|"]
    lines += [f"| {name} | {100 * value:.1f}% |" for name, value in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="the protected model's checkpoint")
    p.add_argument("--data", required=True, help="the encrypted shards it was trained on")
    p.add_argument("--plain-data", required=True, help="plain shards of the same images")
    p.add_argument("--baseline", help="checkpoint of the non-protected model (optional)")
    p.add_argument("--wrong-keys", type=int, default=10)
    p.add_argument("--out", default="runs/demo/summary.json")
    args = p.parse_args(argv)
    try:
        summary = compare(args)
    except (CheckpointError, ManifestError, ValueError) as exc:
        logger.error("compare_keys: error: %s", exc)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    markdown = table(summary)
    out.with_suffix(".md").write_text(markdown)
    print(markdown, end="", flush=True)
    logger.info("compare_keys: wrote %s and %s", out, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
