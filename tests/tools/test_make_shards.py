"""make_shards and verify_shards as real processes: kill -9 and resume, damage, stock readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Key, decrypt, save_key
from tests.conftest import FIXED_SECRET, ChildLines, write_jpeg_tree
from tests.tools.conftest import ROOT, files, shard_args, tool

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


def kill_when(said: str, *cmd: str) -> None:
    """Run make_shards --verbose and SIGKILL it as soon as it logs a line containing ``said``."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *cmd, "--verbose"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ChildLines(proc.stderr).wait_for(lambda line: said in line, 120)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    "moment",
    ["mid_shard", "after_three_shards", "mid_val"],
)
def test_sigkill_then_resume_is_byte_identical(tree, key_file, reference, tmp_path, moment):
    out = tmp_path / "out"
    said = {
        "mid_shard": "train: shard 1 of",  # shard 2 is being built then
        "after_three_shards": "train: shard 2 of",
        "mid_val": "val: rank 0 of 1 builds",
    }[moment]
    kill_when(said, *shard_args(tree, key_file, out))
    assert not (out / "val.manifest.json").exists()  # it really was cut short
    for name in os.listdir(out):  # no partial shard under a final name
        if name.endswith(".tar"):
            assert name in files(reference)
    resumed = tool("make_shards.py", *shard_args(tree, key_file, out))
    assert resumed.returncode == 0, resumed.stderr
    assert files(out) == files(reference)
    assert sorted(os.listdir(out)) == sorted(files(reference))  # no leftovers either


def test_rerun_of_finished_output_is_a_no_op(tree, key_file, reference):
    done = tool("make_shards.py", *shard_args(tree, key_file, reference))
    assert done.returncode == 0 and "already complete" in done.stderr


def test_dry_run_prints_the_plan_of_the_run_and_writes_nothing(tree, key_file, reference, tmp_path):
    out = tmp_path / "planned"
    planned = tool("make_shards.py", *shard_args(tree, key_file, out), "--dry-run")
    assert planned.returncode == 0 and not out.exists()
    made = json.loads((reference / "train.manifest.json").read_text())
    train = planned.stdout.splitlines()[0]
    assert train.startswith(f"train: {made['total_samples']} images of 4 classes")
    assert f"{len(made['shards'])} shards of 4 samples" in train
    assert f"{made['total_bytes'] / 1e9:,.2f} GB" in train
    assert planned.stdout.splitlines()[-1].endswith("nothing was written")
    missing = tool("make_shards.py", *shard_args(tree, tmp_path / "none.bin", out), "--dry-run")
    assert missing.returncode == 2 and "none.bin" in missing.stderr and not out.exists()


def test_refuses_another_key_and_a_missing_key(tree, reference, tmp_path):
    other = save_key(Key(bytes(32)), tmp_path / "other.bin")
    done = tool("make_shards.py", *shard_args(tree, other, reference))
    assert done.returncode == 2 and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    done = tool("make_shards.py", *shard_args(tree, tmp_path / "missing.bin", tmp_path / "o"))
    assert done.returncode == 2 and "key file not found" in done.stderr
    done = tool(
        "make_shards.py", "--src", str(tmp_path / "nowhere"), "--plain", "--out", str(tmp_path)
    )
    assert done.returncode == 2 and "source folder not found" in done.stderr


def test_verify_passes_then_catches_a_flipped_byte_and_truncation(reference, tmp_path):
    ok = tool("verify_shards.py", str(reference))
    assert ok.returncode == 0 and "16 shards, 64 samples" in ok.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in files(reference).items():
        (damaged / name).write_bytes(data)
    flip = bytearray((damaged / "train-000001.tar").read_bytes())
    flip[3000] ^= 0x01  # inside an image: the tar still parses
    (damaged / "train-000001.tar").write_bytes(bytes(flip))
    whole = (damaged / "val-000002.tar").read_bytes()
    (damaged / "val-000002.tar").write_bytes(whole[: len(whole) // 2])
    bad = tool("verify_shards.py", str(damaged))
    assert bad.returncode == 1
    named = {
        line.split()[1].rstrip(":") for line in bad.stderr.splitlines() if line.startswith("BAD")
    }
    assert named == {str(damaged / "train-000001.tar"), str(damaged / "val-000002.tar")}
    assert "SHA-256 mismatch" in bad.stderr and "truncated" in bad.stderr


def test_stock_tar_reads_the_shards(reference):
    listing = subprocess.run(
        ["tar", "tvf", str(reference / "train-000000.tar")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(listing) == 4 * 3
    assert listing[0].split()[-1].endswith(".cls") and " 0/0 " in f" {listing[0]} "


def test_webdataset_reads_the_shards(reference):
    import webdataset as wds

    manifest = json.loads((reference / "train.manifest.json").read_text())
    urls = [str(reference / s["name"]) for s in manifest["shards"]]
    key = Key(FIXED_SECRET)
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        image = np.frombuffer(sample["u8"], np.uint8).reshape(meta["shape"])  # the only reshaping
        assert "source" not in meta and 0 <= int(sample["cls"]) < len(manifest["classes"])
        assert decrypt(image, key).std() > 5  # a real picture again
        count += 1
    assert count == manifest["total_samples"] == 48


def test_source_map_of_finished_output(tree, key_file, reference, tmp_path):
    import pyarrow.parquet as pq

    inside = tool("make_shards.py", *shard_args(tree, key_file, tmp_path / "o"),
                  "--source-map", str(tmp_path / "o" / "map.parquet"))  # fmt: skip
    assert inside.returncode == 2 and "must not travel with the shards" in inside.stderr
    assert not (tmp_path / "o").exists()  # refused before any work
    path = tmp_path / "owner" / "k.sources.parquet"
    done = tool("make_shards.py", *shard_args(tree, key_file, reference), "--source-map", str(path))
    assert done.returncode == 0 and "already complete" in done.stderr, done.stderr
    assert "keep it with the key" in done.stderr and os.stat(path).st_mode & 0o777 == 0o600
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 64 and len({(r["split"], r["key"]) for r in rows}) == 64
    manifest = json.loads((reference / "train.manifest.json").read_text())
    for row in rows:
        assert (tree / row["source"]).is_file()
        assert row["source"].split("/")[1] == manifest["classes"][row["label"]]


def test_verify_catches_a_wrong_or_missing_dali_index(reference, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name, data in files(reference).items():
        (damaged / name).write_bytes(data)
    index = (damaged / "train-000000.idx").read_text().replace(" 512 ", " 1024 ", 1)
    (damaged / "train-000000.idx").write_text(index)
    (damaged / "val-000000.idx").unlink()
    bad = tool("verify_shards.py", str(damaged))
    assert bad.returncode == 1
    assert "train-000000.idx: DALI index does not match" in bad.stderr
    assert "val-000000.idx: missing DALI index" in bad.stderr


def test_without_dali_the_error_says_what_to_do(tree, tmp_path):
    script = (
        "import sys, runpy; sys.modules['nvidia.dali'] = None; "
        f"sys.argv = ['make_shards.py', '--src', {str(tree)!r}, '--plain', '--out', "
        f"{str(tmp_path)!r}, '--decoder', 'dali', '--device', 'cpu']; "
        f"runpy.run_path({str(ROOT / 'tools' / 'make_shards.py')!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "pip install nvidia-dali-cuda130" in done.stderr and "--decoder pil" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_nvjpeg_without_a_gpu_is_one_line_before_any_work(tree, tmp_path):
    done = tool("make_shards.py", "--src", str(tree), "--plain", "--out", str(tmp_path / "o"),
                "--decoder", "nvjpeg")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "make_shards: error: --decoder nvjpeg decodes on a CUDA GPU and none is here: use "
        "--decoder auto, dali or pil"
    ]
    assert not (tmp_path / "o").exists()


def test_second_run_into_a_live_output_is_refused(tree, key_file, tmp_path):
    """Issue 11's probe: a second run (another key, --overwrite) starts while the first runs."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *shard_args(tree, key_file, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = ChildLines(first.stderr)
    try:
        lines.wait_for(lambda line: "builds" in line, 120)  # it holds the lock by then
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, whatever the machine's speed
        other = save_key(Key(bytes(32)), tmp_path / "other.bin")
        second = tool("make_shards.py", *shard_args(tree, other, out), "--overwrite")
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "another make_shards run" in second.stderr
        assert first.wait(timeout=120) == 0, lines.rest()
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert json.loads((out / "val.manifest.json").read_text())["key_fingerprint"] == (
        Key(FIXED_SECRET).fingerprint
    )
    ok = tool("verify_shards.py", str(out))
    assert ok.returncode == 0 and "16 shards, 64 samples" in ok.stderr, ok.stderr


def test_an_os_error_is_one_line_and_leaves_nothing_behind(tree, key_file, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    done = tool("make_shards.py", *shard_args(tree, key_file, blocker / "shards"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("make_shards: error:") and str(blocker) in lines[-1]
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "not a folder"


def _file_size_limit(limit: int):
    """For the child: files larger than ``limit`` bytes fail with EFBIG, as a full disk fails
    with ENOSPC (same write error path; a real full disk needs a mount this test cannot make)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_write_is_one_line_removes_partial_files_and_a_rerun_finishes(
    tree, key_file, tmp_path
):
    out = tmp_path / "shards"
    full = tool("make_shards.py", *shard_args(tree, key_file, out),
                preexec_fn=_file_size_limit(64 * 1024))  # fmt: skip
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("make_shards: error:") and "File too large" in last, last
    assert "train-000000.tar" in last  # names the shard it was writing
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    done = tool("make_shards.py", *shard_args(tree, key_file, out))
    assert done.returncode == 0, done.stderr
    assert tool("verify_shards.py", str(out)).returncode == 0


def test_a_non_utf8_file_name_is_named_escaped_and_finished_splits_are_kept(key_file, tmp_path):
    from tests.conftest import write_jpeg_tree

    src = write_jpeg_tree(tmp_path / "src", classes=2, train=2, val=2, size=(96, 96))
    folder = src / "val" / "n00000000"
    first = sorted(folder.iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(folder), b"caf\xe9.JPEG"))
    out = tmp_path / "shards"
    done = tool("make_shards.py", *shard_args(src, key_file, out))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "caf\\xe9.JPEG" in last and "not valid UTF-8" in last, last
    assert (out / "train.manifest.json").exists()  # the split before it is finished and kept
    assert not (out / "val.manifest.json").exists()


def test_a_folder_it_may_not_write_is_one_line(tree, key_file, tmp_path):
    """Permission refused (root ignores file modes, so a path the kernel refuses stands in)."""
    denied = Path("/sys/keyprotect-test")
    try:
        denied.mkdir()
    except OSError:
        pass
    else:  # a writable /sys: nothing to test here
        denied.rmdir()
        pytest.skip("/sys accepts new folders on this machine")
    done = tool("make_shards.py", *shard_args(tree, key_file, denied / "shards"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("make_shards: error:") and str(denied) in last, last
    assert "not permitted" in last or "denied" in last or "Read-only" in last, last


def test_ctrl_c_is_one_line_with_the_resume_command(key_file, tmp_path):
    """Issue 22.2: Ctrl-C prints what was kept and the exact command that resumes; the rerun
    says it resumes and ends with the same bytes."""
    out = tmp_path / "out"
    # a tree large enough that the run is still building when the signal lands (the shared
    # one's 64 images took 0.4 s after the line below); two processes: the signal may land
    # while they start
    big = write_jpeg_tree(tmp_path / "src", classes=4, train=60, val=4, size=(160, 120))
    args = [*shard_args(big, key_file, out), "--shard-size", "1", "--threads", "2"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    output = ChildLines(proc.stderr)
    output.wait_for(lambda line: "builds" in line, 120)  # the log says building started
    os.kill(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    assert proc.wait(timeout=120) == 130, output.rest()
    text = output.rest()
    lines = text.splitlines()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    [said] = [line for line in lines if "interrupted" in line]
    assert said.startswith("make_shards: interrupted;") and "kept in" in said
    assert "python tools/make_shards.py" in said and f"--out {out}" in said
    resumed = tool("make_shards.py", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr or "made now" in resumed.stderr
    again = tool("make_shards.py", *args)  # the same command once more: nothing left to do
    assert "already complete" in again.stderr
    clean = tmp_path / "clean"
    done = tool("make_shards.py", *[str(clean) if a == str(out) else a for a in args])
    assert done.returncode == 0 and files(out) == files(clean)
