"""python -m attacks.frontier on tiny budgets: the outputs, the rows, points it cannot reach
marked "not measured", no key material in what it prints or writes, the README block, and
an image folder, plain shards on S3 (loopback moto) and a protected model as inputs."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

from attacks.frontier import FrontierConfig, _rng, main, measured_budgets
from attacks.keyspace import random_material

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

TINY = ["--block-sizes", "4", "--keys", "1", "--statistics-blocks", "3000"]
README = (
    "# x\n\n## What the key resists\n\n<!-- frontier-report:begin -->\nold\n"
    "<!-- frontier-report:end -->\n\nend\n"
)


def frontier(*args: str) -> subprocess.CompletedProcess:
    """The command line, run in this process (an import of torch and timm per run is slow on
    a 2-core machine): its exit status, and everything it printed or logged."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    log = logging.getLogger("attacks")
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's refusals
                code = exc.code
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    readme = out.parent / "README.md"
    readme.write_text(README)
    done = frontier(*TINY, "--budgets", "2000", "--time-budget-s", "300", "--out", str(out),
                    "--page", str(readme))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, readme


def test_a_measured_point_has_every_part(measured):
    out, done, _ = measured
    result = json.loads((out / "frontier.json").read_text())
    (point,) = result["points"]
    assert point["measured"] and point["block_size"] == 4 and point["leaked_blocks"] == 2000
    assert set(point["parts"]) == {"permutation", "np_mask", "ffx_mask", "ffx_table",
                                   "byte_maps", "key_recovered"}  # fmt: skip
    for part in point["parts"].values():
        assert part["min"] <= part["median"] <= part["max"] and len(part["all"]) == 1
        assert part["min"] >= 0 and part["max"] <= 1
    assert point["seconds"]["median"] > 0
    assert not set(result["meta"]["leaked_photos"]) & set(result["meta"]["statistics_photos"])
    table = (out / "frontier.md").read_text()
    assert "| 4 | 2,000 | 1 |" in table and "**not measured**" not in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 4 | 2,000 | 1 |" in done.stdout  # the table, printed
    assert "1 of 1 points measured" in done.stderr  # the one-line summary


def test_the_readme_block_is_replaced_and_nothing_else(measured):
    out, _, readme = measured
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\n## What the key resists\n\n")
    assert text.endswith("<!-- frontier-report:end -->\n\nend\n")
    assert "| 4 | 2,000 | 1 |" in text


def test_no_key_material_is_printed_or_written(measured):
    out, done, _ = measured
    key_rng = _rng(FrontierConfig(), "keys", 4)  # the run's one fresh key, drawn again
    secret = key_rng.bytes(32)
    material = random_material(4, ("shuffle", "np", "ffx"), _rng(FrontierConfig(), "keys", 4))
    op = material.encrypt_op
    written = (
        done.stdout
        + done.stderr
        + "".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".md"))
    )
    for secret_text in (
        secret.hex(),
        op.table.tobytes().hex(),
        str(op.table.tolist())[1:40],
        str(op.index.tolist())[1:40],
        " ".join(map(str, op.index[:12])),
    ):
        assert secret_text not in written  # fmt: skip


def test_points_out_of_time_or_data_are_not_measured(tmp_path):
    done = frontier(*TINY, "--budgets", "2000,1e9", "--time-budget-s", "0.001", "--out",
                    str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    points = json.loads((tmp_path / "frontier.json").read_text())["points"]
    by = {p["budget_blocks"]: p for p in points}
    assert not any(p["measured"] for p in points) and "parts" not in by[2000]
    assert "time budget" in by[2000]["reason"]
    assert "the data has" in by[10**9]["reason"]
    everything = [p for p in points if p["budget_blocks"] not in (2000, 10**9)]
    assert len(everything) == 1 and "ran out of time" in everything[0]["reason"]
    table = (tmp_path / "frontier.md").read_text()
    assert table.count("**not measured**") == 3
    assert "0 of 3 points measured" in done.stderr
    # a rerun of the same configuration resumes: it reuses every point written so far
    again = frontier(*TINY, "--budgets", "2000,1e9", "--time-budget-s", "0.001", "--out",
                     str(tmp_path))  # fmt: skip
    assert again.returncode == 0 and "resuming: 3 point(s)" in again.stderr
    assert "(and 3 point(s) from an earlier run it resumed)" in again.stderr  # its time is not all
    assert json.loads((tmp_path / "frontier.json").read_text())["points"] == points


def test_budgets_beyond_the_data_add_a_point_with_all_of_it():
    config = FrontierConfig(budgets=(10, 100, 1000))
    assert measured_budgets(config, 500) == [(10, 10), (100, 100), (500, 500), (1000, None)]
    assert measured_budgets(config, 5000) == [(10, 10), (100, 100), (1000, 1000)]


def test_an_image_folder_as_data(tmp_path):
    from pipeline.offline.photos import write_photos_tree

    tree = write_photos_tree(tmp_path / "tree", size=32, scales=(0.5,))
    done = frontier(*TINY, "--data", str(tree), "--image-size", "32", "--statistics-images",
                    "20", "--budgets", "500", "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert str(tree) in result["meta"]["data"]
    assert result["points"][0]["measured"] and result["points"][0]["leaked_blocks"] == 500


def test_plain_shards_on_s3_as_data(s3_env, tmp_path):
    """The owner's plain shards in a bucket (a loopback moto S3 server), read where they are."""
    from pipeline.offline.build import ShardConfig, build_shards
    from pipeline.offline.digits import write_digits_tree

    data = f"s3://{s3_env}/plain"
    src = write_digits_tree(tmp_path / "digits", size=64)
    build_shards(ShardConfig(src=str(src), out=data, size=32, decoder="pil", shard_size="400",
                             plain=True), None)  # fmt: skip
    done = frontier(*TINY, "--data", data, "--statistics-images", "40", "--budgets", "500",
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert data in result["meta"]["data"]
    assert result["points"][0]["measured"] and result["points"][0]["leaked_blocks"] == 500


def test_bad_input_fails_before_any_work(tmp_path):
    done = frontier(*TINY, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "--data" in done.stderr and "missing: not found" in done.stderr
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    done = frontier(*TINY, "--page", str(readme), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "frontier-report:begin" in done.stderr
    assert not (tmp_path / "o").exists()
    done = frontier("--block-sizes", "4,0", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "--block-sizes '4,0'" in done.stderr
    done = frontier("--block-sizes", "4,7", "--out", str(tmp_path / "o"))  # 64 = 9 * 7 + 1
    assert done.returncode == 2 and "do not divide into 7x7 blocks" in done.stderr


def test_a_protected_model_gets_its_accuracy_with_the_estimated_key(
    protected_run, digit_shards, test_key_file, tmp_path
):
    done = frontier(*TINY, "--budgets", "2000,1e9", "--out", str(tmp_path),
                    "--checkpoint", str(protected_run / "checkpoint.pt"), "--key",
                    str(test_key_file), "--model-data", str(digit_shards))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    models = json.loads((tmp_path / "frontier.json").read_text())["models"]
    by = {row["budget_blocks"]: row for row in models}
    row = by[2000]
    assert row["measured"] and row["leaked_blocks"] == 2000 and row["block_size"] == 4
    assert 0 <= row["top1_estimated_key"] <= 1 and 0 <= row["key_recovered"] <= 1
    assert row["top1_correct_key"] > 0.5  # the trained model, with its own key
    assert not by[10**9]["measured"] and "train shards have" in by[10**9]["reason"]
    assert "top-1 with the estimated key" in (tmp_path / "frontier.md").read_text()
    assert done.stdout.count("| 4 |") >= 2  # the model rows are printed with the table


def test_what_leaked_shards_show_is_measured_and_drawn(measured):
    out, _, _ = measured
    point = json.loads((out / "frontier.json").read_text())["points"][0]
    assert point["measured"] and 0 < point["psnr"]["median"] <= 100
    assert -1 <= point["ssim"]["min"] <= point["ssim"]["max"] <= 1
    assert "PSNR dB" in (out / "frontier.md").read_text()
    assert (out / "reconstruction_M4.png").stat().st_size > 1000


def test_image_quality_of_a_reconstruction(photo):
    from attacks.frontier.points import image_quality, reconstruct

    images = np.stack([photo[:64, :64], photo[64:128, 64:128]])
    truth = random_material(4, ("shuffle", "np", "ffx"), np.random.default_rng(0)).encrypt_op
    other = random_material(4, ("shuffle", "np", "ffx"), np.random.default_rng(1)).encrypt_op
    exact = reconstruct(images, truth, truth)
    assert np.array_equal(exact, images) and image_quality(images, exact) == (100.0, 1.0)
    psnr, ssim = image_quality(images, reconstruct(images, truth, other))
    assert psnr < 15 and ssim < 0.3  # a wrong key shows noise
