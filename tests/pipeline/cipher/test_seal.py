"""The data key and sealing: round trips, tampering, wrong keys, key files, KMS envelope."""

from __future__ import annotations

import base64
import io
import json
import stat

import pytest

from pipeline.cipher.seal import (
    Sealer,
    SealError,
    generate_data_key,
    load_data_key,
    object_ad,
    open_sealed,
    opening_reader,
    reseal,
    resolve_data_key_path,
    save_data_key,
    seal_bytes,
    sealing_writer,
)
from pipeline.errors import KeyprotectError

SEG = 1 << 20
KEY = generate_data_key()
AD = object_ad(output_id="out-1", split="train", name="shard-000000.tar")


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def material(key) -> list[str]:
    from tink import json_proto_keyset_format, secret_key_access

    doc = json.loads(json_proto_keyset_format.serialize(key.handle, secret_key_access.TOKEN))
    value = doc["key"][0]["keyData"]["value"]
    return [value, base64.b64decode(value).hex()]


@pytest.mark.parametrize("n", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG + 12345])
def test_round_trip_bytes_and_stream(n, tmp_path):
    data = payload(n)
    sealed = seal_bytes(KEY, data, associated_data=AD)
    assert len(sealed) > n
    assert open_sealed(KEY, sealed, associated_data=AD) == data
    path = tmp_path / "obj.sealed"
    with sealing_writer(KEY, path.open("wb"), associated_data=AD) as w:  # closes the file
        for i in range(0, n, 300_000):
            w.write(data[i : i + 300_000])
    streamed = path.read_bytes()
    with opening_reader(KEY, path.open("rb"), associated_data=AD) as r:
        assert r.read() == data
    assert open_sealed(KEY, streamed, associated_data=AD) == data


def test_4kb_segments():
    key = generate_data_key(segment="4KB")
    data = payload(5 * 4096 + 3)
    assert open_sealed(key, seal_bytes(key, data, associated_data=AD), associated_data=AD) == data


def expect_fail(sealed: bytes, *, key=KEY, ad=AD) -> SealError:
    with pytest.raises(SealError) as info:
        open_sealed(key, sealed, associated_data=ad)
    assert isinstance(info.value, KeyprotectError)
    return info.value


def test_tampering_in_any_segment():
    sealed = seal_bytes(KEY, payload(3 * SEG + 100), associated_data=AD)
    for pos in (0, 40, SEG // 2, SEG + 77, 2 * SEG + 5, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        err = expect_fail(bytes(bad))
        assert "shard-000000.tar" in str(err) and "does not authenticate" in str(err)


def test_truncation_at_boundary_and_mid_segment():
    sealed = seal_bytes(KEY, payload(3 * SEG + 100), associated_data=AD)
    # ciphertext segments are SEG bytes (the header counts in the first): cut at boundaries
    for cut in (SEG, 2 * SEG, 3 * SEG, SEG // 2, len(sealed) - 1, 10):
        expect_fail(sealed[:cut])


def test_reader_raises_when_the_bad_segment_is_reached():
    data = payload(3 * SEG)
    bad = bytearray(seal_bytes(KEY, data, associated_data=AD))
    bad[2 * SEG + 100] ^= 0x80
    r = opening_reader(KEY, io.BytesIO(bytes(bad)), associated_data=AD)
    assert r.read(SEG) == data[:SEG]  # the first segment still opens
    with pytest.raises(SealError):
        r.read()


def test_swapped_object_and_other_output():
    sealed = seal_bytes(KEY, b"image bytes", associated_data=AD)
    other_name = object_ad(output_id="out-1", split="train", name="shard-000001.tar")
    other_split = object_ad(output_id="out-1", split="val", name="shard-000000.tar")
    other_out = object_ad(output_id="out-2", split="train", name="shard-000000.tar")
    for ad in (other_name, other_split, other_out):
        err = expect_fail(sealed, ad=ad)
        assert "from another output/name" in str(err)


def test_ad_is_unambiguous():
    a = object_ad(output_id="a", split="b/c", name="d")
    b = object_ad(output_id="a/b", split="c", name="d")
    assert a != b and a.startswith(b"keyprotect-ad-v1")


def test_wrong_key_names_the_keyset_held_not_the_material():
    other = generate_data_key()
    sealed = seal_bytes(other, b"x" * 1000, associated_data=AD)
    err = expect_fail(sealed)
    assert KEY.keyset_id in str(err)
    for form in material(KEY) + material(other):
        assert form not in str(err) and form not in repr(KEY)


def test_reseal_rotates():
    new = generate_data_key()
    data = payload(SEG + 5)
    sealed = seal_bytes(KEY, data, associated_data=AD)
    rotated = reseal(KEY, new, sealed, associated_data=AD)
    assert open_sealed(new, rotated, associated_data=AD) == data
    expect_fail(rotated)
    with pytest.raises(SealError):
        reseal(new, KEY, sealed, associated_data=AD)


def test_key_file_mode_refuse_and_load(tmp_path, caplog):
    caplog.set_level("DEBUG")
    path = tmp_path / "data.key"
    save_data_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_data_key(path).keyset_id == KEY.keyset_id
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        save_data_key(generate_data_key(), path)
    assert path.read_bytes() == before
    save_data_key(generate_data_key(), path, overwrite=True)
    assert path.read_bytes() != before
    for form in material(KEY):
        assert form not in caplog.text


def test_load_errors(tmp_path):
    with pytest.raises(SealError, match="make_data_key"):
        load_data_key(tmp_path / "missing.key")
    (tmp_path / "k.bin").write_bytes(b"\x00\x01 not json")
    with pytest.raises(SealError, match="not a data key"):
        load_data_key(tmp_path / "k.bin")
    (tmp_path / "j.json").write_text('{"primaryKeyId": 1, "key": []}')
    with pytest.raises(SealError, match="not a data key"):
        load_data_key(tmp_path / "j.json")


def test_resolve_path(monkeypatch):
    monkeypatch.delenv("KEYPROTECT_DATA_KEY", raising=False)
    assert resolve_data_key_path(None) is None
    monkeypatch.setenv("KEYPROTECT_DATA_KEY", "/env.key")
    assert resolve_data_key_path(None) == "/env.key"
    assert resolve_data_key_path("/arg.key") == "/arg.key"


@pytest.mark.slow
def test_kms_wrapped_key_round_trip(s3_env, tmp_path):
    import boto3

    kms = boto3.client("kms")
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    other = kms.create_key()["KeyMetadata"]["Arn"]
    path = tmp_path / "data.key"
    save_data_key(KEY, path, kms_key_uri=f"aws-kms://{arn}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for form in material(KEY):
        assert form not in text
    loaded = load_data_key(path)
    assert loaded.keyset_id == KEY.keyset_id
    assert open_sealed(loaded, seal_bytes(KEY, b"abc", associated_data=AD), associated_data=AD)
    doc = json.loads(text)
    doc["kms_key_uri"] = f"aws-kms://{other}"
    path.write_text(json.dumps(doc))
    with pytest.raises(SealError, match="does not decrypt"):
        load_data_key(path)
    with pytest.raises(SealError, match="not an AWS KMS key URI"):
        save_data_key(KEY, tmp_path / "x.key", kms_key_uri="aws-kms://nonsense")
    with pytest.raises(SealError, match="KMS did not encrypt"):
        save_data_key(KEY, tmp_path / "y.key", kms_key_uri=f"aws-kms://{arn}-missing")


def test_a_data_key_never_pickles_but_a_sealer_travels_to_a_worker_by_its_parts():
    """make_shards' worker processes get the keyset through their start-up pipe; a pickle of a
    data key (into a checkpoint, a cache) stays refused, as Tink refuses it."""
    import pickle

    sealer = Sealer(generate_data_key(), "out-1")
    with pytest.raises(Exception, match="pickle|getstate|not permitted"):
        pickle.dumps(sealer.key)
    again = Sealer.from_secret_parts(pickle.loads(pickle.dumps(sealer.secret_parts())))
    sealed = sealer.seal("train-000000.tar", b"x" * 5000)
    assert again.open("train-000000.tar", sealed) == b"x" * 5000
    assert again.output_id == "out-1" and again.key.keyset_id == sealer.key.keyset_id
