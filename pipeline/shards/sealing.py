"""Which outputs are sealed, with which data key: the ``_sealed.json`` marker, and opening an
output for reading or writing with the right :class:`~pipeline.cipher.seal.Sealer`.

A sealed output holds one plain object, ``_sealed.json``: the format, the id of the data key
that seals it (``tink:NNNNNNNNNN``, not key material) and the output's random id, which every
object's associated data carries. Everything else (shards, DALI indexes, manifests, sample
tables, progress records) is sealed. The marker tells a reader without the key, or with another
one, which key it needs, in one line.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass

from pipeline.cipher.seal import (
    DataKey,
    Sealer,
    SealError,
    load_data_key,
    resolve_data_key_path,
)
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

SEALED_NAME = "_sealed.json"
SEALED_FORMAT = "keyprotect-sealed-v1"
ENV_HINT = "pass --data-key FILE (or set KEYPROTECT_DATA_KEY=FILE)"


@dataclass(frozen=True)
class SealInfo:
    """What ``_sealed.json`` says: public, and enough to name the key a reader needs."""

    keyset_id: str
    output_id: str
    format: str = SEALED_FORMAT

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()


def read_seal_info(storage: Storage) -> SealInfo | None:
    """The output's seal marker, or None for an unsealed output."""
    try:
        raw = storage.read_raw(SEALED_NAME)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        info = SealInfo(str(doc["keyset_id"]), str(doc["output_id"]), str(doc["format"]))
    except (ValueError, KeyError, TypeError):
        raise SealError(
            f"{storage.uri(SEALED_NAME)}: not a seal marker; restore it from a copy of this "
            "output (without it the sealed objects cannot be opened)"
        ) from None
    if info.format != SEALED_FORMAT:
        raise SealError(
            f"{storage.uri(SEALED_NAME)}: seal format {info.format!r} is not {SEALED_FORMAT!r}; "
            "use the release that wrote it"
        )
    return info


def _key(data_key: str | os.PathLike | DataKey | None) -> DataKey | None:
    if isinstance(data_key, DataKey):
        return data_key
    path = resolve_data_key_path(None if data_key is None else str(data_key))
    return None if path is None else load_data_key(path)


def check_key(storage: Storage, info: SealInfo, key: DataKey | None) -> Sealer:
    """The sealer for ``info`` with ``key``; a one-line error naming the key it needs."""
    if key is None:
        raise SealError(
            f"{storage.url}: sealed with data key {info.keyset_id}, and no data key was given; "
            f"{ENV_HINT}"
        )
    if key.keyset_id != info.keyset_id:
        raise SealError(
            f"{storage.url}: sealed with data key {info.keyset_id}, not {key.keyset_id} (the "
            f"one given); pass the data key that sealed it"
        )
    return Sealer(key, info.output_id)


def open_output(
    url: str | os.PathLike, data_key: str | os.PathLike | DataKey | None = None
) -> Storage:
    """``url`` for reading: a sealed output opens with its data key (``data_key``, a path or a
    loaded key, else ``$KEYPROTECT_DATA_KEY``); an unsealed one reads as it is."""
    storage = Storage(url)
    info = read_seal_info(storage)
    key = _key(data_key)
    if info is None:
        if key is not None and data_key is not None:
            logger.info("%s is not sealed; the data key %s is not needed", storage.url,
                        key.keyset_id)  # fmt: skip
        return storage
    return Storage(url, sealer=check_key(storage, info, key))


def _is_empty(storage: Storage) -> bool:
    from pipeline.offline.outlock import LOCK_NAME  # the lock is ours; anything else is output

    return not [n for n in storage.list() if n != LOCK_NAME]


def prepare_output(url: str | os.PathLike, key: DataKey | None) -> Storage:
    """``url`` for writing, on the run's rank 0, holding the output's lock: a new output sealed
    with ``key`` gets its marker; an existing output must have been sealed with the same key
    (or be unsealed when ``key`` is None)."""
    storage = Storage(url)
    info = read_seal_info(storage)
    if info is None and key is None:
        return storage
    if info is None:
        assert key is not None
        if not _is_empty(storage):
            raise SealError(
                f"{storage.url}: holds unsealed shards; --seal writes into an empty output "
                "only: choose another --out, or remove this one first"
            )
        info = SealInfo(key.keyset_id, secrets.token_hex(16))
        storage.write_bytes(SEALED_NAME, info.to_bytes(), raw=True)
        logger.info("%s: sealing with data key %s", storage.url, key.keyset_id)
        return Storage(url, sealer=Sealer(key, info.output_id))
    if key is None:
        raise SealError(
            f"{storage.url}: sealed with data key {info.keyset_id}; pass --seal with that data "
            "key to add to it or resume it, or choose another --out"
        )
    return Storage(url, sealer=check_key(storage, info, key))


def join_output(url: str | os.PathLike, key: DataKey | None, output_id: str | None) -> Storage:
    """``url`` for writing on a rank other than 0: the output id rank 0 shared."""
    if key is None or output_id is None:
        if (key is None) != (output_id is None):
            raise SealError(f"{url}: rank 0 and this rank disagree on sealing; pass --seal to all")
        return Storage(url)
    return Storage(url, sealer=Sealer(key, output_id))


RESEAL_DIR = "_reseal"


def reseal_output(url: str | os.PathLike, old_key: DataKey, new_key: DataKey) -> int:
    """Rotate the data key of a sealed output; returns how many objects were resealed.

    Two phases, each resumable: every object is opened with ``old_key`` and sealed with
    ``new_key`` into ``_reseal/`` (the output stays whole and readable with the old key
    meanwhile), then the copies replace the originals, manifests last and the marker at the
    very end. The block-wise layer and the output's id do not change: the opened bytes are the
    same. A rerun after an interruption continues where it stopped.
    """
    from tqdm import tqdm

    from pipeline.offline.outlock import LOCK_NAME

    plain = Storage(url)
    info = read_seal_info(plain)
    if info is None:
        raise SealError(f"{plain.url}: not sealed; make_shards --seal writes sealed outputs")
    if info.keyset_id == new_key.keyset_id and not plain.list_prefix(f"{RESEAL_DIR}/"):
        logger.info("%s: already sealed with %s; nothing to do", plain.url, new_key.keyset_id)
        return 0
    old = Sealer(old_key, info.output_id)
    new = Sealer(new_key, info.output_id)
    if info.keyset_id not in (old_key.keyset_id, new_key.keyset_id):
        check_key(plain, info, old_key)  # raises: names the key that sealed it
    names = [n for n in _objects(plain) if n not in (SEALED_NAME, LOCK_NAME)]
    staged = set(plain.list_prefix(f"{RESEAL_DIR}/"))
    # phase 1: sealed copies under _reseal/ (the originals untouched)
    todo = [n for n in names if f"{RESEAL_DIR}/{n}" not in staged]
    if info.keyset_id == old_key.keyset_id:
        for name in tqdm(todo, desc="reseal", unit="object"):
            data = old.open(name, plain.read_raw(name))
            plain.write_bytes(f"{RESEAL_DIR}/{name}", new.seal(name, data), raw=True)
        marker = SealInfo(new_key.keyset_id, info.output_id)
        plain.write_bytes(f"{RESEAL_DIR}/{SEALED_NAME}", marker.to_bytes(), raw=True)
    # phase 2: the copies replace the originals, manifests then the marker last
    moving = sorted(plain.list_prefix(f"{RESEAL_DIR}/"), key=_move_order)
    for staged_name in moving:
        name = staged_name[len(RESEAL_DIR) + 1 :]
        plain.write_bytes(name, plain.read_raw(staged_name), raw=True)
        plain.remove(staged_name)
    plain.remove_folder_if_empty(f"{RESEAL_DIR}/_progress")
    plain.remove_folder_if_empty(RESEAL_DIR)
    logger.info("reseal: %d objects of %s now sealed with %s (were %s)", len(names), plain.url,
                new_key.keyset_id, old_key.keyset_id)  # fmt: skip
    return len(todo)


def _objects(storage: Storage) -> list[str]:
    """Every object of the output, in folders too (``_progress/``), but not ``_reseal/``."""
    names = []
    for name in storage.list():
        if name == RESEAL_DIR:
            continue
        folder = storage.fs.isdir(storage.path(name))
        names.extend(storage.list_prefix(f"{name}/") if folder else [name])
    return names


def _move_order(name: str) -> tuple[int, str]:
    leaf = name.rsplit("/", 1)[-1]
    if leaf == SEALED_NAME:
        return 2, name
    return (1 if leaf.endswith(".manifest.json") else 0), name
