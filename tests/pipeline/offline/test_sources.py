"""Subsets and sample order: documented, deterministic, and keyed for encrypted output, so that
an attacker who knows the source listing and every default cannot place a file."""

from __future__ import annotations

import hashlib
import hmac
import statistics

import numpy as np
import pytest

from pipeline import Key
from pipeline.offline.sources import SourceItem, listing_digest, select_subset
from tests.conftest import FIXED_SECRET

CLASSES, PER_CLASS = 4, 25


def listing() -> list[SourceItem]:
    """A public listing, ImageNet-style names: what an attacker of a public dataset holds."""
    return [
        SourceItem(f"train/n{c:08d}/n{c:08d}_{i}.JPEG", c, "train", 1000 + i)
        for c in range(CLASSES)
        for i in range(PER_CLASS)
    ]


def test_keyed_order_follows_the_documented_hmac():
    """Re-derived from pipeline/cipher/keys.py's docstring alone (the README says the same)."""
    key = Key(FIXED_SECRET)
    items = listing()

    def rank(text: str) -> bytes:
        return hmac.new(key.order_key, b"0\x00" + text.encode(), hashlib.sha256).digest()

    kept = []
    for c in range(CLASSES):
        members = sorted((it for it in items if it.label == c), key=lambda it: rank(it.path))
        kept += members[:3]
    expected = sorted(kept, key=lambda it: rank("order/" + it.path))
    assert select_subset(items, per_class=3, seed=0, order_key=key.order_key) == expected
    lines = "".join(f"{it.split}\t{it.label}\t{it.path}\t{it.size}\n" for it in expected)
    digest = hmac.new(key.order_key, lines.encode(), hashlib.sha256).hexdigest()
    assert listing_digest(expected, order_key=key.order_key) == digest
    assert listing_digest(expected) == hashlib.sha256(lines.encode()).hexdigest()  # plain: as v1


def test_the_whole_listing_is_the_documented_order_of_every_item():
    """No subset (neither --per-class nor --fraction): every item, in the keyed order alone,
    as when a subset keeps all of each class (the per-class ranking is skipped, not changed)."""
    key = Key(FIXED_SECRET)
    items = listing()

    def rank(text: str) -> bytes:
        return hmac.new(key.order_key, b"7\x00" + text.encode(), hashlib.sha256).digest()

    everything = select_subset(items, seed=7, order_key=key.order_key)
    assert everything == sorted(items, key=lambda it: rank("order/" + it.path))
    assert everything == select_subset(items, fraction=1.0, seed=7, order_key=key.order_key)


def test_keyed_order_is_deterministic_and_depends_on_key_and_seed():
    items, key = listing(), Key(FIXED_SECRET)
    a = select_subset(items, per_class=5, seed=0, order_key=key.order_key)
    assert a == select_subset(list(reversed(items)), per_class=5, seed=0, order_key=key.order_key)
    assert a != select_subset(items, per_class=5, seed=1, order_key=key.order_key)
    assert a != select_subset(items, per_class=5, seed=0, order_key=Key(bytes(32)).order_key)


def placement_accuracy(truth: list[SourceItem], guess: list[SourceItem]) -> float:
    """The fraction of shard positions where the attacker names the right source file."""
    return float(np.mean([t.path == g.path for t, g in zip(truth, guess, strict=True)]))


def label_aware_guess(truth: list[SourceItem], recomputed: list[SourceItem]) -> list[SourceItem]:
    """The attacker reads each sample's label (``KEY.cls``) and names, position by position,
    the next file of that class in the recomputed order: the best use of the public data."""
    queues = {c: [it for it in recomputed if it.label == c] for c in range(CLASSES)}
    return [queues[t.label].pop(0) for t in truth]


@pytest.mark.parametrize("per_class", [None, 5])
def test_an_attacker_without_the_key_places_samples_at_chance(per_class):
    """Today's recomputation (SHA-256 of seed and path, every default known) places every
    sample of unkeyed output; against keyed output it is measured, over 300 keys, at chance."""
    items = listing()
    recomputed = select_subset(items, per_class=per_class, seed=0)
    assert placement_accuracy(select_subset(items, per_class=per_class, seed=0), recomputed) == 1
    rng = np.random.default_rng(0)
    plain_guess, label_guess, chosen = [], [], []
    for _ in range(300):
        truth = select_subset(
            items, per_class=per_class, seed=0, order_key=Key(rng.bytes(32)).order_key
        )
        plain_guess.append(placement_accuracy(truth, recomputed))
        label_guess.append(placement_accuracy(truth, label_aware_guess(truth, recomputed)))
        chosen.append(len({t.path for t in truth} & {g.path for g in recomputed}) / len(truth))
    kept = len(recomputed)
    # Chance: a uniformly random file of the kept set; of its class when the label is used.
    # The chosen subset overlaps the recomputed one as two random subsets do.
    for measured, chance in (
        (plain_guess, 1 / CLASSES / PER_CLASS),
        (label_guess, 1 / PER_CLASS),
        (chosen, kept / CLASSES / PER_CLASS),
    ):
        mean = statistics.fmean(measured)
        spread = statistics.stdev(measured) / len(measured) ** 0.5
        assert abs(mean - chance) < 4 * spread + 1e-9, (mean, chance)


def test_every_entry_is_used_or_rejected_by_name(tmp_path, caplog):
    """25 entries: 19 images used, 6 rejected, each named with its reason (issue 21, item 6)."""
    from PIL import Image

    from pipeline.offline.sources import scan_split

    src, outside = tmp_path / "src", tmp_path / "outside"
    (outside / "linked_class").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(outside / "stolen.png")
    for c in ("a", "b"):
        (src / "train" / c).mkdir(parents=True)
    for i in range(19):
        Image.new("RGB", (4, 4)).save(src / "train" / "ab"[i % 2] / f"img{i}.png")
    frames = [Image.new("P", (4, 4), i) for i in range(2)]
    frames[0].save(src / "train/a/anim.gif", save_all=True, append_images=frames[1:])
    (src / "train/a/noext").write_bytes(b"x")
    (src / "train/a/evil\nINFO 19 images, 0 rejected").write_bytes(b"x")
    (src / "train/loose.png").write_bytes(b"x")  # a file where a class folder should be
    (src / "train/b/link.png").symlink_to(outside / "stolen.png")
    (src / "train/linked_class").symlink_to(outside / "linked_class")
    entries = sum(1 for _ in (src / "train").rglob("*"))
    assert entries == 27  # 25 entries + the two class folders themselves

    items, rejects = scan_split(src, "train", ["a", "b"])
    assert len(items) == 19
    named = {r.path: r.reason for r in rejects}
    assert set(named) == {
        "train/a/anim.gif",
        "train/a/noext",
        "train/a/evil\nINFO 19 images, 0 rejected",
        "train/loose.png",
        "train/b/link.png",
        "train/linked_class",
    }
    assert len(items) + len(rejects) == 25
    assert (
        "outside" in named["train/b/link.png"] and "--follow-symlinks" in named["train/b/link.png"]
    )
    assert "not a folder" in named["train/loose.png"]
    for line in caplog.text.splitlines():
        assert not line.startswith("INFO 19 images")  # the forged line stays on its own line

    items, rejects = scan_split(src, "train", ["a", "b"], follow_symlinks=True)
    assert "train/b/link.png" in {it.path for it in items}


@pytest.mark.parametrize("order_key", [None, bytes(range(32))])
def test_the_listing_digest_is_the_documented_hash_of_its_lines(order_key):
    """Hashed in pieces (ImageNet-21k's lines are 0.9 GB), the same digest as over the whole
    text, so outputs made before resume: across the 65,536-item pieces too."""
    import hashlib
    import hmac

    from pipeline.offline.sources import SourceItem, listing_digest

    items = [
        SourceItem(f"train/n{i % 7}/f{i}.JPEG", i % 7, "train", 1000 + i) for i in range(70000)
    ]
    text = "".join(f"{it.split}\t{it.label}\t{it.path}\t{it.size}\n" for it in items).encode()
    whole = hashlib.sha256(text) if order_key is None else hmac.new(order_key, text, "sha256")
    assert listing_digest(items, order_key=order_key) == whole.hexdigest()


def test_a_scan_survives_its_bytes_with_any_name_a_tree_can_hold(tmp_path):
    """What one rank per node hands the node's other ranks: the same classes, images (tabs,
    newlines and non-ASCII in names) and rejects, and so the same selection and digest."""
    from PIL import Image

    from pipeline.offline.sources import SourceScan, scan_source, select_split

    src = tmp_path / "src"
    for name in ("a", "b\tc", "dé"):
        (src / "train" / name).mkdir(parents=True)
    names = ["x.png", "tab\there.png", "new\nline.png", "ü.png", "sp ace.png"]
    for i, name in enumerate(names * 2):
        Image.new("RGB", (4 + i, 4)).save(src / "train" / ["a", "b\tc", "dé"][i % 3] / name)
    (src / "train/a/notes.txt").write_bytes(b"x")
    scan = scan_source(src, "train")
    assert len(scan.items) == 10 and len(scan.rejects) == 1 and scan.classes == ["a", "b\tc", "dé"]
    again = SourceScan.from_bytes(scan.to_bytes())
    assert again == scan
    key = bytes(range(32))
    assert select_split(src, "train", order_key=key, scan=again) == select_split(
        src, "train", order_key=key
    )
    assert SourceScan.from_bytes(SourceScan("val", ["a"], [], []).to_bytes()).items == []
