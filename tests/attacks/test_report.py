"""The report's generated findings and the README block."""

from __future__ import annotations

import pytest

from attacks.report import Row, Spread, findings, page_block, table

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
