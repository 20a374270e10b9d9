"""docs/results/benchmarks.md from bench/results.json: every figure, grouped by the benchmark
that measured it, with that benchmark's note (machine, data) and the date it ran.

    python bench/report.py --page docs/results/benchmarks.md     # `make bench` ends with it
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.docblock import Provenance, replace_block

PAGE_BLOCK = "bench-results"


def _sealing(name: str) -> bool:
    return name.startswith(("seal_", "open_")) or "sealed" in name


# (title, the benchmark's note key, which figures are its own)
SECTIONS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("Encryption: `bench/bench_encrypt.py`", "encrypt_bench_machine",
     lambda n: n.startswith(("encrypt_", "decrypt_", "copy_"))),
    ("The offline stage: `bench/bench_make_shards.py`", "make_shards_bench",
     lambda n: n.startswith(("make_shards_", "naive_", "moto_")) and not _sealing(n)),
    ("The source listing: `bench/bench_listing.py`", "listing_bench_machine",
     lambda n: n.startswith("source_listing_")),
    ("The loader: `bench/bench_loader.py`", "loader_bench",
     lambda n: n.startswith(("loader_", "jpeg_loader")) and not _sealing(n)),
    ("Sealing: `bench/bench_seal.py`", "seal_bench_machine", _sealing),
    ("The ciphertext-only estimate: `bench/bench_frontier.py`", "frontier_bench_machine",
     lambda n: n.startswith("frontier_")),
    ("The GPU check: `bench/gpu_check.py`", "gpu_note", lambda n: n.startswith("gpu_")),
]  # fmt: skip
NOTES = {key for _, key, _ in SECTIONS} | {f"{key}_date" for _, key, _ in SECTIONS}


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_value(v) for v in value)
    return str(value)


def markdown(results: dict) -> str:
    """One table per benchmark; figures no section claims are listed last."""
    parts, claimed = [], set(NOTES)
    for title, note_key, mine in SECTIONS:
        names = sorted(n for n in results if mine(n) and n not in NOTES)
        if not names:
            continue
        claimed.update(names)
        when = results.get(f"{note_key}_date", "date not recorded")
        rows = "".join(f"| `{n}` | {_value(results[n])} |\n" for n in names)
        note = results.get(note_key, "no note recorded")
        parts.append(f"### {title}\n\n{note} ({when}).\n\n| figure | value |\n|---|---|\n{rows}")
    rest = sorted(set(results) - claimed)
    if rest:
        rows = "".join(f"| `{n}` | {_value(results[n])} |\n" for n in rest)
        parts.append(f"### Other figures\n\n| figure | value |\n|---|---|\n{rows}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="bench/results.json", help="the figures")
    parser.add_argument("--page", default="docs/results/benchmarks.md", help="page to update")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    provenance = Provenance.here(data=f"{args.results}, each benchmark's figures as its note says")
    replace_block(args.page, PAGE_BLOCK, markdown(results), provenance)
    print(f"wrote {args.page}: {len(results)} entries of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
