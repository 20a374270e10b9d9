"""The streaming loader, measured against baselines in the same run.

    python bench/bench_loader.py --out bench/results.json

1. Images/s of the loader (2 workers, batch 64) over encrypted raw shards of --images JPEGs of
   about 500x375 stored at 224x224, against webdataset over JPEG shards of the same images,
   decoded with PIL (same resize and crop) and encrypted on the fly, also 2 workers.
2. On the embedded digits: training step time with the real loader, against the same steps
   on batches already in memory (the loader's overhead as a fraction).
3. Peak memory (PSS of the main process + 2 workers) reading the digits split into more and
   more shards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from pipeline import Key, encrypt  # noqa: E402
from pipeline.offline.build import ShardConfig, build_shards  # noqa: E402
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_make_shards import make_source  # noqa: E402
from results import merge_results  # noqa: E402


def steady_img_s(batches) -> float:
    """Images/s from the first batch on (worker start-up excluded, as in a long epoch)."""
    start, count = None, 0
    for images, *_ in batches:
        if start is None:
            start = time.perf_counter()
            continue
        count += len(images)
    return count / (time.perf_counter() - start)


def loader_img_s(shards: str, epochs: int, data_key=None) -> float:
    dataset = ShardDataset(shards, "train", config=LoaderConfig(batch_size=64, num_workers=2),
                           data_key=data_key)  # fmt: skip

    def batches():
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            yield from make_loader(dataset)

    return steady_img_s(batches())


def write_jpeg_shards(src: Path, out: Path) -> list[str]:
    import webdataset as wds

    from pipeline.offline.sources import find_classes, list_split

    out.mkdir(parents=True, exist_ok=True)
    items = list_split(src, "train", find_classes(src, "train"))
    with wds.ShardWriter(str(out / "jpeg-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, item in enumerate(items):
            sink.write({"__key__": f"{i:08d}", "jpg": (src / item.path).read_bytes(),
                        "cls": str(item.label)})  # fmt: skip
    return sorted(str(p) for p in out.glob("jpeg-*.tar"))


class _DecodeEncrypt:
    def __init__(self, key: Key, size: int) -> None:
        self.key, self.size = key, size

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        from pipeline.offline.decode import decode_pil

        image = encrypt(decode_pil(sample["jpg"], self.size), self.key)
        return torch.from_numpy(image), int(sample["cls"])


def jpeg_loader_img_s(urls: list[str], key: Key, size: int, epochs: int) -> float:
    import webdataset as wds

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        .shuffle(1000)
        .map(_DecodeEncrypt(key, size))
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)

    def batches():
        for _ in range(epochs):
            yield from loader

    return steady_img_s(batches())


def step_overhead(shards: str, steps: int) -> float:
    from pipeline.model.factory import create_model

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", num_classes=10).to(
        memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    cpu = torch.device("cpu")

    def step(images, labels) -> None:
        loss = loss_fn(model(to_model_input(images, cpu)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    dataset = ShardDataset(shards, "train", config=LoaderConfig(batch_size=64, num_workers=2))
    warmup, batches, start = 3, [], 0.0
    for i, (images, labels, _) in enumerate(make_loader(dataset)):  # workers start, then time
        if i == warmup:
            start = time.perf_counter()
        step(images, labels)
        batches.append((images, labels))
        if i + 1 >= warmup + steps:
            break
    with_loader = time.perf_counter() - start
    start = time.perf_counter()
    for images, labels in batches[warmup:]:
        step(images, labels)
    in_memory = time.perf_counter() - start
    return (with_loader - in_memory) / in_memory


RSS_SCRIPT = """
import os, sys
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader

def pss_mb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0

def children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(c) for c in f.read().split()]
    return kids

ds = ShardDataset(sys.argv[1], "train", config=LoaderConfig(batch_size=64, num_workers=2))
peak = 0.0
for epoch in range(2):
    ds.set_epoch(epoch)
    for batch in make_loader(ds):
        me = os.getpid()
        peak = max(peak, pss_mb(me) + sum(pss_mb(c) for c in children(me)))
print(peak)
"""


def peak_rss_mb(shards: str) -> float:
    """Peak proportional set size (PSS: shared pages split between the processes) of the main
    process and its 2 workers, in MB, sampled at every batch in a fresh process."""
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, shards], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30, help="training steps for the overhead")
    p.add_argument("--shard-sizes", default="500,50,10", help="digits shard sizes for the RSS")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (medians)")
    p.add_argument("--out", default="bench/results.json")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    key = Key.generate()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = Path(tmp)
        src = make_source(work / "src", args.images)
        config = ShardConfig(src=str(src), out=str(work / "raw"), size=args.size,
                             decoder="pil", splits=("train",), shard_size="100")  # fmt: skip
        build_shards(config, key)
        urls = write_jpeg_shards(src, work / "jpeg")
        raws, jpegs = [], []
        for _ in range(args.repeats):  # alternate, then take medians: this machine is noisy
            raws.append(loader_img_s(str(work / "raw"), epochs=4))
            jpegs.append(jpeg_loader_img_s(urls, key, args.size, epochs=1))
        raw, jpeg = statistics.median(raws), statistics.median(jpegs)
        results["loader_img_s"] = round(raw, 1)
        results["jpeg_loader_img_s"] = round(jpeg, 1)
        results["loader_vs_jpeg_ratio"] = round(raw / jpeg, 2)

        from pipeline.offline.digits import write_digits_tree

        digits = write_digits_tree(work / "digits", size=64)
        rss = {}
        for size in args.shard_sizes.split(","):
            out = work / f"digits-{size}"
            build_shards(ShardConfig(src=str(digits), out=str(out), size=64, decoder="pil",
                                     shard_size=size), key)  # fmt: skip
            shards = len(list(out.glob("train-*.tar")))
            rss[shards] = round(peak_rss_mb(str(out)), 1)
            if size == args.shard_sizes.split(",")[0]:
                overheads = [step_overhead(str(out), args.steps) for _ in range(args.repeats)]
                results["loader_step_overhead"] = round(statistics.median(overheads), 3)
        results["loader_peak_rss_mb"] = max(rss.values())
        results["loader_rss_mb_by_shard_count"] = rss
    note = (
        f"{args.images} JPEGs ~500x375 at {args.size}px, 2 workers, batch 64, {os.cpu_count()} "
        f"cores; step overhead on the digits (64px, EfficientNet-Lite0, {args.steps} steps)"
    )
    out = merge_results(args.out, results, note_key="loader_bench", note=note)
    print(
        f"loader {results['loader_img_s']:.0f} img/s = {results['loader_vs_jpeg_ratio']:.1f}x "
        f"JPEG+PIL+encrypt ({results['jpeg_loader_img_s']:.0f} img/s); step overhead "
        f"{100 * results['loader_step_overhead']:.1f}%; peak RSS "
        f"{results['loader_peak_rss_mb']:.0f} MB; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
