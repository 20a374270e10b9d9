"""verify_shards names the shard and the sample of any malformed member instead of crashing."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from pipeline.shards.verify import verify_shards


def _rewrite_member(path, suffix: str, data: bytes) -> str:
    """Replace the first member ending in ``suffix``; return its sample key."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m for m, _ in members if m.name.endswith(suffix))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member, content in members:
            if member is target:
                content = data
                member.size = len(data)
            tar.addfile(member, io.BytesIO(content))
    path.write_bytes(buffer.getvalue())
    return target.name.partition(".")[0]


@pytest.mark.parametrize(
    ("suffix", "data", "message"),
    [
        (".json", b"[1, 2]", "holds a list, expected an object"),
        (".json", b"\xff\xfe{", "is not JSON"),
        (".json", b'{"shape": "x"}', "shape x is not"),
        (".cls", b"seven", "is not a class index"),
        (".cls", b"99", "outside"),
    ],
)
def test_malformed_members_are_named(shards, tmp_path, suffix, data, message):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    key = _rewrite_member(out / "val-000000.tar", suffix, data)
    report = verify_shards(str(out), splits=("val",))
    assert not report.ok
    sample_problems = [p for p in report.problems if f"sample {key}" in p]
    assert len(sample_problems) == 1, report.problems
    assert "val-000000.tar" in sample_problems[0] and message in sample_problems[0]
    assert any("SHA-256 mismatch" in p for p in report.problems)


def test_sound_shards_verify(shards):
    report = verify_shards(shards)
    assert report.ok, report.problems
    assert report.checked_samples > 0
