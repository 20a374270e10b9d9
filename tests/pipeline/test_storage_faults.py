"""A store that stops answering, as it happens: moto_server killed or stopped (SIGSTOP, a
stall) under make_shards and under the loader. Each ends in one line naming the object and the
endpoint, within the stated timeout, and a rerun resumes what was finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.storage import StorageError
from pipeline.testing import LoopbackS3
from tests.conftest import ChildLines

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2


@pytest.fixture
def server():
    with LoopbackS3() as s3:
        import boto3

        env = s3.env()
        client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                              aws_access_key_id="testing",
                              aws_secret_access_key="testing")  # fmt: skip
        client.create_bucket(Bucket="faults")
        yield s3, {**env, "KEYPROTECT_STORAGE_TIMEOUT": str(TIMEOUT_S), "TQDM_DISABLE": "1"}
        if s3.proc.poll() is None:
            os.kill(s3.proc.pid, signal.SIGCONT)  # a stopped server must run to be stopped


def shards_command(key_file: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--key", str(key_file),
            "--out", "s3://faults/out", "--decoder", "pil", "--shard-size", "64", "--size", "32",
            "-v"]  # fmt: skip


def make_shards(tmp_path: Path, env: dict, key_file: Path) -> subprocess.Popen:
    return subprocess.Popen(shards_command(key_file), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)  # fmt: skip


def one_line_failure(proc: subprocess.Popen, lines: ChildLines, within: float) -> str:
    started = time.monotonic()
    code = proc.wait(timeout=within)
    said = lines.rest()
    assert code == 2, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    errors = [line for line in said.splitlines() if "error:" in line]
    assert len(errors) == 1, said[-3000:]
    assert time.monotonic() - started < within
    return errors[0]


@pytest.fixture
def key_file(tmp_path):
    from pipeline import Key, save_key
    from tests.conftest import FIXED_SECRET

    return save_key(Key(FIXED_SECRET), tmp_path / "k.bin")


def test_make_shards_on_a_killed_endpoint_ends_in_one_line(server, key_file, tmp_path):
    s3, env = server
    proc = make_shards(tmp_path, env, key_file)
    lines = ChildLines(proc.stdout)
    lines.wait_for(lambda line: "shard 1 of" in line and "finished" in line, timeout=240)
    s3.proc.kill()
    line = one_line_failure(proc, lines, within=120)
    assert "make_shards: error:" in line and s3.url in line and "did not answer" in line
    assert "s3://faults/out" in line  # the object it was writing or reading


def test_make_shards_on_a_stalled_endpoint_stops_then_resumes(server, key_file, tmp_path):
    s3, env = server
    proc = make_shards(tmp_path, env, key_file)
    lines = ChildLines(proc.stdout)
    lines.wait_for(lambda line: "shard 1 of" in line and "finished" in line, timeout=240)
    os.kill(s3.proc.pid, signal.SIGSTOP)
    try:
        line = one_line_failure(proc, lines, within=30 * TIMEOUT_S + 60)
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)
    assert "did not answer" in line and f"waits {TIMEOUT_S:g} s per attempt" in line
    again = subprocess.run(shards_command(key_file), capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr and "already made" in again.stderr
    verify = subprocess.run([sys.executable, str(ROOT / "tools" / "verify_shards.py"),
                             "s3://faults/out"], capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-3000:]


def test_the_loader_on_a_stalled_endpoint_raises_one_storage_error(
    server, key_file, tmp_path, monkeypatch
):
    s3, env = server
    done = subprocess.run(shards_command(key_file), capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for name, value in env.items():
        if name.startswith(("AWS_", "KEYPROTECT_")):
            monkeypatch.setenv(name, value)
    from pipeline.stream.dataset import LoaderConfig, ShardDataset

    dataset = ShardDataset("s3://faults/out", "train",
                           config=LoaderConfig(train=False, num_workers=0))  # fmt: skip
    os.kill(s3.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match="did not answer") as caught:
            for _ in dataset:
                pass
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)
    assert "s3://faults/out/train-000000" in str(caught.value)
    assert time.monotonic() - started < 30 * TIMEOUT_S


def test_training_from_a_stalled_endpoint_ends_in_one_line(server, key_file, tmp_path):
    from tests.train.conftest import FAST

    s3, env = server
    done = subprocess.run(shards_command(key_file), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cmd = [sys.executable, str(ROOT / "train" / "ddp.py"), "--data", "s3://faults/out", "--out",
           str(tmp_path / "run"), *FAST, "--epochs", "2", "--ckpt-every", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)  # fmt: skip
    lines = ChildLines(proc.stdout)
    try:
        lines.wait_for(lambda line: "checkpoint at epoch 0, step 1:" in line, timeout=300)
        os.kill(s3.proc.pid, signal.SIGSTOP)  # the loader's next reads find no answer
        line = one_line_failure(proc, lines, within=40 * TIMEOUT_S + 120)
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "train: error:" in line and "did not answer" in line and "s3://faults/out/" in line
