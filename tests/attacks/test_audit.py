"""python -m attacks on a model trained in the test: every scenario runs and the numbers hang
together; refusals are clear and the key never leaks into the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pipeline import Key, save_key
from pipeline.model.factory import create_model
from tests.conftest import FIXED_SECRET
from tests.train.conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

SMALL = ["--wrong-keys", "8", "--search-keys", "6", "--search-steps", "6", "--attacker-images",
         "48", "--leaked-images", "300", "--finetune-steps", "4",
         "--known-pairs", "1,3"]  # fmt: skip
NAMES = ["correct_key", "no_key", "wrong_keys", "random_key_search", "heuristic_key_search",
         "ciphertext_only", "known_plaintext_1", "known_plaintext_3", "source_matching",
         "finetune_attack_1pct",
         "finetune_attack_10pct", "finetune_pretrained_1pct",
         "finetune_pretrained_10pct"]  # fmt: skip


def attacks(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "attacks", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def audit(protected_run, digit_shards, test_key_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # the public start of the finetune_pretrained rows (no package ships test_efficientnet's)
    public = out.parent / "public.pth"
    torch.save(create_model("test_efficientnet", num_classes=1000, pretrained="none")
               .state_dict(), public)  # fmt: skip
    readme = out.parent / "README.md"
    readme.write_text("# x\n<!-- attacks-report:begin -->\nold\n<!-- attacks-report:end -->\nend\n")
    done = attacks("--checkpoint", str(protected_run / "checkpoint.pt"), "--key",
                   str(test_key_file), "--data", str(digit_shards), "--out", str(out),
                   "--page", str(readme), "--pretrained", str(public), *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, readme


def test_every_scenario_is_a_row(audit):
    out, done, _ = audit
    rows = json.loads((out / "results.json").read_text())
    assert [r["scenario"] for r in rows] == NAMES
    for row in rows:
        assert set(row) >= {"scenario", "top1", "key_recovered", "budget"}
        assert 0 <= row["top1"] <= 1
        assert row["key_recovered"] is None or 0 <= row["key_recovered"] <= 1
    by = {r["scenario"]: r for r in rows}
    assert by["wrong_keys"]["budget"] == {"keys": 8} and len(by["wrong_keys"]["top1_all"]) == 8
    assert by["random_key_search"]["budget"]["keys_tried"] == 6
    assert (
        by["finetune_attack_10pct"]["budget"]["images"]
        > by["finetune_attack_1pct"]["budget"]["images"]
    )
    assert by["known_plaintext_3"]["budget"]["pairs"] == 3
    assert by["known_plaintext_3"]["budget"]["blocks"] > by["known_plaintext_1"]["budget"]["blocks"]
    assert "| ciphertext_only |" in done.stdout  # the table is printed


def test_the_numbers_are_consistent(audit):
    rows = {r["scenario"]: r for r in json.loads((audit[0] / "results.json").read_text())}
    correct = rows["correct_key"]["top1"]
    assert correct > 0.8 and rows["correct_key"]["key_recovered"] == 1.0
    assert correct > rows["wrong_keys"]["top1"] + 0.3
    assert correct > rows["no_key"]["top1"] + 0.3
    wrong = rows["wrong_keys"]
    assert wrong["top1_max"] >= wrong["top1"]
    lo, hi = wrong["top1_ci95"]
    assert lo <= wrong["top1"] <= hi and hi - lo > 0  # 8 keys do not all give one accuracy
    a, b = wrong["top1_central95"]
    assert wrong["top1_min"] <= a <= b <= wrong["top1_max"]
    assert rows["random_key_search"]["key_recovered"] < 0.5  # 6 random keys find nothing
    # Three known digits (grey: the channels stay ambiguous) give a key the model accepts.
    assert rows["known_plaintext_3"]["top1"] > correct - 0.1
    assert set(rows["known_plaintext_3"]["parts"]) >= {"permutation", "byte_maps"}


def test_source_matching_pairs_the_leaked_digits_and_solves(audit):
    """The digits are their own public source: the shuffled plain train split pairs with the
    300 leaked images, and the pairs give a key the model accepts as its own."""
    rows = {r["scenario"]: r for r in json.loads((audit[0] / "results.json").read_text())}
    row = rows["source_matching"]
    budget = row["budget"]
    assert budget["leaked_images"] == 300 and budget["public_images"] >= 300
    assert budget["matched"] + budget["ambiguous"] <= 300 and budget["matched"] >= 270
    assert 1 <= budget["pairs_used"] <= 4 and budget["seconds"] > 0
    assert set(row["parts"]) >= {"permutation", "byte_maps"}
    assert row["parts"]["byte_maps"] > 0.9 and row["top1"] > rows["correct_key"]["top1"] - 0.05
    assert "| source_matching |" in audit[1].stdout


def test_leaked_images_decrypted_with_the_estimates(audit):
    """PSNR and SSIM of leaked images decrypted with each key estimated from them; the figure
    shows them beside their plain versions, so it is the owner's only."""
    out = audit[0]
    rows = {r["scenario"]: r for r in json.loads((out / "results.json").read_text())}
    for name in ("ciphertext_only", "source_matching"):
        assert 0 < rows[name]["psnr"] <= 100 and -1 <= rows[name]["ssim"] <= 1
    assert rows["source_matching"]["psnr"] > rows["ciphertext_only"]["psnr"]
    assert rows["source_matching"]["ssim"] > 0.99  # every byte map solved: decrypted exactly
    assert all("psnr" not in rows[n] for n in ("correct_key", "known_plaintext_1"))
    report = (out / "report.md").read_text()
    assert "ciphertext_only PSNR " in report and "source_matching PSNR " in report
    assert "![reconstruction](reconstruction.png)" in report
    with Image.open(out / "reconstruction.png") as img:
        assert img.format == "PNG" and img.width > 200
    assert (out / "reconstruction.png").stat().st_mode & 0o777 == 0o600


def test_report_and_figures(audit):
    out, _, readme = audit
    report = (out / "report.md").read_text()
    assert "| scenario | top-1 | key recovered | budget |" in report and "Threat model" in report
    assert "Key space, in bits: shuffle 202.95, np 48, ffx 688" in report
    for name in ("accuracy.png", "wrong_keys.png", "samples.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 200
    # the samples are plain images beside their encryptions under the owner's key: the owner's
    assert (out / "samples.png").stat().st_mode & 0o777 == 0o600
    assert (out / "accuracy.png").stat().st_mode & 0o077 != 0  # nothing secret: readable
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("end\n") and "old" not in text
    assert "| correct_key |" in text and "_Generated by `" in text and "data: " in text


def test_the_key_never_appears(audit):
    out, done, _ = audit
    secret = FIXED_SECRET.hex()
    assert secret not in done.stdout + done.stderr
    for path in out.iterdir():
        assert secret.encode() not in path.read_bytes() and FIXED_SECRET not in path.read_bytes()


def test_a_wrong_key_is_refused(protected_run, digit_shards, tmp_path):
    other = save_key(Key(bytes(32 * [7])), tmp_path / "other.bin")
    done = attacks("--checkpoint", str(protected_run / "checkpoint.pt"), "--key", str(other),
                   "--data", str(digit_shards), "--out", str(tmp_path / "r"))  # fmt: skip
    assert done.returncode == 2
    assert "attacks: error:" in done.stderr and Key(FIXED_SECRET).fingerprint in done.stderr
    assert Key(bytes(32 * [7])).fingerprint in done.stderr and not (tmp_path / "r").exists()


def test_bad_options_fail_before_any_work(protected_run, digit_shards, test_key_file, tmp_path):
    base = ["--checkpoint", str(protected_run / "checkpoint.pt"), "--key", str(test_key_file),
            "--data", str(digit_shards), "--out", str(tmp_path / "r")]  # fmt: skip
    no_block = tmp_path / "README.md"
    no_block.write_text("# no generated block\n")
    done = attacks(*base, "--page", str(no_block))
    assert done.returncode == 2 and "needs a <!-- attacks-report:begin -->" in done.stderr
    assert not (tmp_path / "r").exists()
    done = attacks(*base, "--scenarios", "correct_key,guessing")
    assert done.returncode == 2 and "unknown scenario(s) ['guessing']" in done.stderr
    done = attacks(*base, "--known-pairs", "1,ten")
    assert done.returncode == 2 and "--known-pairs '1,ten' must be whole numbers" in done.stderr
