"""make_shards under a real torchrun (2 ranks on the CPU, on one node or two): same bytes as one
process, resume after a rank is killed, and a failing rank ending the job with its message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from tests.conftest import ChildLines
from tests.tools.conftest import ROOT, files, shard_args, tool

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [*TORCHRUN, f"--nproc_per_node={nproc}", str(ROOT / "tools" / "make_shards.py"), *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(*args, nproc=nproc)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def dali_args(tree: Path, key_file: Path, out: Path | str) -> list[str]:
    args = shard_args(tree, key_file, out)
    args[args.index("--decoder") + 1] = "dali"
    return [*args, "--device", "cpu"]


@pytest.fixture(scope="module")
def dali_reference(tree, key_file, tmp_path_factory) -> Path:
    pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    out = tmp_path_factory.mktemp("dali-reference")
    done = tool("make_shards.py", *dali_args(tree, key_file, out))
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_pil_local_equal_one_process(tree, key_file, reference, tmp_path):
    out = tmp_path / "out"
    done = torchrun(*shard_args(tree, key_file, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stderr  # really shared between two ranks
    assert files(out) == files(reference)
    # rank 0 reports the job: every image, made by both ranks (not rank 0's share)
    made = json.loads((reference / "train.manifest.json").read_text())["total_samples"]
    assert f"train: {made} images ({made} made now by 2 ranks) in " in done.stderr
    assert "after the first batch, the ranks together)" in done.stderr
    assert sorted(os.listdir(out)) == sorted(files(reference))  # no lock or records left


def test_two_ranks_dali_s3_equal_one_process(tree, key_file, dali_reference, s3_env):
    url = f"s3://{s3_env}/two-ranks"
    done = torchrun(*dali_args(tree, key_file, url))
    assert done.returncode == 0, done.stderr[-3000:]
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_env}/two-ranks"))
    assert names == sorted(files(dali_reference))
    for name, data in files(dali_reference).items():
        assert fs.cat_file(f"{s3_env}/two-ranks/{name}") == data, name


def test_one_rank_per_node_lists_the_source(tree, key_file, reference, tmp_path):
    """Two ranks on one node: the first lists the tree (its rejects are logged once, by it)
    and hands the listing to the other; the shards are those of one process."""
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    (src / "train" / (sorted(os.listdir(src / "train"))[0]) / "notes.txt").write_text("x")
    out = tmp_path / "out"
    done = torchrun(*shard_args(src, key_file, out))
    assert done.returncode == 0, done.stderr[-3000:]
    shards = {n: d for n, d in files(out).items() if not n.endswith(".json")}
    assert shards == {n: d for n, d in files(reference).items() if not n.endswith(".json")}
    manifest = json.loads((out / "train.manifest.json").read_text())
    (reject,) = manifest["source_rejects"]  # encrypted: counted by reason, never named
    assert reject["count"] == 1 and reject["reason"].startswith("extension .txt is not")
    warned = [line for line in done.stderr.splitlines() if "notes.txt: not used" in line]
    assert len(warned) == 1 and warned[0].startswith("[rank 0/2]"), warned


def test_two_nodes_with_c10d_rendezvous_equal_one_process(tree, key_file, reference, tmp_path):
    """Two torchrun agents (two "nodes", one rank each, c10d rendezvous on loopback) into one
    folder, as a shared file system: the bytes of one process, and rank 0 reports the job."""
    from pipeline.testing import free_port

    out, port = tmp_path / "out", free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=shards", str(ROOT / "tools" / "make_shards.py"),
               *shard_args(tree, key_file, out)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env=env()))  # fmt: skip
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert files(out) == files(reference)
    made = json.loads((reference / "train.manifest.json").read_text())["total_samples"]
    both = "".join(logs)
    assert "rank 0 of 2 builds" in both  # one job of two ranks, not two jobs of one
    assert f"train: {made} images ({made} made now by 2 ranks) in " in both


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its children are the workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_kill_one_rank_then_resume_with_one_process(tree, key_file, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        torchrun_cmd(*shard_args(tree, key_file, out), "--batch-size", "1", "--verbose"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:  # rank 0 logs its first finished shard: both ranks are building by then
        ChildLines(proc.stderr).wait_for(lambda line: "train: shard 0 of" in line, 240)
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # rank 1 dies mid-run
        assert proc.wait(timeout=120) != 0  # the agent ends the job
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "val.manifest.json").exists()  # it really was cut short
    resumed = tool("make_shards.py", *shard_args(tree, key_file, out))  # 1 process now
    assert resumed.returncode == 0, resumed.stderr
    assert "stale lock" in resumed.stderr  # the killed job's lock, recognised as dead
    assert files(out) == files(reference)
    assert sorted(os.listdir(out)) == sorted(files(reference))


def test_a_rank_killed_under_max_restarts_is_restarted_and_the_job_ends_whole(
    tree, key_file, reference, tmp_path
):
    """torchrun --max-restarts=1: rank 1 is killed mid-run, the agent restarts both ranks, and
    the new attempt takes over its earlier attempt's lock, resumes from the shards made and
    ends with the bytes of one process, exit 0."""
    out = tmp_path / "out"
    script = str(ROOT / "tools" / "make_shards.py")
    cmd = [*TORCHRUN, "--nproc_per_node=2", "--max-restarts=1", script,
           *shard_args(tree, key_file, out), "--batch-size", "1", "--verbose"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env())  # fmt: skip
    lines = ChildLines(proc.stderr)
    try:  # rank 0 logs its first finished shard: both ranks are building by then
        lines.wait_for(lambda line: "train: shard 0 of" in line, 240)
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, lines.rest()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    said = lines.rest()
    assert "taking over the lock of this torchrun job's earlier attempt" in said
    assert "train: resuming:" in said
    assert files(out) == files(reference)
    assert sorted(os.listdir(out)) == sorted(files(reference))


def test_a_failing_rank_stops_the_job_with_its_message(tree, key_file, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tree, src)
    bad = sorted((src / "train").rglob("*.JPEG"))[5]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: rejected, and no reject is allowed
    out = tmp_path / "out"
    started = time.monotonic()
    done = torchrun(*shard_args(src, key_file, out), "--max-reject-fraction", "0", timeout=180)
    assert done.returncode != 0
    assert time.monotonic() - started < 120
    message = [line for line in done.stderr.splitlines() if "make_shards: error" in line]
    assert message and "[rank " in message[0], done.stderr[-3000:]
    assert bad.relative_to(src).as_posix() in message[0]
    assert "up to shard train-0000" in message[0] and "--max-reject-fraction" in message[0]
    assert "/pipeline/" not in done.stderr  # no traceback from our code (torchrun prints its own)
    assert not (out / "train.manifest.json").exists()
