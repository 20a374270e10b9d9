"""Streaming shards from S3 (moto_server on loopback): same samples as local, despite faults."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading

import pytest
import s3fs

from pipeline import Key
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader
from tests.conftest import FIXED_SECRET, write_jpeg_tree

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only


class CuttingProxy:
    """A loopback TCP proxy to ``upstream`` that cuts ``cuts`` responses after ``after`` bytes
    (a connection reset in the middle of a shard, as a flaky network or a restart would)."""

    def __init__(self, upstream: tuple[str, int], *, after: int, cuts: int) -> None:
        self.upstream, self.after, self.cuts_left, self.cut = upstream, after, cuts, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)

        def pump(src, dst, count: bool) -> None:
            sent = 0
            try:
                while data := src.recv(65536):
                    if count:
                        with self.lock:
                            cut = self.cuts_left > 0 and sent + len(data) > self.after
                            if cut:
                                self.cuts_left -= 1
                                self.cut += 1
                        if cut:
                            dst.sendall(data[: max(0, self.after - sent)])
                            break  # the response ends mid-body
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                for s in (client, upstream):  # shutdown also wakes the other direction's thread
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        s.close()

        threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
        pump(upstream, client, True)

    def close(self) -> None:
        self.server.close()


def samples(data: str, workers: int = 0) -> list[tuple[str, int]]:
    config = LoaderConfig(batch_size=4, num_workers=workers, seed=3, shuffle_buffer=8)
    dataset = ShardDataset(data, "train", config=config)
    return [
        (hashlib.sha1(img.numpy().tobytes()).hexdigest(), int(label))
        for images, labels, _ in make_loader(dataset)
        for img, label in zip(images, labels, strict=True)
    ]


@pytest.fixture
def s3_shards(s3_env, tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=3, train=10, val=2, size=(96, 72))
    local = str(tmp_path / "local")
    remote = f"s3://{s3_env}/shards"
    for out in (local, remote):
        config = ShardConfig(src=str(src), out=out, size=64, decoder="pil", shard_size="8")
        build_shards(config, Key(FIXED_SECRET))
    return local, remote


def test_s3_stream_equals_local(s3_shards):
    local, remote = s3_shards
    expected = samples(local)
    assert len(expected) == 30
    assert samples(remote) == expected
    assert samples(remote, workers=2) == samples(local, workers=2)


def test_connection_cut_mid_shard_loses_and_repeats_nothing(
    s3_shards, s3_server, monkeypatch, caplog
):
    """8 cuts in a row outlast s3fs's own retries (5), so the loader's reconnect-and-continue
    is exercised too."""
    local, remote = s3_shards
    expected = samples(local)
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), after=40_000, cuts=8)  # shards are ~100 kB
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh client, reading the new endpoint
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.stream.remote"):
            got = samples(remote)
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.cut == 8  # the faults really happened
    assert "reopening" in caplog.text  # and some reached the loader's own retry
    assert got == expected
