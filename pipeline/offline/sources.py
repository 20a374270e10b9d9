"""Source listings: an ImageNet-style folder, its classes, and a deterministic subset of it.

``SRC/{split}/{class}/{file}``. Class index = position of the class folder name in sorted order
(as torchvision's ImageFolder does), or in the order of a ``--classes`` file. Subsets and the
sample order are decided by a hash of (seed, path), never by an RNG whose stream could change.
For encrypted output that hash is keyed (HMAC-SHA256 with the key's order key, see
``pipeline/cipher/keys.py``): with SHA-256 alone, anyone holding the public source listing and the
default seed could recompute which source file sits at every position of every shard, and a
public dataset's files are then known plaintext for the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from pipeline.cli import one_line
from pipeline.errors import ConfigError, KeyprotectError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(KeyprotectError, ValueError):
    """A source tree that cannot be used; the message names the path and says what to do."""


@dataclass(frozen=True, slots=True)  # ImageNet-21k: 14M of them per rank
class SourceItem:
    path: str  # relative to the source root, POSIX separators
    label: int
    split: str
    size: int  # bytes on disk, part of the listing digest


@dataclass(frozen=True)
class SourceReject:
    """An entry of the source tree that is not used, and why."""

    path: str  # relative to the source root, POSIX separators
    reason: str


def _suffix(name: str) -> str:
    """``pathlib``'s suffix of a file name (``""`` for ``name.`` and ``.name``)."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def _entry_reject(
    entry: os.DirEntry, root: Path, *, follow_symlinks: bool, want_dir: bool
) -> str | None:
    """Why ``entry`` (a class folder if ``want_dir``, else an image) is not used; None if it is.
    ``root`` is the source folder, resolved. A ``DirEntry`` answers from the directory listing
    (no stat for the type on most file systems): ImageNet-21k's 14M files were listed at four
    stats each with ``pathlib``."""
    if entry.name.startswith("."):
        return "hidden entry (name starts with '.')"
    if (
        not follow_symlinks
        and entry.is_symlink()
        and not Path(entry.path).resolve().is_relative_to(root)
    ):
        return (
            f"a symlink to {escaped(os.readlink(entry.path))}, outside the source folder; pass "
            "--follow-symlinks to use it"
        )
    if want_dir:
        return None if entry.is_dir() else "not a folder (a file where a class folder should be)"
    if entry.is_dir():
        return "a folder inside a class folder (not searched)"
    if not entry.is_file():
        return "not a regular file"
    suffix = _suffix(entry.name)
    if not suffix:
        return f"no file extension (accepted: {' '.join(IMAGE_EXTENSIONS)})"
    if suffix.lower() not in IMAGE_EXTENSIONS:
        accepted = " ".join(IMAGE_EXTENSIONS)
        return f"extension {suffix} is not an accepted image (accepted: {accepted})"
    return None


def _entries(folder: Path) -> list[os.DirEntry]:
    """``folder``'s entries sorted by name (``sorted(folder.iterdir())``'s order)."""
    with os.scandir(folder) as listing:
        return sorted(listing, key=attrgetter("name"))


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """One class folder name per line; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the classes file ({exc.strerror})") from None
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not names:
        raise SourceError(f"{path}: the classes file lists no class")
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: the classes file repeats a class name")
    return names


def escaped(path: str | os.PathLike) -> str:
    """``path`` printable: bytes that are not UTF-8 shown as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_utf8(entry: os.DirEntry) -> None:
    """Names go into manifests, tables and messages as UTF-8: refuse one that is not."""
    path = entry.path
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(
            f"{escaped(path)}: the file name is not valid UTF-8; rename it "
            "(for example with convmv) and run again"
        ) from None


def find_classes(
    root: str | os.PathLike, split: str, *, follow_symlinks: bool = False
) -> list[str]:
    """Sorted class folder names under ``root/split`` (symlinks out of ``root`` only with
    ``follow_symlinks``)."""
    split_dir = Path(root) / split
    if not Path(root).is_dir():
        raise SourceError(
            f"{root}: source folder not found; pass --src pointing at an ImageNet-style root"
        )
    if not split_dir.is_dir():
        raise SourceError(
            f"{split_dir}: no '{split}' folder; expected {root}/{split}/<class>/<image>"
        )
    resolved = Path(root).resolve()
    folders = [
        e
        for e in _entries(split_dir)
        if _entry_reject(e, resolved, follow_symlinks=follow_symlinks, want_dir=True) is None
    ]
    for e in folders:
        _check_utf8(e)
    names = [e.name for e in folders]
    if not names:
        raise SourceError(f"{split_dir}: no class folders; expected {split_dir}/<class>/<image>")
    return names


def scan_split(
    root: str | os.PathLike,
    split: str,
    classes: Sequence[str],
    *,
    follow_symlinks: bool = False,
) -> tuple[list[SourceItem], list[SourceReject]]:
    """Every entry under ``root/split``: the images used (labelled by position in ``classes``,
    sorted by path) and every other entry rejected with its reason, each logged. Symlinks that
    leave ``root`` are rejected unless ``follow_symlinks``."""
    root = Path(root)
    present = set(find_classes(root, split, follow_symlinks=follow_symlinks))
    missing = [c for c in classes if c not in present]
    if missing:
        raise SourceError(f"{root / split}: class folder(s) {missing[:5]} missing")
    wanted = set(classes)
    resolved = root.resolve()
    rejects: list[SourceReject] = []
    for entry in _entries(root / split):
        why = _entry_reject(entry, resolved, follow_symlinks=follow_symlinks, want_dir=True)
        if why is None and entry.name not in wanted:
            why = "folder not in the class list"
        if why is not None:
            rejects.append(SourceReject(f"{split}/{entry.name}", why))
    items = []
    for label, name in enumerate(classes):
        class_dir, prefix = root / split / name, f"{split}/{name}/"
        files = []
        for entry in _entries(class_dir):
            why = _entry_reject(entry, resolved, follow_symlinks=follow_symlinks, want_dir=False)
            if why is None:
                files.append(entry)
            else:
                rejects.append(SourceReject(prefix + entry.name, why))
        if not files:
            raise SourceError(
                f"{escaped(class_dir)}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS[:3])}... "
                "files); add images or remove the folder"
            )
        for entry in files:
            _check_utf8(entry)
            items.append(SourceItem(prefix + entry.name, label, split, entry.stat().st_size))
    for r in rejects:
        logger.warning("%s: not used: %s", one_line(root / r.path), one_line(r.reason))
    logger.info(
        "%s: %d entries: %d images used, %d rejected",
        one_line(root / split),
        len(items) + len(rejects),
        len(items),
        len(rejects),
    )
    return items, rejects


def list_split(
    root: str | os.PathLike,
    split: str,
    classes: Sequence[str],
    *,
    follow_symlinks: bool = False,
) -> list[SourceItem]:
    """The images of :func:`scan_split` (its rejects are logged there)."""
    return scan_split(root, split, classes, follow_symlinks=follow_symlinks)[0]


def _digest(data: bytes, order_key: bytes | None) -> bytes:
    if order_key is None:  # plain shards name their sources anyway
        return hashlib.sha256(data).digest()
    return hmac.digest(order_key, data, "sha256")  # HMAC-SHA256, one call (hmac.new's, faster)


def _rank(seed: int, path: str, order_key: bytes | None) -> bytes:
    return _digest(b"%d\x00%s" % (seed, path.encode()), order_key)


def select_subset(
    items: Sequence[SourceItem],
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    order_key: bytes | None = None,
) -> list[SourceItem]:
    """Keep up to ``per_class`` and/or ``fraction`` of each class, chosen by ``seed``; then
    order all kept samples by a seeded hash so that every shard mixes the classes. With
    ``order_key`` (``Key.order_key``; for encrypted output) the hash is keyed."""
    if per_class is not None and per_class < 1:
        raise ConfigError(f"per_class must be at least 1, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is None and fraction is None:  # every item: only the order below counts
        return sorted(items, key=lambda it: _rank(seed, "order/" + it.path, order_key))
    by_class: dict[int, list[SourceItem]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    kept = []
    for members in by_class.values():
        members = sorted(members, key=lambda it: _rank(seed, it.path, order_key))
        n = len(members)
        if fraction is not None:
            n = max(1, math.ceil(fraction * n))
        if per_class is not None:
            n = min(n, per_class)
        kept.extend(members[:n])
    return sorted(kept, key=lambda it: _rank(seed, "order/" + it.path, order_key))


def listing_digest(items: Sequence[SourceItem], *, order_key: bytes | None = None) -> str:
    """SHA-256 over the selected (split, label, path, size) lines, in shard order; keyed
    (HMAC-SHA256) with ``order_key``, so that it confirms no guess of the listing."""
    digest = hashlib.sha256() if order_key is None else hmac.new(order_key, None, "sha256")
    for start in range(0, len(items), 65536):  # in pieces: ImageNet-21k's lines are 0.9 GB
        piece = items[start : start + 65536]
        digest.update(
            "".join(f"{it.split}\t{it.label}\t{it.path}\t{it.size}\n" for it in piece).encode()
        )
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceScan:
    """What listing one split of a source tree found, before any selection: its classes, every
    image (sorted by path) and every entry not used. As bytes (``to_bytes``), it is how one
    rank per node hands its listing to the node's other ranks (``WorkGroup.once_per_node``):
    a JSON line (split, classes, rejects), then ``label TAB size TAB path`` per image, NUL
    between images (the one byte no POSIX path holds)."""

    split: str
    classes: list[str]
    items: list[SourceItem]
    rejects: list[SourceReject]

    def to_bytes(self) -> bytes:
        head = {"split": self.split, "classes": self.classes,
                "rejects": [[r.path, r.reason] for r in self.rejects]}  # fmt: skip
        body = b"\0".join(b"%d\t%d\t%s" % (it.label, it.size, it.path.encode())
                          for it in self.items)  # fmt: skip
        return json.dumps(head).encode() + b"\n" + body

    @classmethod
    def from_bytes(cls, data: bytes) -> SourceScan:
        line, _, body = data.partition(b"\n")
        head = json.loads(line)
        split, items = head["split"], []
        for record in body.split(b"\0") if body else ():
            label, size, path = record.split(b"\t", 2)
            items.append(SourceItem(path.decode(), int(label), split, int(size)))
        rejects = [SourceReject(path, reason) for path, reason in head["rejects"]]
        return cls(split, head["classes"], items, rejects)


def scan_source(
    src: str | os.PathLike,
    split: str,
    *,
    classes_file: str | None = None,
    follow_symlinks: bool = False,
) -> SourceScan:
    """List ``src/split``: its classes (found, or from ``classes_file``), then
    :func:`scan_split`."""
    if classes_file:
        classes = read_classes_file(classes_file)
    else:
        classes = find_classes(src, split, follow_symlinks=follow_symlinks)
    listed, rejects = scan_split(src, split, classes, follow_symlinks=follow_symlinks)
    return SourceScan(split, list(classes), listed, rejects)


def select_split(
    src: str | os.PathLike,
    split: str,
    *,
    classes_file: str | None = None,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    order_key: bytes | None = None,
    follow_symlinks: bool = False,
    scan: SourceScan | None = None,
) -> tuple[list[str], list[SourceItem], list[SourceReject]]:
    """The class names of ``split``, its selected items in shard order (sample ``k`` of the
    split's shards, key ``f"{k:08d}"``, comes from ``items[k]``) and the entries of the tree
    that are not used, with why. ``scan``: the tree as already listed (:func:`scan_source`
    with the same ``src``, ``split``, ``classes_file`` and ``follow_symlinks``)."""
    if scan is None:
        scan = scan_source(src, split, classes_file=classes_file, follow_symlinks=follow_symlinks)
    classes, listed, rejects = scan.classes, scan.items, scan.rejects
    items = select_subset(
        listed,
        per_class=per_class,
        fraction=fraction,
        seed=seed,
        order_key=order_key,
    )
    return classes, items, rejects
