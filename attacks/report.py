"""The audit's outputs: results.json, report.md, and the figures people look at.

Each scenario of the audit gives ``Row`` records; they become dicts only here, where they are
written. ``results.json`` is a list of rows ``{"scenario", "top1", "key_recovered", "budget",
...}`` (``Row.to_json``); ``report.md`` shows the same rows as a table, with the threat model
of each scenario and the figures: ``accuracy.png`` (a bar per scenario), ``wrong_keys.png``
(the wrong-key distribution), ``samples.png`` (plain, encrypted, and decrypted with a wrong
key and each estimated key) and ``reconstruction.png`` (leaked train images decrypted with the
keys estimated from the leaked shards; their PSNR and SSIM are the rows' ``psnr`` and ``ssim``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_open, atomic_write
from pipeline.viz import save_image_grid

PAGE_BLOCK = "attacks-report"  # the block of a results page this report replaces
RECONSTRUCTED = 8  # leaked images decrypted with an estimated key for its PSNR and SSIM

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
    "source_matching": "leaked encrypted train shards and the public dataset they came from, "
    "with no names and in any order; pairs images with their sources by a signature no key "
    "changes, then solves for the key from a few pairs, no model needed",
    "finetune_attack": "the model and a few plain labelled images, to fine-tune it",
    "finetune_pretrained": "the public pre-trained model and the same images (reference for "
    "the fine-tuning attack)",
    "weight_matching": "the model and the weights it started from (public pre-trained weights); "
    "matches the two patch embeddings, no data needed",
}


# What each part of a key means, where "key recovered, by part" shows it.
PARTS = {
    "permutation": "which position of a block each position comes from (pixel shuffling)",
    "np_mask": "which positions are negated, x -> 255 - x (negative/positive)",
    "ffx_mask": "which positions go through the FFX byte table",
    "ffx_table": "the FFX table itself: the keyed bijection of the 256 byte values",
    "byte_maps": "each position's whole byte map (its NP bit and FFX together): for every "
    "position and byte value, whether the attack's key maps it as the true key does",
    "key_recovered": "all parts together: the fraction of (block position, byte value) pairs "
    "that the attack's key encrypts exactly as the true key",
}

COLUMNS = (
    "Columns: *top-1* is the accuracy on the held-out val images of what the scenario gives "
    "the model (for wrong keys the mean over the keys, with the 95% confidence interval of the "
    "mean, the range of the central 95% of keys and the best key); *key recovered* is the "
    "fraction of (block position, byte value) pairs that the attack's key encrypts exactly as "
    "the true key; *budget* is what the attacker spent. Top-1 can be high with little of the "
    "key exact: many keys are equivalent on the images (for grey images the three channels of "
    "a pixel are interchangeable, and on flat blocks most positions are), and the model "
    "forgives small errors, so a partly wrong key still classifies well."
)


@dataclass(frozen=True)
class Verdict:
    """What one kind of attacker achieves, in words: ``holds`` is True when the protection
    holds against it, False when it breaks, None when it partly does."""

    attacker: str
    holds: bool | None
    text: str
    short: str = ""  # the attacker in two words, for the console's one line

    @property
    def word(self) -> str:
        return {True: "holds", False: "breaks", None: "partly holds"}[self.holds]

    def line(self) -> str:
        return f"**{self.attacker}: the protection {self.word}.** {self.text}"


def verdict_line(said: Sequence[Verdict]) -> str:
    """The verdicts in one line: ``model thief holds; shard holder breaks; ...``."""
    return "; ".join(f"{v.short} {v.word}" for v in said)


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
    psnr: float | None = None  # keys from leaked images: leaked images decrypted with it (dB)
    ssim: float | None = None  # the same images' mean SSIM

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
                  "accepted_moves": self.accepted_moves, "psnr": self.psnr,
                  "ssim": self.ssim}  # fmt: skip
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
            f"| {_label(row)} | {top1} | {_percent(row.key_recovered)} | "
            f"{_budget_text(row.budget)} |"
        )
    return "\n".join(lines) + "\n"


def reconstruction_line(rows: Sequence[Row]) -> str:
    """What the keys estimated from the leaked shards make of those images, in one line (empty
    when no row has it)."""
    seen = [
        f"{r.scenario} PSNR {r.psnr:.1f} dB"
        + (" (exact)" if r.psnr >= 100 else "")
        + f", SSIM {r.ssim:.3f}"
        for r in rows
        if r.psnr is not None and r.ssim is not None
    ]
    if not seen:
        return ""
    return (
        f"Leaked train images decrypted with the estimated key, against their plain versions "
        f"(mean over the first {RECONSTRUCTED}; PSNR 100 dB when identical, SSIM 1 at best): "
        + "; ".join(seen)
        + ".\n"
    )


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
    attacks += ["source_matching"]
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
            + (_matching_text(by[name]) if name == "source_matching" else "")
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


def _matching_text(row: Row) -> str:
    b = row.budget
    return (
        f" It pairs {b.get('matched')} of {b.get('leaked_images')} leaked images with their "
        f"source among {b.get('public_images')} public images ({b.get('ambiguous')} "
        f"ambiguous) and solves the key from {b.get('pairs_used')} pairs, in "
        f"{b.get('seconds')} s; it recovers {_percent(row.key_recovered)} of the key."
    )


def _share(top1: float, floor: float, correct: float) -> float:
    """How much of the gap between the wrong keys (or no key) and the correct key a result
    closes: 0 at the floor, 1 at the correct key."""
    return (top1 - floor) / max(correct - floor, 1e-9)


def _judge(share: float) -> bool | None:
    return False if share >= 0.5 else None if share >= 0.1 else True


def verdicts(rows: Sequence[Row], meta: dict) -> list[Verdict]:
    """The verdict per attacker, from the rows: each against the correct key and chance."""
    by = {row.scenario: row for row in rows}
    if "correct_key" not in by:
        return []
    correct = by["correct_key"].top1
    chance = 1 / meta["num_classes"] if meta.get("num_classes") else 0.0
    chance_text = f"chance is {_percent(chance)}" if chance else "chance is the floor"
    floor_row = by.get("wrong_keys") or by.get("no_key")
    floor = floor_row.top1 if floor_row else chance
    out = []
    thief = [by[n] for n in ("no_key", "wrong_keys") if n in by]
    if thief:
        best_wrong = max(r.best_top1 for r in thief)
        lucky = best_wrong - chance > 0.5 * (correct - chance)
        some = (
            f"; the best wrong key reaches {_percent(best_wrong)}: a lucky guess gets part of "
            "the way"
            if lucky
            else ""
        )
        seen = " and ".join(f"{_percent(r.top1)} ({r.scenario})" for r in thief)
        text = f"With no key or a wrong key the model gives {seen}, against "
        text += f"{_percent(correct)} with the key; {chance_text}{some}."
        holds = _judge(_share(max(r.top1 for r in thief), chance, correct))
        out.append(Verdict("A model thief (the model, no key)", holds, text, "model thief"))
    tried = [by[n] for n in ("random_key_search", "heuristic_key_search") if n in by]
    tried += [r for r in rows if r.scenario.startswith("finetune_attack_")]
    if tried:
        strongest = max(tried, key=lambda r: r.top1)
        text = f"The best of these attacks, {strongest.scenario}, reaches "
        text += f"{_percent(strongest.top1)}"
        if strongest.scenario.startswith("finetune_attack_"):
            text += (
                f" by fine-tuning the stolen model on {strongest.budget.get('images')} plain "
                "labelled images: the weights themselves are worth protecting"
            )
        text += f"; the correct key gives {_percent(correct)}."
        holds = _judge(_share(strongest.top1, floor, correct))
        out.append(Verdict("A model thief with a few labelled plain images", holds, text,
                           "thief with plain images"))  # fmt: skip
    if "ciphertext_only" in by:
        row = by["ciphertext_only"]
        text = (
            f"From {row.budget.get('leaked_images')} leaked images and natural-image "
            f"statistics, the estimated key gives {_percent(row.top1)} with only "
            f"{_percent(row.key_recovered)} of the key exact: the estimate finds a key that "
            "is equivalent on these images. The block-wise key does not keep the shards' "
            "images confidential; keep the shards private."
        )
        holds = _judge(_share(row.top1, floor, correct))
        out.append(Verdict("Whoever holds the encrypted shards (a leaked bucket, the training "
                           "cluster) and the model", holds, text, "shard holder"))  # fmt: skip
    pairs = [r for r in rows if r.scenario.startswith("known_plaintext_")]
    if pairs:
        row = min(pairs, key=lambda r: r.budget.get("pairs", 0))
        text = (
            f"{row.budget.get('pairs')} known pair(s) give a key with {_percent(row.top1)}; "
            "that is why encrypted shards name no source file and their order is keyed."
        )
        holds = _judge(_share(row.top1, floor, correct))
        out.append(Verdict("Whoever can pair encrypted samples with their plain source (a "
                           "public dataset)", holds, text, "known plaintext"))  # fmt: skip
    if "source_matching" in by:
        row = by["source_matching"]
        b = row.budget
        text = (
            f"With no names and in any order, {b.get('matched')} of {b.get('leaked_images')} "
            f"leaked images are paired with their public source ({b.get('ambiguous')} "
            f"ambiguous) in {b.get('seconds')} s, and the pairs give a key with "
            f"{_percent(row.top1)}: keyed names and order do not stop it; sealing the shards "
            "with the data key does."
        )
        holds = _judge(_share(row.top1, floor, correct))
        out.append(Verdict("Anyone with the encrypted shards and the public dataset they came "
                           "from", holds, text, "shards + public data"))  # fmt: skip
    if "weight_matching" in by:
        row = by["weight_matching"]
        text = (
            f"Matching the patch embeddings recovers {_percent(row.key_recovered)} of the key "
            f"with no data ({_percent(row.top1)} top-1)."
        )
        holds = _judge(_share(row.top1, floor, correct))
        out.append(Verdict("Whoever holds the weights the model started from", holds, text,
                           "public-weights holder"))  # fmt: skip
    return out


def _label(row: Row) -> str:
    """The scenario's name, with what it used where the name alone does not say."""
    if row.scenario.startswith(("finetune_attack_", "finetune_pretrained_")):
        return f"{row.scenario} ({row.budget.get('images')} images)"
    return row.scenario


def markdown(rows: Sequence[Row], meta: dict) -> str:
    threats: list[tuple[str, str]] = []
    for row in rows:
        base = re.sub(r"_\d+(pct)?$", "", row.scenario)
        if base in THREATS and base not in [t[0] for t in threats]:
            threats.append((base, THREATS[base]))
    said = verdicts(rows, meta)
    parts = [
        "# Robustness report\n",
        *(["## Verdict\n\n" + "".join(f"- {v.line()}\n" for v in said)] if said else []),
        "## The figures\n",
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
        *([reconstruction_line(rows)] if reconstruction_line(rows) else []),
        COLUMNS + "\n",
        "".join(f"- {line}\n" for line in findings(rows)),
    ]
    skipped = meta.get("skipped") or {}
    if skipped:
        parts.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".\n")
    details = [
        f"- {row.scenario}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row.parts.items())
        for row in rows
        if row.parts
    ]
    if details:
        used = {k for row in rows if row.parts for k in row.parts}
        meaning = "\n".join(f"- *{k}*: {PARTS[k]}" for k in PARTS if k in used)
        parts.append("Key recovered, by part:\n\n" + "\n".join(details) + "\n\nThe parts:\n\n"
                     + meaning + "\n")  # fmt: skip
    parts.append("## Threat model\n\n" + "\n".join(f"- {k}: {v}" for k, v in threats) + "\n")
    parts.append(
        "## Figures\n\n![accuracy](accuracy.png)\n\n![wrong keys](wrong_keys.png)\n\n"
        "![samples](samples.png)\n"
        + ("\n![reconstruction](reconstruction.png)\n" if reconstruction_line(rows) else "")
    )
    return "\n".join(parts)


LEGITIMATE = ("correct_key", "baseline")  # the references, not attacks
NO_ATTACK = ("no_key", "wrong_keys")  # the model alone: what the key has to hold against


def row_kind(scenario: str) -> str:
    if scenario in LEGITIMATE:
        return "reference (with the key, or no protection)"
    if scenario in NO_ATTACK:
        return "no key / wrong keys"
    return "attack"


KIND_COLOURS = {"reference (with the key, or no protection)": "tab:green",
                "no key / wrong keys": "tab:grey", "attack": "tab:red"}  # fmt: skip


def accuracy_chart(rows: Sequence[Row], path: Path, *, chance: float | None = None) -> Any:
    """A bar per scenario, coloured by kind (references, no key, attacks, with a gap between
    the groups); the correct key's accuracy and chance as vertical reference lines. Returns
    the figure's axes (closed figure), for tests to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(rows, key=lambda r: list(KIND_COLOURS).index(row_kind(r.scenario)))
    names, values, colours, ys, y = [], [], [], [], 0.0
    previous = None
    for row in order:
        kind = row_kind(row.scenario)
        if previous is not None and kind != previous:
            y += 0.6  # set the groups apart
        names.append(_label(row))
        values.append(100 * row.top1)
        colours.append(KIND_COLOURS[kind])
        ys.append(y)
        y, previous = y + 1, kind
    ys = [y - 1 - v for v in ys]  # first row on top
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(rows) + 1.6))
    bars = ax.barh(ys, values, color=colours)
    ax.set_yticks(ys, names, fontsize=8)
    correct = next((r.top1 for r in rows if r.scenario == "correct_key"), None)
    if correct is not None:
        ax.axvline(100 * correct, color="tab:green", linestyle="--", linewidth=1,
                   label=f"correct key {100 * correct:.1f}%")  # fmt: skip
    if chance is not None:
        ax.axvline(100 * chance, color="black", linestyle=":", linewidth=1,
                   label=f"chance {100 * chance:.1f}%")  # fmt: skip
    for kind, colour in KIND_COLOURS.items():
        if any(row_kind(r.scenario) == kind for r in rows):
            ax.barh([], [], color=colour, label=kind)
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            bar.get_width() + 1,
            bar.get_y() + bar.get_height() / 2,
            f"{value:.1f}%",
            va="center",
            fontsize=8,
        )
    for row, yy in zip(order, ys, strict=True):
        if row.spread is not None:
            ax.plot(100 * row.spread.max, yy, "k|", markersize=12, label="wrong keys: the best")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 110)
    ax.set_xlabel("top-1 accuracy on held-out val (%)")
    fig.tight_layout()
    _save(fig, path)
    return ax


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


def sample_grid(columns: dict[str, np.ndarray], path: Path, *, perm: int = 0o644) -> None:
    """One row per image, one column per named NHWC uint8 array."""
    names = list(columns)
    n = len(next(iter(columns.values())))
    rows = [[columns[name][i] for name in names] for i in range(n)]
    save_image_grid(rows, path, col_titles=names, cell_inches=1.6, perm=perm)


def write_report(out: Path, rows: Sequence[Row], meta: dict) -> str:
    """Write results.json and report.md (atomically); returns the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    atomic_write(out / "report.md", markdown(rows, meta))
    return table(rows)


def page_block(rows: Sequence[Row]) -> str:
    """The body of a results page's ``attacks-report`` block: the table and what it shows."""
    quality = reconstruction_line(rows)
    return (
        f"{table(rows)}\n"
        + (f"{quality}\n" if quality else "")
        + "".join(f"- {line}\n" for line in findings(rows))
    )
