"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest

from pipeline import Key
from pipeline.offline.build import ShardConfig, build_shards
from tests.conftest import FIXED_SECRET, write_jpeg_tree


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """40 train samples in 3 uneven shards (15, 15, 10), 64x64 stored, M=4."""
    root = tmp_path_factory.mktemp("loader")
    src = write_jpeg_tree(root / "src", classes=4, train=10, val=3, size=(96, 72))
    config = ShardConfig(src=str(src), out=str(root / "shards"), size=64, decoder="pil",
                         shard_size="15", batch_size=8)  # fmt: skip
    build_shards(config, Key(FIXED_SECRET))
    return str(root / "shards")


@pytest.fixture
def s3_requests(monkeypatch):
    """Every S3 request this process makes (through botocore's client) from now on, as
    (operation, key or prefix), e.g. ("PutObject", "out/train-000000.tar")."""
    from aiobotocore.client import AioBaseClient

    made: list[tuple[str, str]] = []
    real = AioBaseClient._make_api_call

    async def counted(self, operation, params):
        made.append((operation, params.get("Key", params.get("Prefix", ""))))
        return await real(self, operation, params)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", counted)
    return made
