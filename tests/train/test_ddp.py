"""train/ddp.py as torchrun runs it: 2 gloo ranks, two "nodes", kill and resume, refusals."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import Key
from pipeline.testing import free_port
from tests.conftest import ChildLines
from tests.train.conftest import FAST, ROOT, make_digit_shards, torchrun

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_learn_and_stay_in_step(digit_shards, tmp_path):
    done = torchrun("--data", str(digit_shards), "--out", str(tmp_path), "--epochs", "2", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = metrics(tmp_path)
    assert len(epochs) == 2
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[1]["val_top1"] > 0.5  # chance is 0.1
    assert epochs[1]["val_samples"] == 355  # the whole val split, padding not double-counted
    for e in epochs:
        assert e["steps_by_rank"] == [e["steps_per_rank"]] * 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (
        summary["world_size"] == 2
        and summary["key_fingerprint"] == Key(bytes(range(32))).fingerprint
    )
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["key_fingerprint"] == summary["key_fingerprint"]
    assert bytes(range(32)).hex() not in (tmp_path / "checkpoint.pt").read_bytes().hex()


def test_three_shards_over_two_ranks_and_two_workers_do_not_hang(tmp_path):
    shards = make_digit_shards(tmp_path / "shards", Key(bytes(range(32))), shard_size="500")
    names = sorted(p.name for p in shards.glob("train-*.tar"))
    assert len(names) == 3
    done = torchrun("--data", str(shards), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST,
                    timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (epoch,) = metrics(tmp_path / "run")
    assert epoch["steps_by_rank"][0] == epoch["steps_by_rank"][1] > 0


def test_two_nodes_with_c10d_rendezvous(digit_shards, tmp_path):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
               "--rdzv_id=test", str(ROOT / "train" / "ddp.py"), "--data", str(digit_shards),
               "--out", str(tmp_path), "--epochs", "1", *FAST]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=env))  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (epoch,) = metrics(tmp_path)
    assert len(epoch["steps_by_rank"]) == 2


def test_kill_mid_epoch_then_resume_matches_an_uninterrupted_run(digit_shards, tmp_path):
    args = ["--data", str(digit_shards), "--epochs", "2", "--ckpt-every", "4", *FAST]
    whole = torchrun("--out", str(tmp_path / "whole"), *args)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train" / "ddp.py"), "--out", str(out), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            text=True, start_new_session=True)  # fmt: skip
    lines = ChildLines(proc.stderr)
    try:  # mid-way through epoch 1: the line rank 0 logs once that checkpoint is written
        lines.wait_for(lambda line: re.search(r"checkpoint at epoch 1, step [1-9]", line), 240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists()  # it really was cut short
    resumed = torchrun("--out", str(out), "--resume", str(out / "checkpoint.pt"), *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr

    a = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for name, tensor in a["model"].items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, b["model"][name], rtol=1e-4, atol=1e-5), name
    assert metrics(out)[-1]["val_top1"] == pytest.approx(
        metrics(tmp_path / "whole")[-1]["val_top1"], abs=0.01
    )
    assert [m["epoch"] for m in metrics(out)] == [0, 1]  # no epoch twice after the kill
    assert (out / "summary.json").exists()


def test_resume_is_exact_or_refused_and_max_steps_counts_across_resumes(digit_shards, tmp_path):
    from pipeline.stream.dataset import LoaderConfig, ShardDataset

    out, ckpt = tmp_path / "run", str(tmp_path / "run" / "checkpoint.pt")
    total = len(ShardDataset(str(digit_shards), "train", config=LoaderConfig(batch_size=32)))
    args = ["--data", str(digit_shards), "--out", str(out), "--epochs", "1", *FAST]
    first = python_ddp(*args, "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    assert not (out / "summary.json").exists()

    changed = python_ddp(*args, "--resume", ckpt, "--batch-size", "16", "--seed", "1",
                         "--epochs", "2")  # fmt: skip
    assert changed.returncode == 2 and len(changed.stderr.strip().splitlines()) == 1
    for part in ("batch_size 32 -> 16", "seed 0 -> 1", "epochs 1 -> 2", "only these may change"):
        assert part in changed.stderr

    more = python_ddp(*args, "--resume", ckpt, "--max-steps", "5", "--ckpt-every", "100")
    assert more.returncode == 0, more.stderr[-2000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 5, 5)

    last = python_ddp(*args, "--resume", ckpt, "--max-steps", str(total))
    assert last.returncode == 0, last.stderr[-2000:]
    assert (out / "summary.json").exists()  # complete although --max-steps equals the total
    assert [m["epoch"] for m in metrics(out)] == [0]


def test_mismatched_keys_are_refused(digit_shards, tmp_path):
    other = make_digit_shards(tmp_path / "other", Key(bytes(32)), shard_size="250")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source, split in ((digit_shards, "train"), (other, "val")):
        for path in source.glob(f"{split}*"):
            shutil.copy(path, mixed / path.name)
    done = torchrun("--data", str(mixed), "--out", str(tmp_path / "run"), "--epochs", "1", *FAST)
    assert done.returncode != 0 and "make both with the same key" in done.stderr
    plain = python_ddp("--data", str(mixed), "--out", str(tmp_path / "run"), *FAST)
    assert plain.returncode == 2 and "make both with the same key" in plain.stderr
    assert "Traceback" not in plain.stderr

    first = python_ddp(
        "--data", str(other), "--out", str(tmp_path / "a"), "--max-steps", "1", *FAST
    )
    assert first.returncode == 0, first.stderr[-2000:]
    wrong = python_ddp("--data", str(digit_shards), "--out", str(tmp_path / "b"), "--resume",
                       str(tmp_path / "a" / "checkpoint.pt"), *FAST)  # fmt: skip
    assert wrong.returncode == 2 and "trained with key" in wrong.stderr
    missing = python_ddp("--data", str(digit_shards), "--out", str(tmp_path / "c"), "--resume",
                         str(tmp_path / "nope.pt"), *FAST)  # fmt: skip
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr


def test_an_os_error_is_one_line_and_keeps_nothing_half_written(digit_shards, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = python_ddp("--data", str(digit_shards), "--out", str(blocker / "run"), "--epochs", "1",
                      "--max-steps", "1", *FAST)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "train: error:" in done.stderr and str(blocker / "run") in done.stderr
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]


def python_ddp(*args: str) -> subprocess.CompletedProcess:
    """train/ddp.py without torchrun: one process, its own exit code and messages."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train" / "ddp.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


def test_dali_loader_backend_trains(digit_shards, tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    done = torchrun("--data", str(digit_shards), "--out", str(tmp_path), "--epochs", "2",
                    "--loader", "dali", *FAST)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = metrics(tmp_path)
    assert epochs[1]["val_top1"] > 0.5 and epochs[1]["val_samples"] == 355
    assert epochs[1]["steps_by_rank"][0] == epochs[1]["steps_by_rank"][1]


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the training processes torchrun ``launcher`` started (its children with
    a RANK; DataLoader workers are the ranks' children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for value in environ:
            if value.startswith(b"RANK="):
                found[int(value[5:])] = int(entry.name)
    return found


def test_a_hung_rank_ends_the_run_with_a_message_not_a_hang(digit_shards, tmp_path):
    """Rank 1 stops answering (SIGSTOP: a hung process) mid-training; rank 0 gives up after
    --dist-timeout and says why, and the job ends. Without the timeout rank 0 waited 30 min."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train" / "ddp.py"), "--data", str(digit_shards), "--out", str(out),
           "--epochs", "3", "--dist-timeout", "4", "--ckpt-every", "1", *FAST]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    lines = ChildLines(proc.stdout)
    try:
        lines.wait_for(lambda line: "checkpoint at epoch 0, step 1:" in line, 120)  # training
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        # rank 0 gives up on its own within --dist-timeout, and says so (else: a hang)
        lines.wait_for(lambda line: "lost the other ranks" in line, 60)
        # torchrun now sends the hung rank SIGTERM; a stopped process takes it once continued
        os.kill(ranks[1], signal.SIGCONT)
        proc.wait(timeout=60)
        output = lines.rest()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "train: error: rank 0 of 2 lost the other ranks" in output, output[-3000:]
    assert "--dist-timeout 4 s" in output
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_says_where_the_run_stands_and_how_to_continue(digit_shards, tmp_path, launcher):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it): one line per rank
    with the epoch and step, what the checkpoint holds and the exact command that continues;
    no traceback from the training processes."""
    out = tmp_path / "run"
    args = ["--data", str(digit_shards), "--out", str(out), "--epochs", "3", "--ckpt-every", "2",
            *FAST]  # fmt: skip
    start = [sys.executable, str(ROOT / "train" / "ddp.py")]
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=1", str(ROOT / "train" / "ddp.py")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([*start, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    lines = ChildLines(proc.stderr)
    try:
        lines.wait_for(lambda line: "checkpoint at epoch 0, step 2:" in line, 240)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    said = lines.rest()
    found = [x for x in said.splitlines() if "train: interrupted;" in x]
    assert len(found) == 1, said[-3000:]
    line = found[0]
    assert re.search(
        r"stopped in epoch 0 at step \d+; .*checkpoint.pt holds epoch 0, step \d+", line
    )
    command = line.split("continue with `", 1)[1].rstrip("`\n")
    assert command.endswith(f"--resume {out / 'checkpoint.pt'}") and "--epochs 3" in command
    if launcher == "python":
        assert proc.returncode == 130 and "Traceback" not in said, said[-3000:]
        resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT,
                                 capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "train: resuming from" in resumed.stderr
        assert (out / "summary.json").exists()
