"""The data key: shards at rest sealed with Tink streaming AEAD (AES256-GCM-HKDF, 1 MB segments).

The model key (k.bin) protects the model, not the images; the data key seals the shards so the
bucket learns object counts and sizes only. Every object is bound to its output, split and name
by associated data (:func:`object_ad`). See docs/sealing.md.

    key = generate_data_key()
    save_data_key(key, "data.key")                  # mode 0600, refuses to overwrite
    blob = seal_bytes(key, data, associated_data=object_ad(output_id=o, split="train", name=n))
    data = open_sealed(key, blob, associated_data=...)
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import tink
from tink import json_proto_keyset_format, secret_key_access, streaming_aead

from pipeline.atomic import atomic_write
from pipeline.errors import KeyprotectError

logger = logging.getLogger(__name__)

ENV_VAR = "KEYPROTECT_DATA_KEY"
AD_VERSION = b"keyprotect-ad-v1"
TEMPLATES = {
    "1MB": streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB,
    "4KB": streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_4KB,
}
_NOT_AUTH = "does not authenticate: tampered, truncated, or from another output/name"

streaming_aead.register()


class SealError(KeyprotectError):
    """A sealed object does not open, or a data key file is unusable."""


@dataclass(frozen=True)
class DataKey:
    """A Tink streaming-AEAD keyset. ``keyset_id`` names it and is safe to print."""

    handle: tink.KeysetHandle

    def __repr__(self) -> str:
        return f"DataKey({self.keyset_id})"

    @property
    def keyset_id(self) -> str:
        return f"tink:{self.handle.keyset_info().primary_key_id:010d}"

    def _primitive(self) -> streaming_aead.StreamingAead:
        return self.handle.primitive(streaming_aead.StreamingAead)


def generate_data_key(*, segment: str = "1MB") -> DataKey:
    """A fresh data key; ``segment`` is "1MB" (default, fastest) or "4KB"."""
    return DataKey(tink.new_keyset_handle(TEMPLATES[segment]))


def _kms_aead(kms_key_uri: str) -> tink.aead.Aead:
    """The KEK: an AEAD backed by the AWS KMS key ``aws-kms://arn:aws:kms:REGION:...``."""
    import boto3
    from tink import aead
    from tink.integration import awskms

    aead.register()
    parts = kms_key_uri.removeprefix("aws-kms://").split(":")
    if not kms_key_uri.startswith("aws-kms://arn:") or len(parts) < 6:
        raise SealError(
            f"{kms_key_uri}: not an AWS KMS key URI; expected aws-kms://arn:aws:kms:REGION:ACCOUNT:key/ID"
        )
    client = boto3.client("kms", region_name=parts[3])
    return awskms.new_client(boto3_client=client, key_uri=kms_key_uri).get_aead(kms_key_uri)


def save_data_key(
    key: DataKey,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    kms_key_uri: str | None = None,
) -> Path:
    """Write ``key`` as a JSON keyset, mode 0600, atomically; refuse an existing file.

    With ``kms_key_uri`` (``aws-kms://arn:...``) the keyset is encrypted by that KMS key (the
    envelope option) and only whoever may use the KMS key can load it.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path}: a data key file already exists; losing it loses every shard sealed with it. "
            "Choose another path, or pass --force / overwrite=True to replace it"
        )
    if kms_key_uri is None:
        text = json_proto_keyset_format.serialize(key.handle, secret_key_access.TOKEN)
    else:
        from botocore.exceptions import BotoCoreError

        try:
            text = json_proto_keyset_format.serialize_encrypted(
                key.handle, _kms_aead(kms_key_uri), kms_key_uri.encode()
            )
        except (tink.TinkError, BotoCoreError) as exc:
            raise SealError(
                f"{kms_key_uri}: KMS did not encrypt the keyset ({exc}); check the key URI, "
                "its key policy and your AWS credentials"
            ) from None
        text = f'{{"kms_key_uri": {json.dumps(kms_key_uri)}, "keyset": {text}}}'
    try:
        atomic_write(path, text, perm=0o600, exclusive=not overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path}: a data key file already exists; pass --force") from None
    logger.debug("wrote data key %s to %s", key.keyset_id, path)
    return path


def load_data_key(path: str | os.PathLike) -> DataKey:
    """Read a data key written by :func:`save_data_key` (plain or KMS-wrapped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SealError(
            f"{path}: no data key file; create one with tools/make_data_key.py {path}"
        ) from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SealError(f"{path}: not a data key (a Tink JSON keyset)") from None
    try:
        if isinstance(doc, dict) and "kms_key_uri" in doc:
            from botocore.exceptions import BotoCoreError

            uri = doc["kms_key_uri"]
            try:
                handle = json_proto_keyset_format.parse_encrypted(
                    json.dumps(doc["keyset"]), _kms_aead(uri), uri.encode()
                )
            except (tink.TinkError, BotoCoreError):
                raise SealError(
                    f"{path}: wrapped by KMS key {uri}, which does not decrypt it "
                    "(wrong KMS key, no access, or no credentials)"
                ) from None
        else:
            handle = json_proto_keyset_format.parse(text, secret_key_access.TOKEN)
        handle.primitive(streaming_aead.StreamingAead)
    except tink.TinkError:
        raise SealError(f"{path}: not a data key (a Tink streaming-AEAD keyset)") from None
    return DataKey(handle)


def resolve_data_key_path(arg: str | None) -> str | None:
    """The data key file named by ``arg``, else by $KEYPROTECT_DATA_KEY, else None."""
    return arg or os.environ.get(ENV_VAR) or None


def object_ad(*, output_id: str, split: str, name: str) -> bytes:
    """Associated data binding a sealed object to its output, split and name.

    Version 1 encoding: ``b"keyprotect-ad-v1"`` then each field as a 4-byte big-endian length
    followed by its UTF-8 bytes, in the order output_id, split, name (unambiguous).
    """
    out = bytearray(AD_VERSION)
    for field in (output_id, split, name):
        raw = field.encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _describe(associated_data: bytes) -> str:
    """The object's name from its AD, for error messages (never key material)."""
    try:
        if associated_data.startswith(AD_VERSION):
            rest, fields = associated_data[len(AD_VERSION) :], []
            while rest:
                n = int.from_bytes(rest[:4], "big")
                fields.append(rest[4 : 4 + n].decode("utf-8"))
                rest = rest[4 + n :]
            return "/".join(fields)
    except (UnicodeDecodeError, ValueError):
        pass
    return "object"


def _fail(key: DataKey, associated_data: bytes) -> SealError:
    return SealError(
        f"{_describe(associated_data)}: {_NOT_AUTH} (or sealed with a data key other than "
        f"{key.keyset_id}, the one held)"
    )


# What one call into Tink's decrypting stream asks for: a tar reader's small reads (headers,
# labels) come from this buffer. With io's 8 KiB, opening cost twice as much per shard
# (70 against 36 ms a 150 MB shard read by tarfile, 2 cores, 2026-12-04).
READ_BUFFER = 256 * 1024


class _Closing(io.RawIOBase):
    """Wraps Tink's decrypting stream so a bad segment raises SealError naming the object."""

    def __init__(self, stream: BinaryIO, key: DataKey, associated_data: bytes) -> None:
        self._s, self._key, self._ad = stream, key, associated_data

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._s.read(len(b))
        except tink.TinkError:
            raise _fail(self._key, self._ad) from None
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._s.close()
        super().close()


def sealing_writer(
    key: DataKey, raw: BinaryIO | io.RawIOBase, *, associated_data: bytes
) -> BinaryIO:
    """A file-like to write plaintext into; closing it finishes the sealed object and closes
    ``raw`` (Tink's stream owns its destination)."""
    return key._primitive().new_encrypting_stream(raw, associated_data)


def opening_reader(key: DataKey, raw: BinaryIO, *, associated_data: bytes) -> BinaryIO:
    """A file-like to read plaintext from (closing it closes ``raw``); raises SealError when a
    tampered or truncated segment is reached, before any of its bytes are returned."""
    stream = key._primitive().new_decrypting_stream(raw, associated_data)
    return io.BufferedReader(_Closing(stream, key, associated_data), buffer_size=READ_BUFFER)


def seal_bytes(key: DataKey, data: bytes, *, associated_data: bytes) -> bytes:
    """``data`` sealed with ``key`` and bound to ``associated_data``."""
    buf = io.BytesIO()
    with sealing_writer(key, _NoClose(buf), associated_data=associated_data) as w:
        w.write(data)
    return buf.getvalue()


def open_sealed(key: DataKey, data: bytes, *, associated_data: bytes) -> bytes:
    """The plaintext of a sealed object; SealError if it does not authenticate."""
    with opening_reader(key, io.BytesIO(data), associated_data=associated_data) as r:
        return r.read()


def reseal_stream(
    old_key: DataKey,
    new_key: DataKey,
    src: BinaryIO,
    dst: BinaryIO | io.RawIOBase,
    *,
    associated_data: bytes,
) -> None:
    """Copy the sealed object ``src`` to ``dst`` sealed with ``new_key`` (key rotation)."""
    with (
        opening_reader(old_key, src, associated_data=associated_data) as r,
        sealing_writer(new_key, dst, associated_data=associated_data) as w,
    ):
        while chunk := r.read(1 << 20):
            w.write(chunk)


def reseal(old_key: DataKey, new_key: DataKey, data: bytes, *, associated_data: bytes) -> bytes:
    """``data`` (sealed with ``old_key``) sealed again with ``new_key``, same AD."""
    buf = io.BytesIO()
    reseal_stream(
        old_key, new_key, io.BytesIO(data), _NoClose(buf), associated_data=associated_data
    )
    return buf.getvalue()


class _NoClose(io.RawIOBase):
    """A BytesIO view that Tink's stream may close without discarding the bytes."""

    def __init__(self, buf: io.BytesIO) -> None:
        self._buf = buf

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._buf.write(b)


def split_of(name: str) -> str:
    """The split an object belongs to, from its name (``train-000000.tar``,
    ``val.manifest.json``, ``_progress/train.options.json`` -> train, val, train)."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf.split(".", 1)[0].split("-", 1)[0]


@dataclass(frozen=True)
class Sealer:
    """Seals and opens the objects of one output: ``key`` and the output's id, so that every
    object is bound by :func:`object_ad` to (output, split, name)."""

    key: DataKey
    output_id: str

    def ad(self, name: str) -> bytes:
        return object_ad(output_id=self.output_id, split=split_of(name), name=name)

    def seal(self, name: str, data: bytes) -> bytes:
        return seal_bytes(self.key, data, associated_data=self.ad(name))

    def open(self, name: str, data: bytes) -> bytes:
        return open_sealed(self.key, data, associated_data=self.ad(name))

    def writer(self, name: str, raw: BinaryIO | io.RawIOBase) -> BinaryIO:
        return sealing_writer(self.key, raw, associated_data=self.ad(name))

    def reader(self, name: str, raw: BinaryIO) -> BinaryIO:
        return opening_reader(self.key, raw, associated_data=self.ad(name))

    def secret_parts(self) -> tuple[str, str]:
        """The keyset (Tink's JSON: secret) and the output id, for make_shards' own worker
        processes through their start-up pipe; Tink refuses to pickle a keyset, and so does
        :class:`DataKey`, so that none reaches a file by accident."""
        text = json_proto_keyset_format.serialize(self.key.handle, secret_key_access.TOKEN)
        return text, self.output_id

    @classmethod
    def from_secret_parts(cls, parts: tuple[str, str]) -> Sealer:
        text, output_id = parts
        return cls(
            DataKey(json_proto_keyset_format.parse(text, secret_key_access.TOKEN)), output_id
        )
