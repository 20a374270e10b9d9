"""The audit's outputs: results.json, report.md, and the figures people look at.

Each scenario of the audit gives ``Row`` records; they become dicts only here, where they are
written. ``results.json`` is a list of rows ``{"scenario", "top1", "key_recovered", "budget",
...}`` (``Row.to_json``); ``report.md`` shows the same rows as a table, with the threat model
of each scenario and the figures: ``accuracy.png`` (a bar per scenario), ``wrong_keys.png``
(the wrong-key distribution) and ``samples.png`` (plain, encrypted, and decrypted with a wrong
key and each estimated key).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_open, atomic_write
from pipeline.viz import save_image_grid

PAGE_BLOCK = "attacks-report"  # the block of a results page this report replaces

# What the attacker (or user) has in each scenario; shown under the table.
THREATS = {
    "correct_key": "the authorized user: model and key",
    "baseline": "a non-protected model trained the same way on plain images (reference)",
    "no_key": "the model only; plain images go in as they are",
    "wrong_keys": "the model and random keys of the same scheme (no search)",
    "random_key_search": "the model, the algorithm and a small labelled plain set; keeps the "
    "best of many random keys",
    "heuristic_key_search": "as random search, then hill-climbs on the key",
    "ciphertext_only": "leaked encrypted train shards, the algorithm and natural-image "
    "statistics; the model (no labels) only to pick among block symmetries and the negative",
    "known_plaintext": "k plain images and their encryptions (for example the public files "
    "that older shards named); solves for the key, no model needed",
    "finetune_attack": "the model and a few plain labelled images, to fine-tune it",
    "finetune_pretrained": "the public pre-trained model and the same images (reference for "
    "the fine-tuning attack)",
    "weight_matching": "the model and the weights it started from (public pre-trained weights); "
    "matches the two patch embeddings, no data needed",
}


@dataclass(frozen=True)
class Spread:
    """The spread of per-key accuracies: the 95% confidence interval of their mean (normal
    approximation), the range holding the central 95% of keys, the extremes, and every value."""

    ci95: tuple[float, float]
    central95: tuple[float, float]
    max: float
    min: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        mean = statistics.fmean(values)
        half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        low, high = np.percentile(values, [2.5, 97.5]).tolist()
        return cls(ci95=(mean - half, mean + half), central95=(low, high), max=max(values),
                   min=min(values), values=tuple(values))  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One line of the report: a scenario's held-out top-1 and what the attacker spent."""

    scenario: str
    top1: float
    key_recovered: float | None = None  # for attacks that end with a key
    budget: dict[str, int | float] = field(default_factory=dict)
    spread: Spread | None = None  # over many keys (wrong keys): top1 is their mean
    parts: dict[str, float] | None = None  # key recovered, by part of the scheme
    attacker_top1: float | None = None  # key searches: top-1 on the attacker's own images
    accepted_moves: int | None = None  # heuristic key search

    @property
    def best_top1(self) -> float:
        """The best accuracy the scenario reached: the best key's, for many keys."""
        return self.top1 if self.spread is None else self.spread.max

    def to_json(self) -> dict:
        """The row as results.json holds it (optional fields only when set)."""
        out: dict = {"scenario": self.scenario, "top1": self.top1,
                     "key_recovered": self.key_recovered, "budget": dict(self.budget)}  # fmt: skip
        if self.spread is not None:
            s = self.spread
            out.update(top1_ci95=list(s.ci95), top1_central95=list(s.central95),
                       top1_max=s.max, top1_min=s.min, top1_all=list(s.values))  # fmt: skip
        extras = {"parts": self.parts, "attacker_top1": self.attacker_top1,
                  "accepted_moves": self.accepted_moves}  # fmt: skip
        out.update({k: v for k, v in extras.items() if v is not None})
        return out


def _budget_text(budget: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in budget.items()) or "-"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | top-1 | key recovered | budget |",
        "|---|---|---|---|",
    ]
    for row in rows:
        top1 = _percent(row.top1)
        if row.spread is not None:
            (lo, hi), (a, b) = row.spread.ci95, row.spread.central95
            top1 += (
                f" (mean; 95% CI {_percent(lo)}-{_percent(hi)}; 95% of keys "
                f"{_percent(a)}-{_percent(b)}; max {_percent(row.spread.max)})"
            )
        lines.append(
            f"| {row.scenario} | {top1} | {_percent(row.key_recovered)} | "
            f"{_budget_text(row.budget)} |"
        )
    return "\n".join(lines) + "\n"


def findings(rows: Sequence[Row]) -> list[str]:
    """Plain statements of which attacks succeed, measured against the correct key and the
    wrong keys (an attack "succeeds" when it closes at least half the gap between them)."""
    by = {row.scenario: row for row in rows}
    if "correct_key" not in by:
        return []
    correct = by["correct_key"].top1
    floor_row = by.get("wrong_keys") or by.get("no_key")
    floor = floor_row.top1 if floor_row else 0.0
    gap = max(correct - floor, 1e-9)
    out = []
    wrong = by.get("wrong_keys")
    if wrong is not None and wrong.spread is not None:
        (lo, hi), (a, b) = wrong.spread.ci95, wrong.spread.central95
        out.append(
            f"**Wrong keys**: {_percent(wrong.top1)} on average over {wrong.budget['keys']} "
            f"random keys (95% CI of the mean {_percent(lo)}-{_percent(hi)}); 95% of the keys "
            f"give {_percent(a)}-{_percent(b)}, against {_percent(correct)} with the key."
        )
    attacks = ["no_key", "random_key_search", "heuristic_key_search", "ciphertext_only",
               "weight_matching"]  # fmt: skip
    attacks += [r.scenario for r in rows if r.scenario.startswith("known_plaintext_")]
    for name in attacks:
        if name not in by:
            continue
        top1 = by[name].top1
        share = (top1 - floor) / gap
        verdict = "succeeds" if share >= 0.5 else "partly succeeds" if share >= 0.1 else "fails"
        out.append(
            f"**{name} {verdict}**: {_percent(top1)} against {_percent(correct)} with the key "
            f"and {_percent(floor)} with wrong keys ({100 * max(share, 0):.0f}% of the gap)."
            + (
                f" It recovers {_percent(by[name].key_recovered)} of the key from "
                f"{by[name].budget['pairs']} known pair(s)."
                if name.startswith("known_plaintext_")
                else ""
            )
        )
    if wrong is not None and (wrong.best_top1 - floor) / gap >= 0.5:
        out.append(f"**Some random keys work**: the best of {wrong.budget['keys']} "
                   f"reaches {_percent(wrong.best_top1)}.")  # fmt: skip
    for row in rows:
        if not row.scenario.startswith("finetune_attack_"):
            continue
        tag = row.scenario.removeprefix("finetune_attack_")
        public = by.get(f"finetune_pretrained_{tag}")
        if public is None:
            continue
        lead = row.top1 - public.top1
        images = row.budget["images"]
        if lead > 0.05:
            out.append(
                f"**The stolen model gives a head start** ({tag}): fine-tuned on {images} plain "
                f"images it reaches {_percent(row.top1)}, the public model "
                f"{_percent(public.top1)} with the same images and steps."
            )
        else:
            out.append(
                f"No head start from the stolen model ({tag}): {_percent(row.top1)} against "
                f"{_percent(public.top1)} for the public model on the same {images} images."
            )
    return out


def markdown(rows: Sequence[Row], meta: dict) -> str:
    threats = []
    for row in rows:
        base = re.sub(r"_\d+(pct)?$", "", row.scenario)
        if base in THREATS and base not in [t[0] for t in threats]:
            threats.append((base, THREATS[base]))
    parts = [
        "# Robustness report\n",
        f"Model `{meta['checkpoint']}` (key fingerprint `{meta['key_fingerprint']}`, block size "
        f"{meta['block_size']}, transforms {', '.join(meta['transforms'])}); shards "
        f"`{meta['data']}`. Accuracy is top-1 on {meta['val_images']} held-out val images; the "
        f"attackers' plain images come from the train split. Seed {meta['seed']}.\n",
        *(
            [
                "Key space, in bits: "
                + ", ".join(f"{k} {v:g}" for k, v in meta["key_space_bits"].items())
                + ". Only a brute-force search is bounded by it.\n"
            ]
            if "key_space_bits" in meta
            else []
        ),
        table(rows),
        "".join(f"- {line}\n" for line in findings(rows)),
        "Key recovered: the fraction of (block position, byte value) pairs that the attack's "
        "key encrypts exactly as the true key. An attack can reach high accuracy with a key that "
        "differs from the true one where the images cannot tell them apart.\n",
    ]
    details = [
        f"- {row.scenario}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row.parts.items())
        for row in rows
        if row.parts
    ]
    if details:
        parts.append("Key recovered, by part:\n\n" + "\n".join(details) + "\n")
    parts.append("## Threat model\n\n" + "\n".join(f"- {k}: {v}" for k, v in threats) + "\n")
    parts.append(
        "## Figures\n\n![accuracy](accuracy.png)\n\n![wrong keys](wrong_keys.png)\n\n"
        "![samples](samples.png)\n"
    )
    return "\n".join(parts)


def accuracy_chart(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.scenario for row in rows]
    values = [100 * row.top1 for row in rows]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    bars = ax.barh(names[::-1], values[::-1], color="tab:blue")
    for bar, value in zip(bars, values[::-1], strict=True):
        ax.text(
            bar.get_width() + 1,
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1f}%",
            va="center",
            fontsize=8,
        )
    for row in rows:
        if row.spread is not None:
            ax.plot(
                100 * row.spread.max,
                len(rows) - 1 - names.index(row.scenario),
                "k|",
                markersize=12,
                label="wrong keys: max",
            )
            ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("top-1 accuracy on held-out val (%)")
    fig.tight_layout()
    _save(fig, path)


def wrong_keys_chart(accuracies: Sequence[float], correct: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(
        100 * np.asarray(accuracies),
        bins=20,
        range=(0, 100),
        color="tab:red",
        label=f"{len(accuracies)} wrong keys",
    )
    ax.axvline(100 * correct, color="tab:green", label="correct key")
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_ylabel("keys")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_open(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def sample_grid(columns: dict[str, np.ndarray], path: Path) -> None:
    """One row per image, one column per named NHWC uint8 array."""
    names = list(columns)
    n = len(next(iter(columns.values())))
    rows = [[columns[name][i] for name in names] for i in range(n)]
    save_image_grid(rows, path, col_titles=names, cell_inches=1.6)


def write_report(out: Path, rows: Sequence[Row], meta: dict) -> str:
    """Write results.json and report.md (atomically); returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    atomic_write(out / "report.md", markdown(rows, meta))
    return table(rows)


def page_block(rows: Sequence[Row]) -> str:
    """The body of a results page's ``attacks-report`` block: the table and what it shows."""
    return f"{table(rows)}\n" + "".join(f"- {line}\n" for line in findings(rows))
