"""The frontier's outputs: frontier.json, frontier.md (a table), frontier.png, the README block.

``frontier.json`` is ``{"meta", "points", "models"}``: one point per (block size, leaked
blocks) with, when measured, each key part's median, range and per-key values over the fresh
keys, and the seconds per estimate; a point that is not measured carries the reason instead.
Its records are typed in ``attacks.frontier.record``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attacks.frontier.record import Frontier, FrontierPoint, ModelPoint, Summary
from pipeline.atomic import atomic_open, atomic_write

PAGE_BLOCK = "frontier-report"  # the block of a results page this report replaces

COLUMNS = {
    "permutation": "permutation",
    "np_mask": "NP mask",
    "ffx_mask": "FFX mask",
    "ffx_table": "FFX table",
    "byte_maps": "byte maps",
    "key_recovered": "key recovered",
}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    lo, mid, hi = summary["min"], summary["median"], summary["max"]
    if _pct(lo) == _pct(hi):
        return _pct(mid)
    return f"{_pct(mid)} ({_pct(lo)}-{_pct(hi)})"


def _blocks(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _seconds(point: FrontierPoint) -> str:
    s = point.seconds
    if s is None:
        return "-"
    return (
        f"{s['median']:.0f}"
        if s["min"] == s["max"]
        else (f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})")
    )


def _quality(summary: Summary | None, digits: int) -> str:
    if summary is None:
        return "-"
    lo, mid, hi = summary["min"], summary["median"], summary["max"]
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def table(points: Sequence[FrontierPoint]) -> str:
    quality = any(p.psnr is not None for p in points)
    extra = ["PSNR dB", "SSIM"] if quality else []
    lines = [
        "| M | leaked blocks | keys | " + " | ".join([*COLUMNS.values(), *extra])
        + " | s per estimate |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + len(extra)) + "---|",
    ]  # fmt: skip
    for p in points:
        head = f"| {p.block_size} | {_blocks(p.leaked_blocks or p.budget_blocks)} | "
        if not p.measured or p.parts is None:
            text = f"**not measured**: {p.reason}"
            lines.append(
                head + f"{p.keys} | {text} |" + " |" * (len(COLUMNS) + len(extra) - 1)
                + f" {_seconds(p)} |"
            )  # fmt: skip
            continue
        cells = [_cell(p.parts.get(part)) for part in COLUMNS]
        if quality:
            cells += [_quality(p.psnr, 1), _quality(p.ssim, 2)]
        lines.append(head + f"{p.keys} | " + " | ".join(cells) + f" | {_seconds(p)} |")
    return "\n".join(lines) + "\n"


def model_table(models: Sequence[ModelPoint]) -> str:
    if not models:
        return ""
    lines = [
        "| model | M | leaked blocks | top-1 with the estimated key | correct key | "
        "key recovered |",
        "|---|---|---|---|---|---|",
    ]
    for r in models:
        head = f"| `{r.checkpoint}` | {r.block_size} | {_blocks(r.budget_blocks)} | "
        if not r.measured or r.top1_estimated_key is None or r.key_recovered is None:
            lines.append(head + f"**not measured**: {r.reason} | {_pct(r.top1_correct_key)} | - |")
        else:
            lines.append(
                head + f"{100 * r.top1_estimated_key:.1f}% | "
                f"{100 * r.top1_correct_key:.1f}% | {_pct(r.key_recovered)} |"
            )
    return "\n".join(lines) + "\n"


def point_line(point: FrontierPoint) -> str:
    """One point in one line (for the log): never a key byte, only fractions recovered."""
    where = f"M={point.block_size} {_blocks(point.leaked_blocks or point.budget_blocks)}"
    if not point.measured or point.parts is None:
        return f"{where} blocks: not measured ({point.reason})"
    parts = ", ".join(f"{COLUMNS[k]} {_cell(v)}" for k, v in point.parts.items())
    return f"{where} blocks, {point.keys} keys: {parts}; {_seconds(point)} s per estimate"


def _resumed(meta: dict) -> str:
    """The time of a resumed run leaves out the points it took from the earlier one: say so."""
    n = meta.get("resumed_points", 0)
    return f" (and {n} point(s) from an earlier run it resumed)" if n else ""


def summary(result: Frontier) -> str:
    points = result.points
    measured = [p for p in points if p.measured]
    took = f"{result.meta['seconds']:.0f} s{_resumed(result.meta)}"
    text = f"{len(measured)} of {len(points)} points measured in {took}"

    def leaked(p: FrontierPoint) -> int:  # a measured point always used some blocks
        return -1 if p.leaked_blocks is None else p.leaked_blocks

    best: dict[int, FrontierPoint] = {}
    for p in measured:  # the most leaked data measured per block size
        if p.block_size not in best or leaked(p) >= leaked(best[p.block_size]):
            best[p.block_size] = p
    for m, p in sorted(best.items()):
        parts = p.parts or {}
        text += f"; M={m} at {leaked(p):,} blocks: key recovered {_cell(parts['key_recovered'])}"
        text += f", permutation {_cell(parts['permutation'])}" if "permutation" in parts else ""
    return text


def notes(result: Frontier) -> str:
    meta = result.meta
    return (
        f"Data: {meta['data']}. Transforms {'+'.join(meta['transforms'])}; {meta['keys']} fresh "
        f"key(s) per point (median, and the range over keys in brackets); at most "
        f"{meta['time_budget_s']:g} s per estimate. The attacker's statistics never come from "
        "the leaked images. The candidates that image statistics cannot tell apart (block "
        "symmetries, each also negated) are resolved in the attacker's favour. A point marked "
        "not measured ran out of time or data: it says nothing about the key."
        + (
            " PSNR (dB) and SSIM compare the first leaked images, decrypted with each estimated "
            "key, with their plain versions pixel by pixel: wrong byte maps shift colours and "
            "levels, so PSNR stays low where the shapes are already recognisable; "
            "reconstruction_M*.png (plain | encrypted | estimated key) shows what a viewer sees."
            if any(p.psnr is not None for p in result.points)
            else ""
        )
        + "\n"
    )


def markdown(result: Frontier) -> str:
    parts = [
        "# Security frontier: what the ciphertext-only estimate recovers\n",
        notes(result),
        table(result.points),
    ]
    if result.models:
        parts += [
            "## Protected models, with their key estimated the same way\n",
            model_table(result.models),
        ]
    parts.append("![frontier](frontier.png)\n")
    return "\n".join(parts)


def chart(points: Sequence[FrontierPoint], path: Path) -> None:
    """One panel per key part; in each, recovery against leaked blocks (log x), one line per
    block size, the range over keys shaded. Points not measured are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in COLUMNS if any(p in (q.parts or {}) for q in points)]
    fig, axes = plt.subplots(
        1, max(1, len(parts)), figsize=(2.6 * max(1, len(parts)), 2.8), sharey=True, squeeze=False
    )
    for ax, part in zip(axes[0], parts, strict=False):
        for m in sorted({p.block_size for p in points}):
            rows = [(p.leaked_blocks, p.parts) for p in points
                    if p.block_size == m and p.measured and p.parts is not None]  # fmt: skip
            if not rows:
                continue
            x = [leaked for leaked, _ in rows]
            med = [100 * parts[part]["median"] for _, parts in rows]
            lo = [100 * parts[part]["min"] for _, parts in rows]
            hi = [100 * parts[part]["max"] for _, parts in rows]
            (line,) = ax.plot(x, med, "o-", label=f"M={m}", markersize=4)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(COLUMNS[part], fontsize=9)
        ax.set_xlabel("leaked blocks", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("recovered (%)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def reconstruction_grid(
    plain: np.ndarray, cipher: np.ndarray, seen: np.ndarray, point: FrontierPoint, path: Path
) -> None:
    """plain | encrypted | decrypted with the estimated key, a column each, for the first
    fresh key of ``point`` (frontier keys, never an owner's)."""
    from pipeline.viz import save_image_grid

    n = min(4, len(plain))
    psnr = point.psnr["all"][0] if point.psnr else float("nan")
    ssim = point.ssim["all"][0] if point.ssim else float("nan")
    save_image_grid(
        [[plain[i], cipher[i], seen[i]] for i in range(n)],
        path,
        col_titles=["plain", "encrypted (fresh key)", "estimated key"],
        title=f"M={point.block_size}, {point.leaked_blocks:,} leaked blocks: "
        f"PSNR {psnr:.1f} dB, SSIM {ssim:.2f}",
    )


def write_frontier(out: Path, result: Frontier) -> str:
    """frontier.json, frontier.md and frontier.png under ``out`` (atomically); the table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "frontier.json", json.dumps(result.to_json(), indent=1) + "\n")
    chart(result.points, out / "frontier.png")
    atomic_write(out / "frontier.md", markdown(result))
    return table(result.points) + model_table(result.models)


def page_block(result: Frontier) -> str:
    """The body of a results page's ``frontier-report`` block: notes, the table and the models'
    rows, and how long the run took."""
    models = model_table(result.models)
    return (
        f"Measured in {result.meta['seconds'] / 60:.0f} min{_resumed(result.meta)}.\n\n"
        f"{notes(result)}\n{table(result.points)}" + (f"\n{models}" if models else "")
    )
