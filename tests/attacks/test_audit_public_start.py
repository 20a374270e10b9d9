"""The fine-tuning reference rows start from public weights the user chose (``--pretrained``) or
the packaged weights of the model, never from what the checkpoint records: its ``pretrained``
may be the hub or a file, and neither is reached. Without public weights those rows are skipped
with the reason in the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.audit import cli as audit_cli
from attacks.audit import scenarios
from attacks.audit.config import Audit, AuditConfig, Scenario
from pipeline import Key
from pipeline.model import factory
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.evaluation import EvalSet
from tests.conftest import FIXED_SECRET


def tiny_audit(model_name: str, recorded: str, pretrained: str | None = None) -> Audit:
    """An audit of 8 random 32x32 images, 2 classes; the checkpoint records ``recorded`` as the
    run's start. The stolen model is a tiny one: its architecture does not matter here."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 4)
    data = EvalSet(images, labels, ["a", "b"], None, None, [])
    key = Key(FIXED_SECRET)
    saved = Checkpoint(model_name=model_name, classes=("a", "b"), image_shape=(32, 32, 3),
                       key_fingerprint=key.fingerprint, block_size=key.block_size,
                       transforms=key.transforms, config={"pretrained": recorded})  # fmt: skip
    config = AuditConfig(checkpoint="c.pt", key="k.bin", data="shards", finetune_fractions=(0.5,),
                         finetune_steps=1, pretrained=pretrained, device="cpu")  # fmt: skip
    stolen = factory.create_model("test_efficientnet", num_classes=2, pretrained="none")
    return Audit(config=config, model=stolen.eval(), saved=saved, val=data, encrypted_val=data,
                 train_plain=data, train_encrypted=images, train_total=8,
                 true_op=key.material.encrypt_op,
                 scheme=(key.block_size, key.transforms))  # fmt: skip


@pytest.fixture
def watched(monkeypatch) -> dict[str, list]:
    """The hub refused; every ``pretrained`` the audit builds from and every file loaded."""
    seen: dict[str, list] = {"pretrained": [], "loaded": []}

    def no_hub(*args, **kwargs):
        raise AssertionError("the audit asked the hub")

    real_create, real_load = factory.create_model, torch.load

    def create(*args, **kwargs):
        seen["pretrained"].append(kwargs.get("pretrained"))
        return real_create(*args, **kwargs)

    def load(f, *args, **kwargs):
        assert kwargs.get("weights_only") is True
        seen["loaded"].append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(factory, "from_hub", no_hub)
    monkeypatch.setattr(scenarios, "create_model", create)
    monkeypatch.setattr(torch, "load", load)
    return seen


def names(outcome) -> list[str]:
    return [row.scenario for row in outcome.rows]


def test_a_checkpoint_saying_hub_starts_from_the_packaged_weights(watched):
    outcome = scenarios.finetune_attacks(tiny_audit("tf_efficientnet_lite0", "hub"))
    assert watched["pretrained"] == ["package"] and outcome.skipped is None
    assert watched["loaded"] == [str(factory.packaged_weights_path("tf_efficientnet_lite0"))]
    assert names(outcome) == ["finetune_attack_50pct", "finetune_pretrained_50pct"]


def test_a_checkpoint_naming_a_file_does_not_get_it_loaded(watched, tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(factory.create_model("test_efficientnet", num_classes=2,
                                    pretrained="none").state_dict(), weights)  # fmt: skip
    outcome = scenarios.finetune_attacks(tiny_audit("test_efficientnet", str(weights)))
    assert watched["loaded"] == [] and watched["pretrained"] == []
    assert names(outcome) == ["finetune_attack_50pct"]
    assert outcome.skipped and "--pretrained PATH" in outcome.skipped


def test_without_public_weights_the_reference_rows_are_skipped(watched):
    outcome = scenarios.finetune_attacks(tiny_audit("test_efficientnet", "hub"))
    assert names(outcome) == ["finetune_attack_50pct"] and watched["pretrained"] == []
    assert "no package ships them" in (outcome.skipped or "")


def test_the_command_line_chooses_a_local_file_or_the_hub(watched, tmp_path, monkeypatch):
    weights = tmp_path / "public.pth"  # ImageNet-like: 1000 classes, the head is replaced
    torch.save(factory.create_model("test_efficientnet", num_classes=1000,
                                    pretrained="none").state_dict(), weights)  # fmt: skip
    outcome = scenarios.finetune_attacks(tiny_audit("test_efficientnet", "hub", str(weights)))
    assert watched["loaded"] == [str(weights)] and outcome.skipped is None
    assert names(outcome) == ["finetune_attack_50pct", "finetune_pretrained_50pct"]
    asked: list[str] = []

    def hub(model_name, *, num_classes, model_kwargs):  # stands in for the download
        asked.append(model_name)
        return factory.create_model(model_name, num_classes=num_classes, pretrained="none")

    monkeypatch.setattr(factory, "from_hub", hub)
    outcome = scenarios.finetune_attacks(tiny_audit("test_efficientnet", "none", "hub"))
    assert asked == ["test_efficientnet"] and len(outcome.rows) == 2


def test_pretrained_on_the_command_line_must_be_a_file_package_or_hub(tmp_path, capsys):
    base = ["--key", "k.bin", "--scenarios", Scenario.FINETUNE.value]
    with pytest.raises(SystemExit) as info:
        audit_cli.parse_args([*base, "--pretrained", str(tmp_path / "missing.pth")])
    assert info.value.code == 2 and "is not a file" in capsys.readouterr().err
    for value in ("package", "hub"):
        assert audit_cli.parse_args([*base, "--pretrained", value]).pretrained == value
