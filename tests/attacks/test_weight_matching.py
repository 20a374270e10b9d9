"""Weight matching: an absorbed key, read back from the weights and a reference model."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from attacks.keyspace import key_recovery
from attacks.weight_matching import (
    WeightMatchingError,
    match_patch_embeddings,
    recover_key,
    reference_weight,
)
from pipeline.cipher.keys import Key
from pipeline.model.patch import absorb_key


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                             num_classes=10).eval()  # fmt: skip


def protect(model, key):
    protected = copy.deepcopy(model)
    absorb_key(protected, key, image_size=32)
    return protected


@pytest.mark.parametrize("transforms", [("shuffle", "np"), ("np", "shuffle"), ("shuffle",)])
def test_absorbed_key_is_recovered_exactly(plain, tmp_path, transforms):
    key = Key(bytes(range(32)), 8, transforms)
    protected = protect(plain, key)
    torch.save(plain.state_dict(), tmp_path / "public.pth")  # a bare state dict, as timm's
    match = recover_key(protected, tmp_path / "public.pth", image_size=32, block_size=8,
                        transforms=transforms)  # fmt: skip
    assert match.correlation == pytest.approx(1.0)
    assert key_recovery(match.op, key.material.encrypt_op, transforms).key_recovered == 1.0


def test_fine_tuning_drift_and_unrelated_references(plain):
    key = Key(bytes(range(32)), 8, ("shuffle", "np"))
    truth = key.material.encrypt_op
    weight = protect(plain, key).patch_embed.proj.weight.detach()
    reference = plain.patch_embed.proj.weight.detach()
    # drift as large as a third of the weights' spread: most of the key still shows
    torch.manual_seed(1)
    drifted = weight + torch.randn_like(weight) * weight.std() / 3
    recovered = key_recovery(match_patch_embeddings(drifted, reference, key.transforms).op,
                             truth, key.transforms)  # fmt: skip
    assert recovered.key_recovered > 0.8
    # a model with another start tells nothing: about 1/L of the positions, by chance
    torch.manual_seed(2)
    other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    unrelated = match_patch_embeddings(weight, other.patch_embed.proj.weight, key.transforms)
    assert key_recovery(unrelated.op, truth, key.transforms).parts["permutation"] < 0.05
    assert unrelated.correlation < 0.5


def test_refusals(plain, tmp_path):
    cnn = timm.create_model("test_efficientnet", num_classes=10)
    torch.save(cnn.state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(WeightMatchingError, match="no patch embedding"):
        recover_key(cnn, tmp_path / "cnn.pth", image_size=32, block_size=8, transforms=("np",))
    with pytest.raises(WeightMatchingError, match="block size 4 is not the patch size 8"):
        recover_key(plain, tmp_path / "cnn.pth", image_size=32, block_size=4,
                    transforms=("shuffle",))  # fmt: skip
    with pytest.raises(WeightMatchingError, match="of shape"):  # another architecture
        reference_weight(tmp_path / "cnn.pth", "patch_embed.proj", (192, 3, 8, 8))
    with pytest.raises(WeightMatchingError, match="not found"):
        reference_weight(tmp_path / "none.pth", "patch_embed.proj", (192, 3, 8, 8))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightMatchingError, match="not readable"):
        reference_weight(tmp_path / "junk.pth", "patch_embed.proj", (192, 3, 8, 8))
