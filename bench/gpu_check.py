"""The CUDA paths, checked in one short run on a machine with a GPU (CI has none).

    python bench/gpu_check.py --out gpu_results.json

1. The torch encryption path on CUDA equals the numpy result, with no device-to-host sync
   (``torch.cuda.set_sync_debug_mode("error")``), and its speed against a CUDA copy.
2. A 1-GPU ``torchrun train/ddp.py`` on the embedded digit shards (made here with the PIL
   decoder if --data is not given) with bf16 autocast and channels_last: it runs and learns.
3. Loader images/s and training step time on the GPU, from that run.

Needs neither DALI nor network. ``--allow-cpu`` runs the same steps on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def check_encryption(device: torch.device, batch: int) -> dict:
    from pipeline import Key, decrypt, encrypt

    key = Key.generate()
    images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    x = torch.from_numpy(images).to(device)
    decrypt(encrypt(x, key), key)  # uploads the cached index tensors
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        enc = encrypt(x, key)
        dec = decrypt(enc, key)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    equal = bool(np.array_equal(enc.cpu().numpy(), encrypt(images, key)))
    exact = bool(torch.equal(dec, x))

    def timed(fn, repeats: int = 20) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    t_enc, t_copy = timed(lambda: encrypt(x, key)), timed(lambda: x.clone())
    return {
        "encrypt_equals_numpy": equal,
        "decrypt_exact": exact,
        "no_host_sync": True,  # set_sync_debug_mode("error") raised nothing
        f"encrypt_{device.type}_img_s": round(batch / t_enc, 1),
        f"encrypt_{device.type}_vs_copy_ratio": round(t_enc / t_copy, 2),
    }


def make_shards(work: Path) -> Path:
    key, out = work / "k.bin", work / "shards"
    run = lambda *a: subprocess.run([sys.executable, *a], check=True, cwd=ROOT)  # noqa: E731
    run("tools/make_key.py", str(key))
    run("tools/make_shards.py", "--key", str(key), "--out", str(out), "--decoder", "pil")
    return out


def check_training(data: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train" / "ddp.py"), "--data", str(data), "--out", str(out),
           "--epochs", str(epochs), *extra]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"train_ok": False, "train_error": done.stderr[-2000:]}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    epochs_seen = [json.loads(line) for line in lines]
    last = epochs_seen[-1]
    steps = sum(e["steps_per_rank"] for e in epochs_seen)
    return {
        "train_ok": True,
        "train_wall_s": round(time.perf_counter() - started, 1),
        "train_val_top1": last["val_top1"],
        "train_learns": last["val_top1"] > 0.8
        and last["train_loss"] < epochs_seen[0]["train_loss"],
        "train_step_s": round(last["seconds"] / steps, 4),
    }


def check_loader(data: Path, device: torch.device, batches: int = 50) -> dict:
    from pipeline.loader import LoaderConfig, ShardDataset, make_loader, to_model_input

    dataset = ShardDataset(str(data), "train", config=LoaderConfig(batch_size=256, num_workers=2))
    count, start = 0, time.perf_counter()
    for i, (images, _, _) in enumerate(make_loader(dataset, pin_memory=device.type == "cuda")):
        to_model_input(images, device)
        count += len(images)
        if i + 1 >= batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"loader_to_device_img_s": round(count / (time.perf_counter() - start), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="encrypted shards with train/val (default: digits, made here)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256, help="images per encryption batch")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="passed to train/ddp.py")
    p.add_argument("--pretrained", default="package", help="passed to train/ddp.py")
    p.add_argument("--out", default="gpu_results.json")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing checked (use --allow-cpu for a smoke run)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
    }
    results.update(check_encryption(device, args.batch))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_shards(Path(tmp))
        extra = ["--model", args.model, "--pretrained", args.pretrained]
        results.update(check_training(data, Path(tmp) / "run", args.epochs, extra))
        results.update(check_loader(data, device))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for name, value in results.items():
        print(f"{name:<32} {value}")
    ok = (
        results["encrypt_equals_numpy"] and results["decrypt_exact"] and results.get("train_learns")
    )
    print(f"gpu_check: {'OK' if ok else 'FAILED'} on {results['device']}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
