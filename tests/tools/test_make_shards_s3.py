"""make_shards to s3:// and verify_shards from it, against moto_server on loopback."""

from __future__ import annotations

import json

import fsspec
import pytest

from tests.tools.conftest import files, shard_args, tool

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


def test_s3_round_trip_matches_local(tree, key_file, reference, s3_env):
    url = f"s3://{s3_env}/imagenet/subset"
    made = tool("make_shards.py", *shard_args(tree, key_file, url))
    assert made.returncode == 0, made.stderr
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_env}/imagenet/subset"))
    assert names == sorted(files(reference))  # no progress records or partial files left
    for name, data in files(reference).items():
        assert fs.cat_file(f"{s3_env}/imagenet/subset/{name}") == data
    ok = tool("verify_shards.py", url)
    assert ok.returncode == 0 and "16 shards, 64 samples" in ok.stderr, ok.stderr
    again = tool("make_shards.py", *shard_args(tree, key_file, url))
    assert again.returncode == 0 and "already complete" in again.stderr

    manifest = json.loads(fs.cat_file(f"{s3_env}/imagenet/subset/val.manifest.json"))
    bad = bytearray(fs.cat_file(f"{s3_env}/imagenet/subset/{manifest['shards'][0]['name']}"))
    bad[2000] ^= 0xFF
    fs.pipe_file(f"{s3_env}/imagenet/subset/{manifest['shards'][0]['name']}", bytes(bad))
    failed = tool("verify_shards.py", url)
    assert failed.returncode == 1 and manifest["shards"][0]["name"] in failed.stderr
