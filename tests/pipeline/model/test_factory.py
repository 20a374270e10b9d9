"""Model arguments from the command line and from checkpoints: architecture only, no weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.model.evaluation import load_model
from pipeline.model.factory import create_model, parse_model_kwargs


def test_parse_model_kwargs():
    assert parse_model_kwargs("img_size=32, patch_size=8,class_token=false,global_pool=avg,"
                              "drop_rate=0.1") == {
        "img_size": 32, "patch_size": 8, "class_token": False, "global_pool": "avg",
        "drop_rate": 0.1,
    }  # fmt: skip
    assert parse_model_kwargs("") == {}


@pytest.mark.parametrize(
    ("text", "reason"),
    [("pretrained=true", "may not be set"), ("pretrained_cfg_overlay=x", "may not be set"),
     ("checkpoint_path=a", "may not be set"), ("num_classes=3", "may not be set"),
     ("x=hf-hub:timm/vit", "a number, a boolean or a name"), ("x=../w.pth", "a name"),
     ("depth", "NAME=VALUE")],
)  # fmt: skip
def test_arguments_that_name_weights_files_or_urls_are_refused(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_model_kwargs(text)


def test_a_checkpoint_cannot_smuggle_them_in(tmp_path):
    model = create_model("test_efficientnet", num_classes=3, pretrained="none")
    saved = Checkpoint(
        model_name="test_efficientnet",
        classes=("a", "b", "c"),
        image_shape=(32, 32, 3),
        key_fingerprint=None,
        config={"model_kwargs": {"pretrained": True}},
        model=model.state_dict(),
    )
    saved.save(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: field .config.model_kwargs.*pretrained"):
        load_model(str(tmp_path / "bad.pt"))
    replace(saved, config={"model_kwargs": {"drop_rate": 0.2}}).save(tmp_path / "ok.pt")
    loaded, meta = load_model(str(tmp_path / "ok.pt"))
    assert isinstance(loaded, torch.nn.Module)
    assert meta.model_kwargs == {"drop_rate": 0.2}
