"""The report's generated findings and the README block."""

from __future__ import annotations

import pytest

from attacks.report import README_BEGIN, README_END, findings, table, update_readme


def _row(scenario, top1, **extra):
    return {"scenario": scenario, "top1": top1, "key_recovered": None, "budget": {}, **extra}


ROWS = [
    _row("correct_key", 0.9),
    _row("no_key", 0.1),
    _row("wrong_keys", 0.1, top1_max=0.2, budget={"keys": 100}),
    _row("random_key_search", 0.15),
    _row("heuristic_key_search", 0.3),
    _row("ciphertext_only", 0.8),
    _row("finetune_attack_1pct", 0.7, budget={"images": 10}),
    _row("finetune_pretrained_1pct", 0.4, budget={"images": 10}),
    _row("finetune_attack_10pct", 0.91, budget={"images": 100}),
    _row("finetune_pretrained_10pct", 0.9, budget={"images": 100}),
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
    assert "| wrong_keys | 10.0% (max 20.0%) | - | keys 100 |" in table(ROWS)


def test_wrong_keys_are_a_mean_with_its_interval():
    from attacks.audit import spread

    values = [0.05, 0.1, 0.15] * 40
    row = _row("wrong_keys", 0.1, budget={"keys": 120}, **spread(values))
    lo, hi = row["top1_ci95"]
    assert lo == pytest.approx(0.1 - 1.96 * 0.0410 / 120**0.5, abs=1e-4) and hi > 0.1
    assert row["top1_central95"] == [0.05, 0.15]
    assert "| wrong_keys | 10.0% (mean; 95% CI 9.3%-10.7%; 95% of keys 5.0%-15.0%; max 15.0%)" in (
        table([row])
    )
    line = findings([_row("correct_key", 0.9), row])[0]
    assert line.startswith("**Wrong keys**: 10.0% on average over 120 random keys")


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{README_BEGIN}\nold\n{README_END}\nb\n")
    update_readme(readme, ROWS, {"val_images": 7})
    text = readme.read_text()
    assert text.startswith(f"a\n{README_BEGIN}\n") and text.endswith(f"{README_END}\nb\n")
    assert "old" not in text and "| ciphertext_only | 80.0% |" in text and "7 held-out" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- attacks-report:begin -->"):
        update_readme(readme, ROWS, {"val_images": 7})
    assert readme.read_text() == "no markers\n"
