"""The benchmark script runs and writes the figures the README quotes (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

ROOT = Path(__file__).resolve().parents[2]


def test_bench_encrypt_writes_results(tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"from_another_bench": 1.0}))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_encrypt.py"),
            "--batch",
            "4",
            "--size",
            "32",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["from_another_bench"] == 1.0  # merged, not replaced
    for name in ("encrypt_img_s", "copy_img_s", "encrypt_vs_copy_ratio"):
        assert results[name] > 0


def test_bench_listing_writes_results(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_listing.py"), "--classes", "4",
         "--per-class", "25", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["source_listing_us_per_file"] > 0
    assert results["source_listing_vs_bare_walk_ratio"] > 0
    assert "4 x 25 empty .JPEG files" in results["listing_bench_machine"]


def test_bench_make_shards_writes_results(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_make_shards.py"), "--images", "12",
         "--size", "32", "--repeats", "1", "--threads-images", "12", "--threads-repeats", "2",
         "--s3-images", "12", "--s3-repeats", "1",
         "--s3-shared-repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for name in ("make_shards_img_s", "naive_img_s", "make_shards_vs_naive_ratio",
                 "make_shards_threads_2_vs_1_ratio", "make_shards_pil_1_thread_img_s",
                 "make_shards_s3_vs_local_ratio", "make_shards_s3_img_s",
                 "make_shards_s3_vs_local_ratio_shared_cores"):  # fmt: skip
        assert results[name] > 0
    pairs = results["make_shards_threads_2_vs_1_ratios"]  # the figure: their median
    assert len(pairs) == 2 and all(ratio > 0 for ratio in pairs)
    assert results["make_shards_threads_2_vs_1_ratio"] == pytest.approx(sum(pairs) / 2, abs=2e-3)
    assert results["moto_server_cpu_seconds"] >= 0  # a dozen requests can round to 0
    assert all(mb > 50 for mb in results["make_shards_peak_rss_mb"].values())
    assert 0 <= results["encrypt_time_fraction"] < 1  # tiny runs can measure 0 CPU seconds


def test_bench_loader_writes_results(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_loader.py"), "--images", "40", "--size", "32",
         "--steps", "2", "--shard-sizes", "400,100", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("loader_img_s", "jpeg_loader_img_s", "loader_vs_jpeg_ratio", "loader_peak_rss_mb"):
        assert results[name] > 0
    assert len(results["loader_rss_mb_by_shard_count"]) == 2


def test_bench_frontier_writes_results(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_frontier.py"), "--block-sizes", "4",
         "--blocks", "300,600", "--statistics-blocks", "2000", "--time-budget-s", "120",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["frontier_m4_estimate_s_at_300_blocks"] > 0
    assert results["frontier_m4_estimate_s_at_600_blocks"] > 0
    assert results["frontier_m4_s_per_1e6_blocks_extrapolated"] > 0
    assert "extrapolated" in results["frontier_bench_machine"]


def test_s3_bench_runs_the_server_and_make_shards_on_their_own_cores():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_make_shards

    cores = bench_make_shards.split_cores()
    available = os.sched_getaffinity(0)
    if len(available) < 2:
        assert cores is None
        return
    client, server = cores
    assert client | server == available and not client & server and len(server) == 1
    shown = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=bench_make_shards.pin(server), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shown.stdout.strip() == str(sorted(server))


def test_bench_seal_writes_the_stage_ratios(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_seal.py"), "--mb", "4", "--images", "70",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for name in ("open_1mb_gb_s", "make_shards_sealed_vs_unsealed_ratio",
                 "loader_sealed_vs_unsealed_ratio", "loader_sealed_img_s",
                 "dali_loader_sealed_vs_unsealed_ratio"):  # fmt: skip
        assert results[name] > 0
    for name in ("make_shards_sealed_peak_rss_mb", "make_shards_unsealed_peak_rss_mb",
                 "loader_sealed_peak_rss_mb", "loader_unsealed_peak_rss_mb",
                 "dali_loader_sealed_cache_peak_rss_mb",
                 "dali_loader_sealed_stream_peak_rss_mb"):  # fmt: skip
        assert 50 < results[name] < 4000  # a process that imported torch and DALI
    assert results["dali_loader_sealed_stream_vs_cache_ratio"] > 0
    assert results["dali_loader_sealed_cache_shm_mb"] > 0


def test_bench_report_groups_every_figure_with_its_note_and_date(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from report import main as report_main
    from results import merge_results

    results = tmp_path / "results.json"
    merge_results(results, {"encrypt_img_s": 1234.5, "encrypt_vs_copy_ratio": 14.4},
                  note_key="encrypt_bench_machine", note="2 cores, M=4")  # fmt: skip
    merge_results(results, {"loader_sealed_vs_unsealed_ratio": 0.95, "stray_figure": 3},
                  note_key="seal_bench_machine", note="64 MB object")  # fmt: skip
    page = tmp_path / "benchmarks.md"
    page.write_text("# x\n\n<!-- bench-results:begin -->\nold\n<!-- bench-results:end -->\nend\n")
    assert report_main(["--results", str(results), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# x\n") and text.endswith("end\n") and "old" not in text
    assert "_Generated by `" in text and "data: " in text
    encrypt = text.split("### Encryption")[1].split("###")[0]
    assert "2 cores, M=4 (20" in encrypt and "`encrypt_img_s` | 1,234.5" in encrypt
    sealing = text.split("### Sealing")[1].split("###")[0]
    assert "`loader_sealed_vs_unsealed_ratio` | 0.95" in sealing
    assert "`stray_figure`" in text.split("### Other figures")[1]
