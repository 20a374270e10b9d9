"""Checkpoints are untrusted input: every field checked, offline model names only, mode 0600."""

from __future__ import annotations

import socket
import stat

import pytest
import torch

from pipeline.model.checkpoint import FIELDS, CheckpointError, load_checkpoint, save_checkpoint
from pipeline.model.evaluation import load_model


@pytest.fixture(scope="module")
def state(protected_run) -> dict:
    return load_checkpoint(protected_run / "checkpoint.pt")


def test_the_training_checkpoint_loads_and_is_private(protected_run, state, tmp_path):
    assert stat.S_IMODE((protected_run / "checkpoint.pt").stat().st_mode) == 0o600
    path = save_checkpoint(state, tmp_path / "copy.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    assert load_checkpoint(path)["model_name"] == state["model_name"]


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_missing_field_is_one_line_naming_it(state, tmp_path, field):
    path = tmp_path / "c.pt"
    torch.save({k: v for k, v in state.items() if k != field}, path)
    with pytest.raises(CheckpointError, match=f"field '{field}' is missing") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classes", "0123", "is a str, expected list"),
        ("block_size", "4", "is a str, expected int or None"),
        ("epoch", True, "is a bool, expected int"),
        ("classes", [], "non-empty list"),
        ("image_shape", [32, 32], "height, width, channels"),
        ("model_name", "resnet_of_my_dreams", "not one of timm's local architectures"),
    ],
)
def test_a_wrong_field_is_named(state, tmp_path, field, value, message):
    path = tmp_path / "c.pt"
    torch.save({**state, field: value}, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "timm/resnet18", "hf_hub:x/y"])
def test_no_checkpoint_can_make_a_tool_reach_the_network(state, tmp_path, monkeypatch, name):
    def no_network(*args, **kwargs):
        raise AssertionError("a checkpoint made the tool open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = tmp_path / "c.pt"
    torch.save({**state, "model_name": name}, path)
    with pytest.raises(CheckpointError, match="model_name"):
        load_model(str(path))
