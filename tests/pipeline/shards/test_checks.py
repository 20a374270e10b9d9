"""The per-sample and per-index checks shared by verify_shards and the loaders."""

from __future__ import annotations

import pytest
from torch._utils import ExceptionWrapper

from pipeline.errors import KeyprotectError
from pipeline.shards.checks import (
    ShardError,
    check_files,
    check_image,
    check_label,
    parse_index,
)


def test_a_sound_sample_passes_and_gives_its_label():
    check_files("k", ["u8", "cls", "json"])
    check_image("k", 8 * 8 * 3, [8, 8, 3])
    assert check_label("k", b"3", 4) == 3


@pytest.mark.parametrize(
    ("check", "words"),
    [
        (lambda: check_files("k", ["u8", "cls"]), "sample k has files ['cls', 'u8']"),
        (lambda: check_files("k", ["u8", "cls", "json", "txt"]), "has files"),
        (lambda: check_image("k", 32 * 32 * 3, [64, 64, 3]), "3072 image bytes, expected 12288"),
        (lambda: check_label("k", b"4", 4), "sample k: class 4 outside 0..3"),
        (lambda: check_label("k", b"-1", 4), "class -1 outside"),
        (lambda: check_label("k", b"x", 4), "k.cls is not a class index (b'x')"),
        (lambda: check_label("k", b"\xff", 4), "is not a class index"),
    ],
)
def test_a_bad_sample_is_a_shard_error_naming_it(check, words):
    with pytest.raises(ShardError, match="^sample k") as caught:
        check()
    assert words in str(caught.value) and isinstance(caught.value, KeyprotectError)


def index(*lines: str, count: int | None = None) -> bytes:
    return (
        f"v1.2 {len(lines) if count is None else count}\n".encode()
        + "".join(line + "\n" for line in lines).encode()
    )


LINE = "cls 512 1 {k}.cls json 1536 40 {k}.json u8 2560 192 {k}.u8"


def test_a_sound_index_parses():
    parsed = parse_index(index(LINE.format(k="a"), LINE.format(k="b")), samples=2,
                         image_shape=[8, 8, 3])  # fmt: skip
    assert [s.key for s in parsed] == ["a", "b"]
    assert parsed[0].files == {"cls": (512, 1), "json": (1536, 40), "u8": (2560, 192)}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (index(LINE.format(k="a")), "the DALI index lists 1 samples, the manifest says 2"),
        (index(LINE.format(k="a"), LINE.format(k="b"), count=3), "header 'v1.2 3'"),
        (index(LINE.format(k="a"), "cls 1 x a.cls"), "line 2 is malformed"),
        (index(LINE.format(k="a"), LINE.format(k="b").replace("b.u8", "c.u8")), "mixes samples"),
        (index(LINE.format(k="a"), LINE.format(k="b").replace(" 192 ", " 12 ")), "12 image"),
        (b"\xff", "not text"),
    ],
)
def test_an_index_that_does_not_match_is_refused(data, words):
    with pytest.raises(ShardError) as caught:
        parse_index(data, samples=2, image_shape=[8, 8, 3])
    assert words in str(caught.value)


def test_the_error_survives_a_dataloader_worker_as_one_line():
    try:
        raise ShardError("s3://b/train-000001.tar: sample 000042 (#4): class 9 outside 0..3")
    except ShardError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(ShardError) as caught:
        wrapped.reraise()
    assert str(caught.value) == "s3://b/train-000001.tar: sample 000042 (#4): class 9 outside 0..3"
