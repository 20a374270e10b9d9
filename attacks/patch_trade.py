"""The patch-aligned trade, measured on the embedded digits: exact accuracy, and what it costs.

    python -m attacks.patch_trade --out runs/patch-trade   # 10-15 minutes on 2 busy CPU cores

Every step is one of the project's own commands, run as a user runs it (a rerun with the same
--out reuses the key, the shards and a finished plain run):

1. a key with block size P = the ViT's patch size (shuffle+np: FFX cannot be absorbed), and the
   embedded digits as plain and as encrypted shards at 32x32;
2. a small ViT (timm's ``vit_tiny_patch16_224`` shrunk with --model-kwargs) trained from
   scratch on the plain shards. No ViT weights ship inside a Python package, so this plain
   model stands in for the public pre-trained weights;
3. the key absorbed into its patch embedding (``tools/absorb_key.py``): protected, untrained;
4. that model fine-tuned briefly on the encrypted shards (``train/ddp.py --init absorb``);
5. the audit (``python -m attacks``) of both: the correct key, plain images, wrong keys, the
   ciphertext-only estimate at block size P, and weight matching against the plain model; and,
   as the control, weight matching against an unrelated start (another random initialisation).

Writes OUT/patch_trade.json (every row and the commands) and OUT/patch_trade.md (the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import cli
from pipeline.atomic import atomic_write
from pipeline.errors import KeyprotectError
from pipeline.model.factory import create_model, parse_model_kwargs

logger = logging.getLogger("attacks.patch_trade")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = "correct_key,no_key,wrong_keys,ciphertext_only,weight_matching"


class StepError(KeyprotectError, RuntimeError):
    """A step's command failed; the message holds the command, its log and the log's last
    line."""


def run(args: list[str], log: Path) -> float:
    """``python ARGS`` from the repository root, its output to ``log``; the seconds it took."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    logger.info("patch_trade: python %s", shlex.join(args))
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "(no output)"
        raise StepError(
            f"`python {shlex.join(args)}` failed ({done.returncode}); its log is {log}, "
            f"ending: {last}"
        )
    return time.perf_counter() - started


def audit_rows(folder: Path) -> dict[str, dict]:
    return {row["scenario"]: row for row in json.loads((folder / "results.json").read_text())}


@dataclass(frozen=True)
class _Work:
    """The run's files: the key, the two shard folders, and the command that trains."""

    out: Path
    key: Path
    plain: Path
    enc: Path
    kwargs: str
    train: tuple[str, ...]


def measure(config: argparse.Namespace) -> dict:
    """Every step of the trade, each a real command line; the results and their times."""
    # the steps run in the repository root: a relative --out given there stays relative (the
    # runs' config.json and checkpoints record it as given); from elsewhere it must be absolute
    out = Path(config.out)
    if not out.is_absolute() and Path.cwd().resolve() != ROOT:
        out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = config.patch
    kwargs = f"img_size={config.size},patch_size={p},{config.model_kwargs}"
    work = _Work(out=out, key=out / f"k{p}.bin", plain=out / "shards-plain",
                 enc=out / f"shards-k{p}", kwargs=kwargs,
                 train=("train/ddp.py", "--model", config.model, "--model-kwargs", kwargs,
                        "--pretrained", "none", "--batch-size", "32", "--workers", "1",
                        "--weight-decay", "0.05"))  # fmt: skip
    seconds: dict[str, float] = {}
    _make_data(config, work, seconds)
    plain_ckpt = _train_plain(config, work, seconds)
    absorbed, tuned_run = _absorb_and_finetune(config, work, plain_ckpt, seconds)
    rows = _audit(config, work, plain_ckpt, absorbed, tuned_run, seconds)
    tuned_lines = (tuned_run / "metrics.jsonl").read_text().splitlines()
    return {
        "model": config.model, "model_kwargs": kwargs, "patch_size": p, "block_size": p,
        "transforms": config.transforms, "image_size": config.size,
        "plain_epochs": config.epochs, "finetune_epochs": config.finetune_epochs,
        "finetune_val_top1": [json.loads(line)["val_top1"] for line in tuned_lines],
        "rows": rows, "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }  # fmt: skip


def _make_data(config: argparse.Namespace, work: _Work, seconds: dict[str, float]) -> None:
    """The key (once) and the digits as plain and as encrypted shards."""
    if not work.key.exists():
        seconds["key"] = run(["tools/make_key.py", str(work.key), "--block-size",
                              str(config.patch), "--transforms", config.transforms],
                             work.out / "key.log")  # fmt: skip
    size = str(config.size)
    seconds["shards"] = run(
        ["tools/make_shards.py", "--plain", "--size", size, "--out", str(work.plain)],
        work.out / "shards-plain.log",
    )
    seconds["shards"] += run(
        ["tools/make_shards.py", "--key", str(work.key), "--size", size, "--out", str(work.enc)],
        work.out / "shards-enc.log",
    )


def _train_plain(config: argparse.Namespace, work: _Work, seconds: dict[str, float]) -> Path:
    """The plain model, from scratch (the stand-in for public weights); a stopped one resumes."""
    plain_run = work.out / "plain"
    if not (plain_run / "summary.json").exists():
        resume = ["--resume"] if (plain_run / "checkpoint.pt").exists() else []
        seconds["train_plain"] = run([*work.train, "--data", str(work.plain), "--out",
                                      str(plain_run), "--epochs", str(config.epochs), "--lr",
                                      str(config.lr), "--warmup-epochs", "0.5", *resume],
                                     work.out / "plain.log")  # fmt: skip
    return plain_run / "checkpoint.pt"


def _absorb_and_finetune(
    config: argparse.Namespace, work: _Work, plain_ckpt: Path, seconds: dict[str, float]
) -> tuple[Path, Path]:
    """The key absorbed into the plain model (no training), and the same fine-tuned on the
    encrypted shards (started over each time)."""
    absorbed = work.out / "absorbed.pt"
    seconds["absorb"] = run(["tools/absorb_key.py", "--checkpoint", str(plain_ckpt), "--key",
                             str(work.key), "--out", str(absorbed), "--force"],
                            work.out / "absorb.log")  # fmt: skip
    tuned_run = work.out / "finetuned"
    seconds["finetune"] = run([*work.train, "--data", str(work.enc), "--out", str(tuned_run),
                               "--epochs", str(config.finetune_epochs), "--lr",
                               str(config.finetune_lr), "--warmup-epochs", "0.2", "--init",
                               "absorb", "--init-checkpoint", str(plain_ckpt), "--key",
                               str(work.key), "--overwrite"],
                              work.out / "finetune.log")  # fmt: skip
    return absorbed, tuned_run


def _audit(
    config: argparse.Namespace,
    work: _Work,
    plain_ckpt: Path,
    absorbed: Path,
    tuned_run: Path,
    seconds: dict[str, float],
) -> dict:
    """Both protected models audited, and the control: weight matching against a reference
    that does not share the start (another random initialisation)."""
    audit = ["-m", "attacks", "--key", str(work.key), "--data", str(work.enc), "--reference",
             str(plain_ckpt), "--baseline", str(plain_ckpt), "--wrong-keys",
             str(config.wrong_keys), "--device", "cpu", "--scenarios", SCENARIOS]  # fmt: skip
    rows = {}
    for name, checkpoint in (("absorbed", absorbed), ("finetuned", tuned_run / "checkpoint.pt")):
        folder = work.out / f"audit-{name}"
        seconds[f"audit_{name}"] = run([*audit, "--checkpoint", str(checkpoint), "--out",
                                        str(folder)], work.out / f"audit-{name}.log")  # fmt: skip
        rows[name] = audit_rows(folder)
    torch.manual_seed(12345)
    unrelated = create_model(config.model, num_classes=10, pretrained="none",
                             model_kwargs=parse_model_kwargs(work.kwargs))  # fmt: skip
    torch.save(unrelated.state_dict(), work.out / "unrelated.pth")
    folder = work.out / "audit-unrelated"
    seconds["audit_unrelated"] = run(
        ["-m", "attacks", "--key", str(work.key), "--data", str(work.enc), "--reference",
         str(work.out / "unrelated.pth"), "--device", "cpu", "--scenarios", "weight_matching",
         "--checkpoint", str(tuned_run / "checkpoint.pt"), "--out", str(folder)],
        work.out / "audit-unrelated.log",
    )  # fmt: skip
    rows["unrelated_reference"] = audit_rows(folder)
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(result: dict) -> str:
    p = result["patch_size"]
    lines = [
        f"| ViT-tiny shrunk ({result['model_kwargs']}), key M = P = {p}, "
        f"{result['transforms'].replace(',', '+')} | correct key | plain images (no key) | "
        "wrong keys: mean (95% CI; 95% of keys) | weight matching: top-1, key recovered | "
        f"ciphertext-only at M = {p}: top-1, key recovered |",
        "|---|---|---|---|---|---|",
    ]
    first = result["rows"]["absorbed"]
    lines.append(f"| plain model (the stand-in for public weights), plain images | "
                 f"{_pct(first['baseline']['top1'])} | - | - | - | - |")  # fmt: skip
    labels = {"absorbed": "key absorbed, no training",
              "finetuned": f"key absorbed, then fine-tuned {result['finetune_epochs']} epochs "
                           "on encrypted shards"}  # fmt: skip
    for name, label in labels.items():
        r = result["rows"][name]
        w = r["wrong_keys"]
        (lo, hi), (a, b) = w["top1_ci95"], w["top1_central95"]
        wm, co = r["weight_matching"], r["ciphertext_only"]
        lines.append(
            f"| {label} | {_pct(r['correct_key']['top1'])} | {_pct(r['no_key']['top1'])} | "
            f"{_pct(w['top1'])} ({_pct(lo)}-{_pct(hi)}; {_pct(a)}-{_pct(b)}; "
            f"{w['budget']['keys']} keys) | {_pct(wm['top1'])}, {_pct(wm['key_recovered'])} | "
            f"{_pct(co['top1'])}, {_pct(co['key_recovered'])} |"
        )
    control = result["rows"]["unrelated_reference"]["weight_matching"]
    seconds = result["seconds"]
    lines += [
        "",
        f"Control: weight matching of the fine-tuned model against an unrelated start (another "
        f"random initialisation) gives {_pct(control['top1'])} top-1 and "
        f"{_pct(control['key_recovered'])} of the key.",
        "",
        f"Times (s): {', '.join(f'{k} {v:g}' for k, v in seconds.items())}.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = cli.build_parser(__doc__, prog="python -m attacks.patch_trade")
    p.add_argument("--out", default="runs/patch-trade", help="work and result folder")
    p.add_argument(
        "--model", default="vit_tiny_patch16_224", help="timm model with a patch embedding"
    )
    p.add_argument("--patch", type=int, default=8, help="patch size = the key's block size")
    p.add_argument("--size", type=int, default=32, help="stored image size (a multiple of P)")
    p.add_argument(
        "--model-kwargs",
        default="depth=2,embed_dim=96,num_heads=3,mlp_ratio=2,class_token=false,global_pool=avg",
        help="more timm arguments (img_size and patch_size come from --size and --patch)",
    )
    p.add_argument(
        "--transforms",
        default="shuffle,np",
        help="the key's transforms, comma-separated (no ffx: it cannot be absorbed)",
    )
    p.add_argument("--epochs", type=int, default=6, help="plain training, from scratch")
    p.add_argument("--lr", type=float, default=3e-3, help="plain training learning rate")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning the absorbed model")
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--wrong-keys", type=int, default=100, help="random wrong keys tried per model")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.size % a.patch:
        p.error(f"--size {a.size} must be a multiple of --patch {a.patch}")
    return a


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    config = parse_args(argv)
    return cli.run("patch_trade", lambda: trade(config), log=logger)


def trade(config: argparse.Namespace) -> None:
    """Measure, write patch_trade.json and .md, print the table and a summary line."""
    started = time.perf_counter()
    result = measure(config)
    out = Path(config.out)
    atomic_write(out / "patch_trade.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    atomic_write(out / "patch_trade.md", table)
    print(table, end="", flush=True)
    rows = result["rows"]
    logger.info(
        "patch_trade: %.0f s; correct key %s absorbed, %s fine-tuned; weight matching "
        "recovers %s and %s of the key; wrote %s",
        time.perf_counter() - started, _pct(rows["absorbed"]["correct_key"]["top1"]),
        _pct(rows["finetuned"]["correct_key"]["top1"]),
        _pct(rows["absorbed"]["weight_matching"]["key_recovered"]),
        _pct(rows["finetuned"]["weight_matching"]["key_recovered"]), out / "patch_trade.md",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
