"""The report: its verdict, findings, explanations, figure and results-page block."""

from __future__ import annotations

import pytest

from attacks.report import (
    Row,
    Spread,
    accuracy_chart,
    findings,
    markdown,
    page_block,
    table,
    verdict_line,
    verdicts,
)

ROWS = [
    Row("correct_key", 0.9),
    Row("no_key", 0.1),
    Row("wrong_keys", 0.1, budget={"keys": 100}, spread=Spread.of([0.0, 0.1, 0.2])),
    Row("random_key_search", 0.15),
    Row("heuristic_key_search", 0.3),
    Row("ciphertext_only", 0.8),
    Row("finetune_attack_1pct", 0.7, budget={"images": 10}),
    Row("finetune_pretrained_1pct", 0.4, budget={"images": 10}),
    Row("finetune_attack_10pct", 0.91, budget={"images": 100}),
    Row("finetune_pretrained_10pct", 0.9, budget={"images": 100}),
]


def test_findings_say_which_attacks_succeed():
    lines = findings(ROWS)
    verdicts = {line.split("**")[1] for line in lines if line.startswith("**")}
    expected = {
        "no_key fails",
        "random_key_search fails",
        "heuristic_key_search partly succeeds",
        "ciphertext_only succeeds",
        "The stolen model gives a head start",
    }
    assert expected <= verdicts
    assert any(line.startswith("No head start from the stolen model (10pct)") for line in lines)
    assert not any("Some random keys work" in line for line in lines)


def test_table_shows_the_wrong_key_maximum():
    assert "max 20.0%) | - | keys 100 |" in table(ROWS)


def test_wrong_keys_are_a_mean_with_its_interval():
    values = [0.05, 0.1, 0.15] * 40
    row = Row("wrong_keys", 0.1, budget={"keys": 120}, spread=Spread.of(values))
    lo, hi = row.spread.ci95
    assert lo == pytest.approx(0.1 - 1.96 * 0.0410 / 120**0.5, abs=1e-4) and hi > 0.1
    assert row.spread.central95 == (0.05, 0.15)
    assert "| wrong_keys | 10.0% (mean; 95% CI 9.3%-10.7%; 95% of keys 5.0%-15.0%; max 15.0%)" in (
        table([row])
    )
    line = findings([Row("correct_key", 0.9), row])[0]
    assert line.startswith("**Wrong keys**: 10.0% on average over 120 random keys")


def test_rows_become_dicts_only_when_written():
    """results.json's rows: the fields every row has, then only the optional ones set."""
    wrong = Row("wrong_keys", 0.1, budget={"keys": 2}, spread=Spread.of([0.05, 0.15]))
    found = Row("heuristic_key_search", 0.2, 0.5, budget={"steps": 3}, parts={"byte_maps": 0.5},
                attacker_top1=0.3, accepted_moves=1)  # fmt: skip
    assert list(wrong.to_json()) == ["scenario", "top1", "key_recovered", "budget", "top1_ci95",
                                     "top1_central95", "top1_max", "top1_min",
                                     "top1_all"]  # fmt: skip
    assert wrong.to_json()["top1_all"] == [0.05, 0.15] and wrong.best_top1 == 0.15
    assert found.to_json() == {"scenario": "heuristic_key_search", "top1": 0.2,
                               "key_recovered": 0.5, "budget": {"steps": 3},
                               "parts": {"byte_maps": 0.5}, "attacker_top1": 0.3,
                               "accepted_moves": 1}  # fmt: skip
    assert Row("no_key", 0.1).to_json() == {"scenario": "no_key", "top1": 0.1,
                                            "key_recovered": None, "budget": {}}  # fmt: skip


def test_page_block_holds_the_table_and_its_findings():
    body = page_block(ROWS)
    assert "| ciphertext_only | 80.0% |" in body
    assert all(f"- {line}" in body for line in findings(ROWS))


META = {"checkpoint": "ck.pt", "key_fingerprint": "f", "block_size": 4,
        "transforms": ["shuffle", "np", "ffx"], "data": "shards", "val_images": 355, "seed": 0,
        "num_classes": 10,
        "skipped": {"weight_matching": "it needs --reference (the start's weights)"}}  # fmt: skip


def test_the_verdict_per_attacker_follows_the_rows():
    said = {v.short: v for v in verdicts(ROWS, META)}
    assert said["model thief"].holds is True and "chance is 10.0%" in said["model thief"].text
    assert said["shard holder"].holds is False and "80.0%" in said["shard holder"].text
    # the strongest of the key searches and fine-tuning: fine-tuning on 100 images, 91%
    assert said["thief with plain images"].holds is False
    assert "finetune_attack_10pct" in said["thief with plain images"].text
    assert verdict_line(said.values()).startswith("model thief holds; ")
    weak = [Row("correct_key", 0.9), Row("wrong_keys", 0.1, spread=Spread.of([0.1, 0.1])),
            Row("ciphertext_only", 0.12)]  # fmt: skip
    assert {v.short: v.holds for v in verdicts(weak, META)}["shard holder"] is True


def test_the_report_opens_with_the_verdict_and_explains_itself():
    rows = [*ROWS, Row("known_plaintext_1", 0.9, key_recovered=0.4, budget={"pairs": 1},
                       parts={"permutation": 1.0, "byte_maps": 0.3})]  # fmt: skip
    text = markdown(rows, META)
    assert text.index("## Verdict") < text.index("| scenario |")
    assert "**A model thief (the model, no key): the protection holds.**" in text
    assert "*key recovered* is the fraction" in text and "equivalent on the images" in text
    assert "- *byte_maps*: each position's whole byte map" in text
    assert "- *permutation*:" in text and "- *ffx_table*" not in text  # only parts shown
    assert "Not run: weight_matching (it needs --reference" in text
    assert "| finetune_attack_1pct (10 images) |" in text


def test_source_matching_and_the_reconstruction_quality():
    """The source-matching row has its own attacker and finding; PSNR and SSIM, where rows have
    them, are a line under the table and in results.json (and nowhere else)."""
    matched = Row("source_matching", 0.89, 0.4, psnr=100.0, ssim=1.0,
                  budget={"leaked_images": 300, "public_images": 348, "matched": 299,
                          "ambiguous": 1, "pairs_used": 4, "seconds": 0.5})  # fmt: skip
    guessed = Row("ciphertext_only", 0.8, 0.01, psnr=17.84, ssim=0.685)
    rows = [*ROWS[:5], guessed, matched]
    assert matched.to_json()["psnr"] == 100.0 and matched.to_json()["ssim"] == 1.0
    said = {v.short: v for v in verdicts(rows, META)}
    assert said["shards + public data"].holds is False
    assert "299 of 300 leaked images" in said["shards + public data"].text
    assert any(line.startswith("**source_matching succeeds**") and "(1 ambiguous)" in line
               for line in findings(rows))  # fmt: skip
    text = markdown(rows, META)
    line = ("ciphertext_only PSNR 17.8 dB, SSIM 0.685; source_matching PSNR 100.0 dB (exact), "
            "SSIM 1.000.")  # fmt: skip
    assert line in text and line in page_block(rows)
    assert "- source_matching: leaked encrypted train shards and the public dataset" in text
    assert "![reconstruction](reconstruction.png)" in text
    assert "PSNR" not in markdown(ROWS, META) and "reconstruction" not in markdown(ROWS, META)


def test_the_chart_draws_chance_and_the_correct_key_and_sets_attacks_apart(tmp_path):
    ax = accuracy_chart(ROWS, tmp_path / "a.png", chance=0.1)
    assert (tmp_path / "a.png").stat().st_size > 1000
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"chance 10.0%", "correct key 90.0%", "attack", "no key / wrong keys"} <= labels
    lines = {round(line.get_xdata()[0], 3) for line in ax.get_lines() if len(line.get_xdata())}
    assert {10.0, 90.0} <= lines
    colours = {t.get_text(): bar.get_facecolor() for t, bar in
               zip(ax.get_yticklabels(), ax.patches, strict=False)}  # fmt: skip
    assert colours["ciphertext_only"] != colours["correct_key"]
