"""Block-wise transforms: exact inverses, numpy == torch, the README spec, and hiding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline import Key, KeyMaterial, decrypt, encrypt
from tests.conftest import ALL_ORDERS, FIXED_SECRET, random_images


def reference_encrypt(image: np.ndarray, info: dict) -> np.ndarray:
    """Straight from the README: the `--inspect` JSON only, one block and transform at a time."""
    m = info["block_size"]
    h, w, _ = image.shape
    out = image.copy()
    for by in range(0, h, m):
        for bx in range(0, w, m):
            v = out[by : by + m, bx : bx + m, :].reshape(-1).astype(int)  # (row, column, channel)
            for name in info["transforms"]:
                if name == "shuffle":
                    v = np.array([v[j] for j in info["permutation"]])
                elif name == "np":
                    v = np.array(
                        [255 - x if b else x for x, b in zip(v, info["np_mask"], strict=True)]
                    )
                else:
                    table = info["ffx_table"]
                    v = np.array(
                        [table[x] if b else x for x, b in zip(v, info["ffx_mask"], strict=True)]
                    )
            out[by : by + m, bx : bx + m, :] = v.reshape(m, m, 3)
    return out


@pytest.mark.parametrize("order", ALL_ORDERS, ids="+".join)
def test_matches_reference_spec_and_round_trips(order, rng):
    key = Key(FIXED_SECRET, block_size=4, transforms=order)
    images = random_images(rng, (2, 8, 12, 3))
    enc = encrypt(images, key)
    for i in range(len(images)):
        assert np.array_equal(enc[i], reference_encrypt(images[i], key.inspect()))
    assert not np.array_equal(enc, images)
    assert np.array_equal(decrypt(enc, key), images)


@pytest.mark.parametrize("block_size", range(1, 33))
def test_round_trip_every_block_size(block_size, rng):
    key = Key(FIXED_SECRET, block_size=block_size)
    images = random_images(rng, (2, 2 * block_size, 3 * block_size, 3))
    enc = encrypt(images, key)
    assert enc.shape == images.shape and enc.dtype == np.uint8
    assert np.array_equal(decrypt(enc, key), images)
    assert np.array_equal(encrypt(decrypt(images, key), key), images)


@pytest.mark.parametrize("order", ALL_ORDERS, ids="+".join)
def test_torch_equals_numpy(order, rng):
    key = Key(FIXED_SECRET, block_size=4, transforms=order)
    images = random_images(rng, (3, 16, 20, 3))
    tensor = torch.from_numpy(images.copy())
    enc_t = encrypt(tensor, key)
    assert isinstance(enc_t, torch.Tensor) and enc_t.dtype == torch.uint8
    assert enc_t.shape == tensor.shape and enc_t.device == tensor.device
    assert np.array_equal(enc_t.numpy(), encrypt(images, key))
    assert torch.equal(decrypt(enc_t, key), tensor)


def test_single_image_equals_batch_and_inputs_untouched(fixed_key, rng):
    images = random_images(rng, (4, 12, 8, 3))
    before = images.copy()
    batch = encrypt(images, fixed_key)
    for i in range(4):
        assert np.array_equal(encrypt(images[i], fixed_key), batch[i])
    assert np.array_equal(images, before)
    tensor = torch.from_numpy(images)
    encrypt(tensor, fixed_key)
    assert np.array_equal(tensor.numpy(), before)


def test_non_contiguous_inputs(fixed_key, rng):
    images = random_images(rng, (4, 16, 16, 3))
    view = images[::2]  # strided views of both kinds
    assert np.array_equal(encrypt(view, fixed_key), encrypt(view.copy(), fixed_key))
    tview = torch.from_numpy(images)[::2]
    assert np.array_equal(encrypt(tview, fixed_key).numpy(), encrypt(view.copy(), fixed_key))


def test_block_aligned_crop_commutes_with_encryption(fixed_key, photo):
    """What lets pre-encrypted shards take random crops: crop(enc(x)) == enc(crop(x))."""
    m = fixed_key.block_size
    enc = encrypt(photo, fixed_key)
    for top, left in [(0, 0), (4 * m, 7 * m), (13 * m, 2 * m)]:
        crop = np.s_[top : top + 64, left : left + 96]
        assert np.array_equal(enc[crop], encrypt(photo[crop], fixed_key))
    misaligned = np.s_[1 : 1 + 64, 0:96]
    assert not np.array_equal(enc[misaligned], encrypt(photo[misaligned], fixed_key))


def test_size_not_divisible_names_both(fixed_key):
    with pytest.raises(ValueError, match=r"18x16 .* block size 4"):
        encrypt(np.zeros((18, 16, 3), np.uint8), fixed_key)
    with pytest.raises(ValueError, match=r"16x10 .* block size 4"):
        decrypt(torch.zeros((2, 16, 10, 3), dtype=torch.uint8), fixed_key)


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((16, 16, 3), np.float32), TypeError),
        (np.zeros((16, 16), np.uint8), ValueError),
        (np.zeros((16, 16, 4), np.uint8), ValueError),
        (np.zeros((1, 1, 16, 16, 3), np.uint8), ValueError),
        (torch.zeros((16, 16, 3), dtype=torch.int64), TypeError),
    ],
)
def test_bad_images_rejected(fixed_key, bad, error):
    with pytest.raises(error):
        encrypt(bad, fixed_key)


def test_different_keys_give_different_ciphertexts(rng):
    images = random_images(rng, (16, 16, 3))
    a, b = Key(FIXED_SECRET), Key(bytes(32))
    enc = encrypt(images, a)
    assert not np.array_equal(enc, encrypt(images, b))
    assert np.mean(decrypt(enc, b) == images) < 0.2  # a wrong key does not decrypt


def adjacent_correlation(image: np.ndarray) -> float:
    x = image.astype(np.float64)
    return float(
        np.mean([np.corrcoef(x[:, :-1, c].ravel(), x[:, 1:, c].ravel())[0, 1] for c in range(3)])
    )


def test_encryption_hides_structure_of_a_real_photo(photo):
    assert adjacent_correlation(photo) > 0.8
    for i in range(5):
        key = Key(bytes([i + 1]) * 32, block_size=4)  # shuffle+np+ffx, M=4
        assert abs(adjacent_correlation(encrypt(photo, key))) < 0.15


def test_key_material_validation():
    good = Key(FIXED_SECRET).material
    fields = dict(
        block_size=4,
        transforms=("shuffle",),
        permutation=good.permutation,
        np_mask=good.np_mask,
        ffx_mask=good.ffx_mask,
        ffx_table=good.ffx_table,
    )
    KeyMaterial(**fields)
    with pytest.raises(ValueError, match="permutation"):
        KeyMaterial(**{**fields, "permutation": np.zeros(48, int)})
    with pytest.raises(ValueError, match="np_mask"):
        KeyMaterial(**{**fields, "np_mask": np.full(48, 2)})
    with pytest.raises(ValueError, match="ffx_table"):
        KeyMaterial(**{**fields, "ffx_table": np.zeros(256, int)})
    with pytest.raises(ValueError, match="unknown transform"):
        KeyMaterial(**{**fields, "transforms": ("rotate",)})
    with pytest.raises(ValueError, match="repeat"):
        KeyMaterial(**{**fields, "transforms": ("np", "np")})


def test_estimated_material_is_usable(rng):
    """Attacks build material directly (no secret): encrypt accepts a KeyMaterial."""
    key = Key(FIXED_SECRET)
    m = key.material
    images = random_images(rng, (8, 8, 3))
    same = KeyMaterial(4, key.transforms, m.permutation, m.np_mask, m.ffx_mask, m.ffx_table)
    assert np.array_equal(encrypt(images, same), encrypt(images, key))


@st.composite
def cases(draw):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, 3))
    h = m * draw(st.integers(1, 4))
    w = m * draw(st.integers(1, 4))
    order = draw(st.sampled_from(ALL_ORDERS))
    secret = draw(st.binary(min_size=32, max_size=32))
    seed = draw(st.integers(0, 2**32 - 1))
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    return Key(secret, m, order), images


@given(cases())
def test_property_round_trip_and_backends_agree(case):
    key, images = case
    enc = encrypt(images, key)
    assert np.array_equal(decrypt(enc, key), images)
    assert np.array_equal(encrypt(torch.from_numpy(images), key).numpy(), enc)
    assert np.array_equal(enc[0], reference_encrypt(images[0], key.inspect()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy_without_host_sync(fixed_key, rng):
    images = random_images(rng, (8, 64, 64, 3))
    x = torch.from_numpy(images).cuda()
    decrypt(encrypt(x, fixed_key), fixed_key)  # first calls upload the cached index tensors
    torch.cuda.set_sync_debug_mode("error")  # any device->host sync now raises
    try:
        enc = encrypt(x, fixed_key)
        dec = decrypt(enc, fixed_key)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert enc.device == x.device and dec.device == x.device
    assert np.array_equal(enc.cpu().numpy(), encrypt(images, fixed_key))
    assert torch.equal(dec, x)


def test_chunked_application_matches_whole_batch(fixed_key, rng, monkeypatch):
    import pipeline.cipher.blockwise as blockwise

    images = random_images(rng, (5, 16, 24, 3))  # 20 bands of 4 x 24 x 3 = 288 bytes
    whole = encrypt(images, fixed_key)
    monkeypatch.setattr(blockwise, "_CHUNK_BYTES", 3 * 288 + 100)  # 3 bands a chunk, 2 left
    step = blockwise._CHUNK_BYTES // 288
    assert step == 3 and 20 % step == 2
    fresh = Key(fixed_key.secret, fixed_key.block_size)  # no cached plans
    assert np.array_equal(encrypt(images, fresh), whole)
    assert np.array_equal(decrypt(whole, fresh), images)


def test_transform_enum_matches_names_and_normalises_to_plain_strings():
    from pipeline.cipher.blockwise import TRANSFORMS, Transform, check_transforms

    assert TRANSFORMS == ("shuffle", "np", "ffx")
    assert [t.value for t in Transform] == list(TRANSFORMS)
    assert Transform.NP == "np" and str(Transform.FFX) == "ffx"
    names = check_transforms([Transform.FFX, "shuffle"])
    assert names == ("ffx", "shuffle")
    assert all(type(n) is str for n in names)
