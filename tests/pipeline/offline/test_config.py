"""A run's configuration: the shard size in samples or bytes."""

from __future__ import annotations

import pytest

from pipeline.offline.config import samples_per_shard


@pytest.mark.parametrize(
    "text, expected", [("1000", 1000), ("1", 1), ("1MB", 64), ("2GiB", 137_518)]
)
def test_shard_size_parsing(text, expected):
    assert samples_per_shard(text, 12288) == expected


@pytest.mark.parametrize("text", ["0", "1.5", "ten", "5TB", ""])
def test_shard_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="shard-size"):
        samples_per_shard(text, 12288)
