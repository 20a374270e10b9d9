"""make_shards --seal through the real command lines: two torchrun ranks, a loopback S3 bucket,
verify_shards and training reading what was sealed (the library cases: tests/pipeline/shards/
test_sealing.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import pytest

from pipeline.cipher.seal import generate_data_key, save_data_key
from pipeline.shards.sealing import SEALED_NAME, open_output
from pipeline.storage import Storage
from pipeline.stream.dataset import LoaderConfig, ShardDataset
from tests.tools.conftest import ROOT, shard_args, tool
from tests.tools.test_make_shards_torchrun import torchrun
from tests.train.conftest import FAST

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


@pytest.fixture(scope="module")
def data_key_file(tmp_path_factory):
    return save_data_key(generate_data_key(), tmp_path_factory.mktemp("dk") / "data.key")


def opened(url: str, key_file) -> dict[str, bytes]:
    """Every object of an output, opened (the plain marker left out)."""
    storage = open_output(url, str(key_file))
    return {
        name: storage.read_bytes(name)
        for name in storage.list()
        if name != SEALED_NAME and not name.endswith(".json")
    }


def test_two_ranks_seal_the_same_content_as_the_unsealed_run(
    tree, key_file, reference, data_key_file, tmp_path
):
    out = tmp_path / "sealed"
    sources = tmp_path / "sources.parquet"
    done = torchrun(*shard_args(tree, key_file, out), "--seal", str(data_key_file),
                    "--source-map", str(sources))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import pyarrow.parquet as pq

    assert pq.read_table(sources).num_rows == 64  # the owner's map, from the sealed tables
    assert "rank 0 of 2" in done.stderr and "sealed with tink:" in done.stderr
    plain = Storage(reference)
    assert opened(str(out), data_key_file) == {
        n: plain.read_bytes(n) for n in plain.list() if not n.endswith(".json")
    }
    ok = tool("verify_shards.py", str(out), "--data-key", str(data_key_file))
    assert ok.returncode == 0 and "16 shards, 64 samples" in ok.stderr, ok.stderr
    bare = tool("verify_shards.py", str(out))
    assert bare.returncode == 2 and "sealed with data key tink:" in bare.stderr
    assert "Traceback" not in bare.stderr and len(bare.stderr.strip().splitlines()) == 1


def test_s3_sealed_round_trip_and_training_from_the_bucket(
    tree, key_file, reference, data_key_file, s3_env, tmp_path
):
    url = f"s3://{s3_env}/sealed"
    made = tool("make_shards.py", *shard_args(tree, key_file, url), "--seal", str(data_key_file))
    assert made.returncode == 0, made.stderr
    fs = fsspec.filesystem("s3")
    for path in fs.ls(f"{s3_env}/sealed"):
        if not path.endswith(SEALED_NAME):
            assert b"ustar" not in fs.cat_file(path), path
    ok = tool("verify_shards.py", url, "--data-key", str(data_key_file))
    assert ok.returncode == 0, ok.stderr
    # the loader streams from the bucket, opening as it reads, the same samples as local
    samples = [
        (image.numpy().tobytes(), label)
        for image, label, _ in ShardDataset(
            url, "train", config=LoaderConfig(train=False, num_workers=0),
            data_key=str(data_key_file),
        )
    ]  # fmt: skip
    local = [
        (image.numpy().tobytes(), label)
        for image, label, _ in ShardDataset(
            str(reference), "train", config=LoaderConfig(train=False, num_workers=0)
        )
    ]
    assert samples == local
    # training on the cluster: the data key from the environment, never the model key
    env = {**os.environ, "KEYPROTECT_DATA_KEY": str(data_key_file), "TQDM_DISABLE": "1"}
    trained = subprocess.run(
        [sys.executable, str(ROOT / "train" / "ddp.py"), "--data", url, "--out",
         str(tmp_path / "run"), *FAST, "--batch-size", "8", "--max-steps", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    env.pop("KEYPROTECT_DATA_KEY")
    refused = subprocess.run(
        [sys.executable, str(ROOT / "train" / "ddp.py"), "--data", url, "--out",
         str(tmp_path / "run2"), *FAST],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "no data key was given" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_reseal_command_line(tree, key_file, data_key_file, tmp_path):
    out = tmp_path / "sealed"
    made = tool("make_shards.py", *shard_args(tree, key_file, out), "--seal", str(data_key_file))
    assert made.returncode == 0, made.stderr
    new = save_data_key(generate_data_key(), tmp_path / "new.key")
    wrong = tool("reseal.py", str(out), "--data-key", str(new), "--new-data-key", str(new))
    assert wrong.returncode == 2 and "sealed with data key tink:" in wrong.stderr
    done = tool("reseal.py", str(out), "--data-key", str(data_key_file), "--new-data-key",
                str(new))  # fmt: skip
    assert done.returncode == 0 and "now sealed with" in done.stderr, done.stderr
    ok = tool("verify_shards.py", str(out), "--data-key", str(new))
    assert ok.returncode == 0, ok.stderr
