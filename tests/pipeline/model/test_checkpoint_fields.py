"""Checkpoint fields that name weights, decoders or shapes are checked on load like the others:
one line naming the file, the field and its value; none of them makes a tool reach the network
or ``torch.load`` another file."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import factory
from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.model.classifier import ProtectedClassifier
from pipeline.model.evaluation import load_model


@pytest.fixture(scope="module")
def good() -> Checkpoint:
    model = factory.create_model("test_efficientnet", num_classes=2, pretrained="none")
    return Checkpoint(model_name="test_efficientnet", classes=("a", "b"), image_shape=(32, 32, 3),
                      key_fingerprint=None, block_size=4, transforms=("shuffle", "np"),
                      decoder="pil", config={"pretrained": "package", "crop_size": None},
                      model=model.state_dict())  # fmt: skip


def saved_with(good: Checkpoint, path, **changes) -> str:
    """``good`` saved with the project's own save, then one on-disk field changed."""
    good.save(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, value in changes.items():
        if name.startswith("config."):
            state["config"][name.removeprefix("config.")] = value
        else:
            state[name] = value
    torch.save(state, path)
    return str(path)


def refused(path: str, *words: str) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(path)
    for word in words:
        assert word in message, message
    return message


def test_the_good_one_loads(good, tmp_path):
    loaded = Checkpoint.load(saved_with(good, tmp_path / "c.pt"))
    assert loaded.decoder == "pil" and loaded.image_shape == (32, 32, 3)


@pytest.mark.parametrize("decoder", ["../../evil", "nvjpeg", ""])
def test_an_unknown_decoder_is_refused(good, tmp_path, decoder):
    path = saved_with(good, tmp_path / "c.pt", decoder=decoder)
    refused(path, "'decoder'", repr(decoder), "pil, dali")


@pytest.mark.parametrize(
    "shape",
    [[100000, 100000, 3], [32, 32, 1], [4, 4, 3], [32, 30, 3], [32, 32, 3, 1], [32, True, 3]],
)
def test_an_image_shape_make_shards_cannot_store_is_refused(good, tmp_path, shape):
    path = saved_with(good, tmp_path / "c.pt", image_shape=shape)
    refused(path, "'image_shape'")


def test_a_huge_image_shape_is_blamed_on_the_checkpoint_not_the_photo(good, tmp_path):
    path = saved_with(good, tmp_path / "c.pt", image_shape=[100000, 100000, 3])
    assert "[100000, 100000, 3]" in refused(path, "8..4096")
    with pytest.raises(CheckpointError, match="image_shape"):
        ProtectedClassifier.load(path, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("transforms", ["rot13"]), ("block_size", 0), ("block_size", 300),
     ("config.pretrained", ["hub"]), ("config.init_checkpoint", 7), ("config.key", "a\nb"),
     ("config.model_kwargs", {"checkpoint_path": "w.pth"}), ("config.crop_size", "32")],
)  # fmt: skip
def test_other_fields_naming_weights_or_files_are_checked(good, tmp_path, field, value):
    path = saved_with(good, tmp_path / "c.pt", **{field: value})
    refused(path, f"'{field}'" if field.startswith("config.") else field)


def test_a_decoder_in_a_record_built_here_is_refused_too(good):
    model = factory.create_model("test_efficientnet", num_classes=2, pretrained="none")
    bad = Checkpoint(model_name="test_efficientnet", classes=("a", "b"), image_shape=(32, 32, 3),
                     key_fingerprint=None, decoder="../../evil")  # fmt: skip
    with pytest.raises(CheckpointError, match="decoder '../../evil'"):
        ProtectedClassifier(model, bad, None)


@pytest.mark.parametrize("pretrained", ["hub", "weights"])
def test_the_recorded_start_is_never_opened(good, tmp_path, monkeypatch, pretrained):
    """A run's ``pretrained`` (the hub, or a file) is a record: loading the model for predict
    or the audit neither asks the hub nor ``torch.load``s that file."""
    weights = tmp_path / "weights.pth"
    torch.save(factory.create_model("test_efficientnet", num_classes=2,
                                    pretrained="none").state_dict(), weights)  # fmt: skip
    value = "hub" if pretrained == "hub" else str(weights)
    path = saved_with(good, tmp_path / "c.pt", **{"config.pretrained": value})

    def no_hub(*args, **kwargs):
        raise AssertionError("a checkpoint made the tool ask the hub")

    opened: list[str] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        opened.append(str(f))
        assert kwargs.get("weights_only") is True
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(factory, "from_hub", no_hub)
    monkeypatch.setattr(torch, "load", spy)
    model, saved = load_model(path)
    assert saved.pretrained == value  # kept as the record it is
    ProtectedClassifier.load(path, None)
    assert opened == [path, path]
