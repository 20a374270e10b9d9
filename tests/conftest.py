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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on loopback: moto_server in its own process, never real AWS."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


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
