"""Shared fixtures: fixed keys, real images, and a CPU-friendly hypothesis profile."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import settings

from pipeline import TRANSFORMS, Key

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Every ordered, non-empty combination of the three transforms (15 of them).
ALL_ORDERS = [
    order for r in range(1, len(TRANSFORMS) + 1) for order in itertools.permutations(TRANSFORMS, r)
]

FIXED_SECRET = bytes(range(32))


@pytest.fixture
def fixed_key() -> Key:
    return Key(FIXED_SECRET, block_size=4, transforms=TRANSFORMS)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo: scikit-learn's china.jpg, cropped to 424 x 640 (divisible by 4 and 8)."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[0][:424, :640])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_jpeg_tree(root, *, classes=3, train=8, val=3, size=(160, 120), seed=0):
    """A small ImageNet-style tree of distinct JPEGs cut from scikit-learn's two photos."""
    from pathlib import Path

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo = photos[(c + i) % len(photos)]
                w, h = size
                top_scale = min(2.0, (photo.shape[0] - 1) / size[1], (photo.shape[1] - 1) / size[0])
                scale = rng.uniform(0.5 * top_scale, top_scale)
                cw, ch = int(w * scale), int(h * scale)
                top = rng.integers(0, photo.shape[0] - ch)
                left = rng.integers(0, photo.shape[1] - cw)
                crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size)
                crop.save(folder / f"img_{c}_{i:03d}.JPEG", quality=90)
    return root


def sources_by_key(src, out, key, split: str) -> dict[str, str]:
    """Sample key -> source path under ``src``, from the owner's source map (encrypted shards
    name no source)."""
    from pipeline.offline.sourcemap import source_map_rows

    rows = source_map_rows(src=str(src), out=str(out), key=key, splits=(split,))
    return {r[1]: r[4] for r in rows if r[5] is None}


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory):
    return write_jpeg_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on loopback: moto_server in its own process, never real AWS."""
    from pipeline.testing import LoopbackS3

    with LoopbackS3() as server:
        yield server.url


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point every AWS client (ours and subprocesses') at the loopback server, with fake keys."""
    import boto3

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{os.urandom(4).hex()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    """Digits at 32x32, encrypted with the fixed test key, 6 train and 2 val shards."""
    from tests.train.conftest import make_digit_shards

    out = tmp_path_factory.mktemp("digits") / "shards"
    return make_digit_shards(out, Key(FIXED_SECRET), shard_size="250")


@pytest.fixture(scope="session")
def test_key_file(tmp_path_factory):
    from pipeline import save_key

    return save_key(Key(FIXED_SECRET), tmp_path_factory.mktemp("trainkey") / "k.bin")


@pytest.fixture(scope="session")
def protected_run(digit_shards, tmp_path_factory):
    """A tiny protected model trained here on ``digit_shards`` (1 rank): its run folder."""
    from tests.train.conftest import FAST, torchrun

    run = tmp_path_factory.mktemp("protected") / "run"
    done = torchrun("--data", str(digit_shards), "--out", str(run), "--epochs", "3", *FAST,
                    nproc=1)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return run


class ChildLines:
    """A child's output, line by line, from a reader thread: tests wait on the line that says
    the state they need (the condition itself), never on a sleep."""

    def __init__(self, stream) -> None:
        import queue
        import threading

        self.seen: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # the child closed its output

    def wait_for(self, predicate, timeout: float) -> str:
        """The first line from now on for which ``predicate`` holds; fails after ``timeout``
        seconds or when the child's output ends first."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                said = "".join(self.seen)[-3000:]
                raise AssertionError(f"no such line in {timeout} s:\n{said}") from None
            if line is None:
                raise AssertionError(f"the output ended first:\n{''.join(self.seen)[-3000:]}")
            self.seen.append(line)
            if predicate(line):
                return line

    def rest(self) -> str:
        """Everything the child said, once it has ended."""
        self._thread.join(timeout=60)
        while not self._lines.empty():
            line = self._lines.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)
