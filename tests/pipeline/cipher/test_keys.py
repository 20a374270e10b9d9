"""Keys: known-answer vectors, the documented derivation, the file format and secret hygiene."""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import stat
from collections import Counter

import numpy as np
import pytest

from pipeline import Key, KeyFileError, encrypt, load_key, save_key
from pipeline.cipher.keys import MAGIC
from tests.conftest import FIXED_SECRET


def sha(array: np.ndarray, dtype: str) -> str:
    return hashlib.sha256(np.asarray(array).astype(dtype).tobytes()).hexdigest()


# Known answers for derivation version 1 with secret bytes(range(32)). A change here breaks every
# key ever made: bump DERIVATION_VERSION instead.
VECTORS = {
    4: dict(
        permutation="cebff3777dc401c7c11e44fd0d1a1bdbe7b6370ebceb64b42de0bfcea4b3dc85",
        permutation_head=[7, 29, 44, 36, 12, 25, 33, 8],
        np_mask="e847cb251e5cc84d4f865f8edd83bf14b1dffd41b017dadd881d2a1625f85095",
        ffx_mask="3f4d36c419a0ec392f628518134c5b5c588348987704dbdd7fdaa16237941e99",
        ffx_table="b8d0355a97effd8b024f598633b63f1c7a3346f143e884d7c84ccc7f005659ae",
        ffx_table_head=[62, 162, 254, 243, 144, 175, 105, 202],
        order_key="13ec42bab67f719c411c82d295df56a6e670dac1e6fc199d8c26a6a5dd77e705",
    ),
    8: dict(
        permutation="1ba49023c4d4267f174904eff0fafcbb3138a971188d188ad47b4569b03727e6",
        permutation_head=[172, 82, 27, 96, 70, 45, 16, 88],
        np_mask="ade54bb3d0564aa8560cfdfe4cd5ab4c0e365d6b756f15642bd820a7dab3f001",
        ffx_mask="c19aeb44498c97ef0f27d479de95d5c88025e4125111da193beae7dd5fdc917e",
        ffx_table="eeadc2cac2195bbae012a9ac6af1cbfc3e68828ed05736bf522b4bda755156e0",
        ffx_table_head=[235, 230, 16, 32, 164, 180, 229, 128],
        order_key="8870283dc0258df4d505516ccbddc441e715648b44bb6afc04ae6dd59510eb97",
    ),
}
FINGERPRINT = "0b4144ea255ab743743f71b51db262f6"
ENCRYPTED_RAMP = "eddd9365349ecccd93f397de00b1ed781bed46131696fa855ba077907d2517cb"


@pytest.mark.parametrize("block_size", sorted(VECTORS))
def test_known_answer_vectors(block_size):
    key = Key(FIXED_SECRET, block_size=block_size)
    m, v = key.material, VECTORS[block_size]
    assert key.fingerprint == FINGERPRINT
    assert m.permutation[:8].tolist() == v["permutation_head"]
    assert sha(m.permutation, "<i8") == v["permutation"]
    assert sha(m.np_mask, "u1") == v["np_mask"]
    assert sha(m.ffx_mask, "u1") == v["ffx_mask"]
    assert m.ffx_table[:8].tolist() == v["ffx_table_head"]
    assert sha(m.ffx_table, "u1") == v["ffx_table"]
    assert key.order_key.hex() == v["order_key"]


def test_known_answer_ciphertext():
    ramp = np.arange(16 * 16 * 3, dtype=np.uint32).astype(np.uint8).reshape(16, 16, 3)
    assert hashlib.sha256(encrypt(ramp, Key(FIXED_SECRET)).tobytes()).hexdigest() == ENCRYPTED_RAMP


def spec_stream(secret: bytes, label: str, m: int, n: int) -> bytes:
    return hashlib.shake_256(b"keyprotect/v1/%s/M=%d\x00" % (label.encode(), m) + secret).digest(n)


@pytest.mark.parametrize("block_size", [1, 3, 4, 7])
def test_derivation_follows_the_documented_algorithm(block_size):
    """Re-derive from the module docstring alone, so the docs and the code cannot drift apart."""
    secret = hashlib.sha256(b"another secret").digest()
    n = 3 * block_size * block_size
    stream = spec_stream(secret, "permutation", block_size, 64 * n + 64)
    perm, pos = list(range(n)), 0
    for i in range(n - 1, 0, -1):
        while True:
            u = int.from_bytes(stream[pos : pos + 4], "big")
            pos += 4
            if u < 2**32 - (2**32 % (i + 1)):
                break
        j = u % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    np_mask = [b & 1 for b in spec_stream(secret, "np_mask", block_size, n)]
    ffx_mask = [b & 1 for b in spec_stream(secret, "ffx_mask", block_size, n)]
    rounds = spec_stream(secret, "ffx_table", block_size, 160)
    table = []
    for x in range(256):
        left, right = x >> 4, x & 15
        for r in range(10):
            left, right = right, left ^ (rounds[16 * r + right] & 15)
        table.append(left << 4 | right)
    key = Key(secret, block_size)
    m = key.material
    assert key.order_key == spec_stream(secret, "sample_order", block_size, 32)
    assert m.permutation.tolist() == perm
    assert m.np_mask.tolist() == np_mask
    assert m.ffx_mask.tolist() == ffx_mask
    assert m.ffx_table.tolist() == table


def test_derived_material_is_well_formed_and_key_dependent():
    a, b = Key(FIXED_SECRET).material, Key(bytes(32)).material
    assert sorted(a.permutation.tolist()) == list(range(48))
    assert sorted(a.ffx_table.tolist()) == list(range(256))
    assert 0 < a.np_mask.sum() < 48 and 0 < a.ffx_mask.sum() < 48
    assert not np.array_equal(a.permutation, b.permutation)
    assert not np.array_equal(a.ffx_table, b.ffx_table)
    assert not np.array_equal(a.np_mask, Key(FIXED_SECRET, 4).material.ffx_mask)  # own streams


def test_permutation_sampling_is_unbiased():
    """M=1 gives 3! = 6 permutations; over 3000 secrets each should appear about 500 times."""
    counts = Counter(
        tuple(Key(hashlib.sha256(b"%d" % i).digest(), 1).material.permutation) for i in range(3000)
    )
    assert len(counts) == 6
    chi2 = sum((c - 500) ** 2 / 500 for c in counts.values())
    assert chi2 < 20.5  # p = 0.001 for 5 degrees of freedom


def test_generate_uses_fresh_secrets():
    keys = {Key.generate().fingerprint for _ in range(20)}
    assert len(keys) == 20


def test_key_space_bits():
    bits = Key(FIXED_SECRET, 4).key_space_bits()
    assert bits["shuffle"] == pytest.approx(math.log2(math.factorial(48)), abs=0.01)
    assert bits["np"] == 48
    assert bits["total"] == pytest.approx(bits["shuffle"] + bits["np"] + bits["ffx"], abs=0.02)
    assert bits["secret"] == 256
    assert set(Key(FIXED_SECRET, 4, ("np",)).key_space_bits()) == {"np", "total", "secret"}


def test_inspect_lists_material_in_use_only():
    info = Key(FIXED_SECRET, 4, ("np", "shuffle")).inspect()
    assert info["transforms"] == ["np", "shuffle"]
    assert info["version"] == 1 and info["block_size"] == 4
    assert info["fingerprint"] == FINGERPRINT
    assert len(info["permutation"]) == 48 and len(info["np_mask"]) == 48
    assert "ffx_table" not in info and "ffx_mask" not in info


def test_file_round_trip(tmp_path):
    key = Key(FIXED_SECRET, block_size=8, transforms=("ffx", "shuffle"))
    path = save_key(key, tmp_path / "k.bin")
    data = path.read_bytes()
    assert data.startswith(MAGIC) and len(data) == 11 + 2 + 32 + 32
    loaded = load_key(path)
    assert loaded == key and loaded.transforms == ("ffx", "shuffle")


def test_file_mode_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = save_key(Key.generate(), tmp_path / "k.bin")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.bin"
    first = Key.generate()
    save_key(first, path)
    with pytest.raises(FileExistsError, match="already exists"):
        save_key(Key.generate(), path)
    assert load_key(path) == first
    second = Key.generate()
    save_key(second, path, overwrite=True)
    assert load_key(path) == second
    assert [p.name for p in tmp_path.iterdir()] == ["k.bin"]  # no temporary left behind


def corrupt_variants(data: bytes) -> dict[str, bytes]:
    body = bytearray(data[:-32])
    body[8] = 9  # a future format version, with a valid checksum
    flipped = bytearray(data)
    flipped[20] ^= 0x01
    return {
        "empty": b"",
        "truncated": data[:-5],
        "extended": data + b"\0",
        "bad magic": b"NOTAKEY!" + data[8:],
        "flipped secret bit": bytes(flipped),
        "future version": bytes(body) + hashlib.sha256(body).digest(),
        "text file": b"just some notes\n",
    }


@pytest.mark.parametrize("variant", list(corrupt_variants(b"x" * 75)))
def test_damaged_files_give_clear_errors(tmp_path, variant):
    key = Key(FIXED_SECRET)
    path = tmp_path / "k.bin"
    path.write_bytes(corrupt_variants(key.to_bytes())[variant])
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    message = str(info.value)
    assert str(path) in message
    assert "restore" in message or "make_key" in message or "release" in message
    assert FIXED_SECRET.hex() not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(KeyFileError, match="not found.*make_key"):
        load_key(tmp_path / "nope.bin")
    with pytest.raises(KeyFileError, match="directory"):
        load_key(tmp_path)


def test_invalid_parameters():
    with pytest.raises(ValueError, match="32 bytes"):
        Key(b"short")
    with pytest.raises(ValueError, match="1..255"):
        Key(FIXED_SECRET, block_size=0)
    with pytest.raises(ValueError, match="empty"):
        Key(FIXED_SECRET, transforms=())


def secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(), repr(secret)]


def test_secret_never_in_repr_str_or_logs(tmp_path, caplog):
    key = Key.generate()
    with caplog.at_level(logging.DEBUG):
        path = save_key(key, tmp_path / "k.bin")
        load_key(path)
        encrypt(np.zeros((8, 8, 3), np.uint8), key)
    text = "\n".join([repr(key), str(key), f"{key}", caplog.text, str(key.inspect())])
    assert key.fingerprint in repr(key)
    for form in secret_forms(key.secret):
        assert form not in text


def test_key_material_and_ops_have_redacted_reprs(fixed_key):
    material = fixed_key.material
    op = material.encrypt_op
    plan = op.plan(16)
    texts = [repr(material), str(material), repr(op), str(op.inverse()), repr(plan), f"{op}"]
    for text in texts:
        assert "redacted" in text
    # no run of the permutation or the table survives in any of them
    numbers = [str(v) for v in material.permutation[:4]] + [str(v) for v in material.ffx_table[:4]]
    assert not any(", ".join(numbers[:4]) in t or ", ".join(numbers[4:]) in t for t in texts)
    assert "array" not in "".join(texts)
