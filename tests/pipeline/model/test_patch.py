"""Patch embeddings: found in isotropic timm models (not in CNNs), and keys absorbed exactly."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch
from timm.models.convmixer import ConvMixer

from pipeline import encrypt
from pipeline.cipher.keys import Key
from pipeline.model.patch import (
    PatchAlignmentError,
    absorb_key,
    find_patch_embedding,
    require_patch_embedding,
)
from pipeline.stream.dataset import to_model_input

CPU = torch.device("cpu")


@functools.cache
def _vit(patch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=patch, depth=1,
                             num_classes=10).eval()  # fmt: skip


def vit(patch: int) -> torch.nn.Module:
    """A random-init ViT at 32x32, one block: a fresh copy of the same weights each call."""
    return copy.deepcopy(_vit(patch))


def make_key(block: int, transforms: tuple[str, ...], seed: int = 0) -> Key:
    """A fixed key (the property holds for every key; fixed ones keep failures reproducible)."""
    return Key(np.random.default_rng([seed, block]).bytes(32), block, transforms)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Random images with some structure (smooth ramps plus noise): values over the whole range."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None, None] * rng.random((n, 1, 1, 3))
    noise = rng.integers(0, 256, (n, size, size, 3))
    return ((ramp + noise) / 2).astype(np.uint8)


def logits(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(to_model_input(torch.from_numpy(x), CPU))


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "patch", "where"),
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, 32, 8,
         "patch_embed.proj"),
        ("deit_tiny_patch16_224", {"img_size": 32, "depth": 1}, 32, 16, "patch_embed.proj"),
        ("mixer_s16_224", {"img_size": 32}, 32, 16, "stem.proj"),
        (ConvMixer, {"dim": 32, "depth": 1, "patch_size": 7}, 28, 7, "stem.0"),
    ],
)  # fmt: skip
def test_finds_patch_embedding_of_isotropic_models(name, kwargs, size, patch, where):
    # timm's convmixer_* fix their width and depth; the class itself is the same model, smaller
    build = timm.create_model if isinstance(name, str) else lambda _, **kw: name(**kw)
    model = build(name, num_classes=10, **kwargs)
    found = find_patch_embedding(model, image_size=size)
    assert found is not None
    assert (found.name, found.patch_size) == (where, patch)
    assert found.conv is model.get_submodule(where)


@pytest.mark.parametrize("name", ["resnet18", "test_efficientnet"])
def test_cnns_have_none_and_are_refused_with_the_reason(name):
    model = timm.create_model(name, num_classes=10)
    assert find_patch_embedding(model, image_size=32) is None
    with pytest.raises(PatchAlignmentError, match="no patch embedding: its first layer .*kernel"):
        require_patch_embedding(model, image_size=32, block_size=4)


def test_first_layer_must_take_the_input_unchanged():
    """A conv of kernel = stride behind another layer is not a patch embedding of the input."""
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(3, 8, 4, stride=4))
    assert find_patch_embedding(model, image_size=16) is None
    scaled = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4))
    assert find_patch_embedding(scaled, image_size=16).patch_size == 4


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize(
    "transforms", [("shuffle",), ("np",), ("shuffle", "np"), ("np", "shuffle")]
)
def test_absorbed_model_on_encrypted_images_is_the_plain_model(patch, transforms):
    plain_model = vit(patch)
    key = make_key(patch, transforms)
    x = images(8, 32)
    expected = logits(plain_model, x)
    protected = vit(patch)  # the same weights (same seed), absorbed
    absorb_key(protected, key, image_size=32)
    got = logits(protected, encrypt(x, key))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the key did change the model: it is not the plain model any more
    assert not torch.allclose(logits(protected, x), expected, atol=1e-2)
    # the other order of the same key material is a different encryption: it breaks the model
    # (only the order the key names is absorbed)
    if len(transforms) == 2:
        other = Key(key.secret, patch, transforms[::-1])
        assert not torch.allclose(logits(protected, encrypt(x, other)), expected, atol=1e-2)


def test_absorbed_convmixer_with_batchnorm_is_exact():
    torch.manual_seed(0)
    model = ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=7, num_classes=10)
    with torch.no_grad():  # running statistics other than the initial (0, 1)
        model(to_model_input(torch.from_numpy(images(16, 28, seed=1)), CPU))
    model.eval()
    key = make_key(7, ("np", "shuffle"))
    x = images(4, 28)
    expected = logits(model, x)
    absorb_key(model, key, image_size=28)
    torch.testing.assert_close(logits(model, encrypt(x, key)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transforms", [("shuffle", "np", "ffx"), ("ffx",), ("ffx", "shuffle")])
def test_ffx_is_refused(transforms):
    model = vit(8)
    before = model.patch_embed.proj.weight.clone()
    with pytest.raises(PatchAlignmentError, match="FFX.*cannot be absorbed.*shuffle,np"):
        absorb_key(model, make_key(8, transforms), image_size=32)
    assert torch.equal(model.patch_embed.proj.weight, before)  # nothing half-written


@pytest.mark.parametrize(("block", "reason"), [(4, "smaller block"), (16, "spans several")])
def test_block_size_other_than_patch_is_refused(block, reason):
    model = vit(8)
    with pytest.raises(PatchAlignmentError, match=f"block size {block} is not the patch size 8"):
        absorb_key(model, make_key(block, ("shuffle",)), image_size=32)
    with pytest.raises(PatchAlignmentError, match=reason):
        require_patch_embedding(model, image_size=32, block_size=block)


def test_wrong_input_size_is_explained():
    with pytest.raises(PatchAlignmentError, match="does not take a 48x48 input.*img_size"):
        find_patch_embedding(vit(8), image_size=48)
