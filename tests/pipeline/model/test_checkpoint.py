"""Checkpoints are one typed record and untrusted input: every field checked, offline model
names only, mode 0600; the on-disk dict of older checkpoints still loads."""

from __future__ import annotations

import socket
import stat
from dataclasses import replace

import pytest
import torch

from pipeline.model.checkpoint import FIELDS, Checkpoint, CheckpointError
from pipeline.model.evaluation import load_model


@pytest.fixture(scope="module")
def saved(protected_run) -> Checkpoint:
    return Checkpoint.load(protected_run / "checkpoint.pt")


@pytest.fixture(scope="module")
def state(saved) -> dict:
    """The on-disk dict, as train/ddp.py writes it."""
    return saved.to_dict()


@pytest.mark.slow  # trains the session's protected model
def test_the_training_checkpoint_round_trips_and_is_private(protected_run, saved, tmp_path):
    assert stat.S_IMODE((protected_run / "checkpoint.pt").stat().st_mode) == 0o600
    assert saved.model_name and saved.epoch == 3 and saved.world_size == 1
    assert isinstance(saved.classes, tuple) and len(saved.image_shape) == 3
    path = replace(saved, epoch=7).save(tmp_path / "copy.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    again = Checkpoint.load(path)
    assert again.epoch == 7 and again.classes == saved.classes
    assert again.config == saved.config and again.rng[0].keys() == saved.rng[0].keys()
    for name, tensor in saved.model.items():
        assert torch.equal(again.model[name], tensor), name
    on_disk = torch.load(path, map_location="cpu", weights_only=True)
    assert set(on_disk) == {*FIELDS, "decoder", "world_size", "finished", "input_stats", "version"}
    assert on_disk["finished"] is True  # every epoch trained
    assert on_disk["classes"] == list(saved.classes)  # the on-disk form: lists, as before
    assert "optimizer" not in repr(saved.without_state()) and not saved.without_state().model


def test_an_older_checkpoints_dict_loads(state, tmp_path):
    """A dict as train/ddp.py wrote it before the record (no decoder, no world_size)."""
    old = {k: v for k, v in state.items() if k not in ("decoder", "world_size")}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    loaded = Checkpoint.load(path)
    assert loaded.decoder is None and loaded.world_size is None
    assert loaded.ranks == len(state["rng"]) and loaded.crop_size == state["config"]["crop_size"]
    assert loaded.to_dict().keys() == {*old, "decoder"}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_missing_field_is_one_line_naming_it(state, tmp_path, field):
    path = tmp_path / "c.pt"
    torch.save({k: v for k, v in state.items() if k != field}, path)
    with pytest.raises(CheckpointError, match=f"field '{field}' is missing") as info:
        Checkpoint.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classes", "0123", "is a str, expected list"),
        ("block_size", "4", "is a str, expected int or None"),
        ("epoch", True, "is a bool, expected int"),
        ("classes", [], "non-empty list"),
        ("transforms", [1], "'transforms' must be a list of names"),
        ("image_shape", [32, 32], "height, width, channels"),
        ("model_name", "resnet_of_my_dreams", "not one of timm's local architectures"),
        ("version", 2, "checkpoint version 2 is not 1"),
    ],
)
def test_a_wrong_field_is_named(state, tmp_path, field, value, message):
    path = tmp_path / "c.pt"
    torch.save({**state, field: value}, path)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint.load(path)
    assert "\n" not in str(info.value)


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
