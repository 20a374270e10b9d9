"""bench/gpu_check.py cannot rot: its smoke run goes through every section on the CPU, with
the packages the GPU machines lack made unimportable; a failing section is recorded and the
run still ends, non-zero, with its JSON written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What the lent GPU machines do not have (the small wheels the README carries are allowed)
BLOCKER = """
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"s3fs", "moto", "boto3", "botocore", "aiobotocore"} \\
                or name.startswith("nvidia.dali"):
            raise ImportError(f"{name} is not installed on the GPU machines")
        return None
sys.meta_path.insert(0, _Absent())
"""


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_passes_every_section_without_dali_or_s3(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "2"}
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--allow-cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert list(sections) == [name for name, _ in load_gpu_check().SECTIONS]
    assert results["ok"] and not results["failed"]
    assert (
        sections["encryption"]["encrypt_equals_numpy"] and sections["encryption"]["decrypt_exact"]
    )
    assert sections["make_shards"]["same_bytes_as_numpy_encryption"]
    assert sections["training"]["backend"] == "gloo" and sections["training"]["epochs"] == 1
    assert 0 <= sections["training"]["loader_wait_fraction"][0] <= 1
    assert sections["loader"]["img_s_to_device"] > 0 and sections["loader"]["channels_last"]
    assert sections["audit"]["device"] == "cpu" and not sections["audit"]["missing_scenarios"]
    assert sections["predict"]["same_classes_as_cpu"] and sections["predict"]["files"] == 10
    frontier = sections["frontier"]
    assert [p["leaked_blocks"] for p in frontier["points"]] == [1000]
    assert 0 <= frontier["models"][0]["top1_estimated_key"] <= 1
    torchrun = sections["make_shards_torchrun"]
    assert torchrun["same_bytes_as_one_process"] and torchrun["encrypt_device"] == "cpu"
    photos = sections["make_shards_photos"]
    assert photos["images"] == 12 * 2 and photos["img_s_encrypt_cpu"] > 0  # two hard links each
    assert sections["make_shards_nvjpeg"]["refused_without_cuda"]  # no CUDA: one line, exit 2
    assert sections["make_shards_threads"]["img_s_by_threads"]["1"] > 0
    assert (
        "1 shard process(es) busy" in sections["make_shards_threads"]["time_split_by_threads"]["1"]
    )
    assert sections["make_shards_ranks"]["same_bytes_as_one_rank"]
    assert "shard process(es) busy" in sections["make_shards_ranks"]["time_split_rank0"]
    for name in ("make_shards_ranks_gpu", "pytest_gpu"):  # no CUDA here
        assert sections[name]["skipped"] and "CUDA" in sections[name]["reason"]
    assert sections["disk_write"]["mb_s"] > 0 and sections["loader_224"]["img_s"] > 0
    assert sections["training_224"]["raw_vs_jpeg_ratio"] > 0
    for name in ("make_shards_dali", "make_shards_dali_cpu", "dali_loader_gpu"):  # no DALI
        assert sections[name]["skipped"] and "DALI is not installed" in sections[name]["reason"]


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(check):
        raise RuntimeError("this section is broken")

    def fine(check):
        assert json.loads(check.out.read_text())["sections"]["broken"]["ok"] is False
        return {"figure": 1.5}

    monkeypatch.setattr(gpu_check, "SECTIONS", [("broken", broken), ("fine", fine)])
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--allow-cpu", "--out", str(out)]) == 1
    results = json.loads(out.read_text())
    assert results["failed"] == ["broken"] and not results["ok"]
    assert "this section is broken" in results["sections"]["broken"]["error"]
    assert results["sections"]["fine"] == {
        "ok": True,
        "figure": 1.5,
        "seconds": results["sections"]["fine"]["seconds"],
    }
