"""frontier.json's records: each shape a point or a model row can take is written with the
keys, in the order and with the values it has always had, and reads back to the same record."""

from __future__ import annotations

import json

import pytest

from attacks.frontier import Frontier, FrontierPoint, ModelPoint

SUMMARY = {"median": 0.5, "min": 0.25, "max": 0.75, "all": [0.25, 0.5, 0.75]}
HEAD = {"block_size": 4, "transforms": ["shuffle", "np"], "budget_blocks": 10_000,
        "leaked_blocks": 10_000, "keys": 3, "statistics_blocks": 3000}  # fmt: skip
POINTS = [
    {**HEAD, "leaked_blocks": None, "measured": False, "reason": "the data has 9,000 blocks"},
    {**HEAD, "seconds": SUMMARY, "measured": False, "reason": "key 1 of 3 ran out of time"},
    {**HEAD, "seconds": SUMMARY, "measured": True, "candidates": 96,
     "parts": {"permutation": SUMMARY, "key_recovered": SUMMARY}},
]  # fmt: skip
MODEL = {"checkpoint": "c.pt", "key_fingerprint": "ab12", "block_size": 4,
         "budget_blocks": 10_000, "leaked_blocks": 10_000, "top1_correct_key": 0.9}  # fmt: skip
MODELS = [
    {**MODEL, "measured": False, "reason": "ran out of the 600 s time budget"},
    {**MODEL, "measured": True, "top1_estimated_key": 0.8, "key_recovered": 0.7,
     "parts": {"permutation": 1.0}, "seconds": 12.5, "statistics_images": 100},
]  # fmt: skip


@pytest.mark.parametrize("point", POINTS)
def test_a_point_keeps_its_keys_order_and_values(point):
    record = FrontierPoint.from_json(json.loads(json.dumps(point)))
    assert record.transforms == ("shuffle", "np")
    assert json.dumps(record.to_json()) == json.dumps(point)


@pytest.mark.parametrize("row", MODELS)
def test_a_model_row_keeps_its_keys_order_and_values(row):
    assert json.dumps(ModelPoint.from_json(row).to_json()) == json.dumps(row)


def test_a_whole_frontier_round_trips():
    result = {"meta": {"keys": 3, "complete": True}, "points": POINTS, "models": MODELS}
    assert json.dumps(Frontier.from_json(result).to_json()) == json.dumps(result)


def test_an_unknown_key_is_refused():
    with pytest.raises(TypeError):
        FrontierPoint.from_json({**POINTS[0], "extra": 1})
