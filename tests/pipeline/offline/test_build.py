"""The offline stage as a library: shards, manifest, exact decryption, rejects, refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import Key, decrypt
from pipeline.errors import KeyprotectError
from pipeline.offline import makers
from pipeline.offline.build import build_shards
from pipeline.offline.config import ShardBuildError, ShardConfig
from pipeline.offline.decode import decode_pil
from pipeline.offline.sources import SourceError
from pipeline.shards.manifest import load_manifest
from pipeline.storage import Storage
from tests.conftest import FIXED_SECRET, sources_by_key, write_jpeg_tree


def config(src, out, **kw) -> ShardConfig:
    base = dict(src=str(src), out=str(out), size=64, shard_size="5", decoder="pil", batch_size=4)
    return ShardConfig(**{**base, **kw})


def read_samples(path: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"key": key})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def test_shards_manifest_and_exact_decryption(jpeg_tree, tmp_path):
    key = Key(FIXED_SECRET)
    manifests = build_shards(config(jpeg_tree, tmp_path / "out"), key)
    train = manifests["train"]
    assert train.total_samples == 24 and [s.samples for s in train.shards] == [5, 5, 5, 5, 4]
    assert train.encrypted and train.key_fingerprint == key.fingerprint
    assert train.block_size == 4 and train.transforms == ["shuffle", "np", "ffx"]
    assert train.image_shape == [64, 64, 3] and train.classes == [f"n{c:08d}" for c in range(3)]
    assert manifests["val"].total_samples == 9
    assert FIXED_SECRET.hex() not in (tmp_path / "out" / "train.manifest.json").read_text()

    labels = []
    sources = sources_by_key(jpeg_tree, tmp_path / "out", key, "train")
    for record in train.shards:
        path = tmp_path / "out" / record.name
        assert path.stat().st_size == record.bytes
        for sample in read_samples(path):
            meta = json.loads(sample["json"])
            assert set(meta) == {"shape", "split"}  # no source in encrypted shards
            image = np.frombuffer(sample["u8"], np.uint8).reshape(meta["shape"])
            source = decode_pil((jpeg_tree / sources[sample["key"]]).read_bytes(), 64)
            assert np.array_equal(decrypt(image, key), source)  # lossless, same decoder
            assert not np.array_equal(image, source)
            assert sources[sample["key"]].split("/")[1] == train.classes[int(sample["cls"])]
            labels.append(int(sample["cls"]))
    assert sorted(set(labels[:10])) != [labels[0]]  # shards mix the classes


def test_samples_table_lists_every_sample(jpeg_tree, tmp_path):
    import pyarrow.parquet as pq

    manifest = build_shards(config(jpeg_tree, tmp_path, plain=True, splits=("train",)), None)
    manifest = manifest["train"]
    table = pq.read_table(tmp_path / manifest.samples_table).to_pylist()
    assert len(table) == manifest.total_samples == 24
    for record in manifest.shards:
        in_tar = [
            (int(s["cls"]), json.loads(s["json"])["source"])
            for s in read_samples(tmp_path / record.name)
        ]
        listed = [(r["label"], r["source"]) for r in table if r["shard"] == record.name]
        assert listed == in_tar


def test_plain_shards(jpeg_tree, tmp_path):
    manifest = build_shards(config(jpeg_tree, tmp_path, plain=True, splits=("val",)), None)["val"]
    assert not manifest.encrypted and manifest.key_fingerprint is None
    sample = read_samples(tmp_path / manifest.shards[0].name)[0]
    meta = json.loads(sample["json"])
    source = decode_pil((jpeg_tree / meta["source"]).read_bytes(), 64)
    assert np.array_equal(np.frombuffer(sample["u8"], np.uint8).reshape(64, 64, 3), source)


def test_subset_is_deterministic_and_seeded(jpeg_tree, tmp_path):
    def sources(out, seed):
        cfg = config(jpeg_tree, out, per_class=2, seed=seed, splits=("train",), plain=True)
        build_shards(cfg, None)
        return [
            json.loads(s["json"])["source"]
            for p in sorted(Path(out).glob("train-*.tar"))
            for s in read_samples(p)
        ]

    a = sources(tmp_path / "a", 0)
    assert len(a) == 6
    assert a == sources(tmp_path / "b", 0)
    assert a != sources(tmp_path / "c", 1)


def test_finished_output_is_not_redone_and_other_options_are_refused(jpeg_tree, tmp_path):
    key = Key(FIXED_SECRET)
    build_shards(config(jpeg_tree, tmp_path, splits=("val",)), key)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    build_shards(config(jpeg_tree, tmp_path, splits=("val",)), key)  # a no-op
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(
        ShardBuildError, match="encrypted with key .*this run has key .*--overwrite"
    ):
        build_shards(config(jpeg_tree, tmp_path, splits=("val",)), Key(bytes(32)))
    with pytest.raises(ShardBuildError, match="size was 64, this run has 32"):
        build_shards(config(jpeg_tree, tmp_path, splits=("val",), size=32), key)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    other = build_shards(
        config(jpeg_tree, tmp_path, splits=("val",), size=32, overwrite=True), key
    )["val"]
    assert other.image_shape == [32, 32, 3]


def add_bad_files(root: Path) -> dict[str, str]:
    """ImageNet's real-world oddities, in class 0 of train. Returns name -> expected fate."""
    folder = root / "train" / "n00000000"
    good = Image.open(next(folder.glob("*.JPEG"))).convert("RGB")
    (folder / "zero.JPEG").write_bytes(b"")
    data = (folder / next(folder.glob("img_*.JPEG")).name).read_bytes()
    (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "notes.JPEG").write_text("this is not an image\n")
    good.convert("CMYK").save(folder / "cmyk.JPEG", quality=95)
    good.convert("L").save(folder / "gray.JPEG", quality=95)
    good.save(folder / "png_named.JPEG", format="PNG")
    Image.new("RGB", (3000, 2500), (10, 200, 30)).save(folder / "huge.JPEG", quality=50)
    return {
        "zero.JPEG": "reject",
        "truncated.JPEG": "reject",
        "notes.JPEG": "reject",
        "huge.JPEG": "reject",
        "cmyk.JPEG": "keep",
        "gray.JPEG": "keep",
        "png_named.JPEG": "keep",
    }


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_real_world_files_are_converted_or_rejected(tmp_path, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=6, val=2)
    fates = add_bad_files(src)
    cfg = config(src, tmp_path / "out", plain=True, splits=("train",), max_pixels=5_000_000,
                 decoder=decoder, device="cpu")  # fmt: skip
    # stops at the first shard that takes the rejects over the limit, naming it
    match = r"train: \d of 19 files rejected \(up to shard train-\d{6}\.tar\).*--max-reject-fr"
    with pytest.raises(ShardBuildError, match=match):
        build_shards(cfg, None)
    assert not (tmp_path / "out" / "train.manifest.json").exists()

    manifest = build_shards(
        config(src, tmp_path / "out", plain=True, splits=("train",), max_pixels=5_000_000,
               max_reject_fraction=0.25, decoder=decoder, device="cpu"),
        None,
    )["train"]  # fmt: skip
    rejected = {Path(r["source"]).name: r["reason"] for r in manifest.rejects}
    assert set(rejected) == {n for n, fate in fates.items() if fate == "reject"}
    assert "empty" in rejected["zero.JPEG"]
    assert "not a recognised image" in rejected["notes.JPEG"]
    assert "--max-pixels" in rejected["huge.JPEG"]
    assert manifest.total_samples == 19 - 4
    kept = {}
    for record in manifest.shards:
        for s in read_samples(tmp_path / "out" / record.name):
            name = Path(json.loads(s["json"])["source"]).name
            kept[name] = np.frombuffer(s["u8"], np.uint8).reshape(64, 64, 3)
    folder = src / "train" / "n00000000"
    for name in ("cmyk.JPEG", "gray.JPEG", "png_named.JPEG"):
        expected = np.asarray(
            Image.open(folder / name).convert("RGB").resize((85, 64), Image.Resampling.BILINEAR)
        )[:, 10:74]
        assert np.abs(kept[name].astype(int) - expected).mean() < 2  # RGB, right way round
    gray = kept["gray.JPEG"].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        build_shards(config(tmp_path / "missing", tmp_path / "o", plain=True), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no 'train' folder"):
        build_shards(config(tmp_path / "empty", tmp_path / "o", plain=True), None)
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=2, val=1)
    (src / "train" / "n00000009").mkdir()
    with pytest.raises(SourceError, match="n00000009: empty class folder"):
        build_shards(config(src, tmp_path / "o", plain=True), None)
    shutil.rmtree(src / "train" / "n00000009")
    with pytest.raises(ValueError, match="not a multiple of the key's block size 8"):
        build_shards(config(src, tmp_path / "o", size=60), Key(FIXED_SECRET, block_size=8))


def test_classes_file_sets_label_order(tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=3, train=2, val=1)
    classes = tmp_path / "classes.txt"
    classes.write_text("n00000002\nn00000000\nn00000001\n")
    manifest = build_shards(
        config(src, tmp_path / "o", plain=True, splits=("val",), classes_file=str(classes)), None
    )["val"]
    assert manifest.classes == ["n00000002", "n00000000", "n00000001"]
    for s in read_samples(tmp_path / "o" / manifest.shards[0].name):
        folder = json.loads(s["json"])["source"].split("/")[1]
        assert manifest.classes[int(s["cls"])] == folder


def test_tar_is_gnu_format_and_reproducible(jpeg_tree, tmp_path):
    key = Key(FIXED_SECRET)
    a = build_shards(config(jpeg_tree, tmp_path / "a", splits=("val",)), key)["val"]
    b = build_shards(config(jpeg_tree, tmp_path / "b", splits=("val",)), key)["val"]
    assert a.to_json() == b.to_json()
    for record in a.shards:
        data = (tmp_path / "a" / record.name).read_bytes()
        assert data == (tmp_path / "b" / record.name).read_bytes()
        assert data[257:265] == b"ustar  \x00"  # GNU magic; PAX would add 'x' headers
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert all(m.type == tarfile.REGTYPE and m.mtime == 0 for m in tar.getmembers())
    assert load_manifest(Storage(tmp_path / "a"), "val").total_samples == 9


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_the_encryption_device_does_not_change_the_bytes(jpeg_tree, tmp_path, device):
    key = Key(FIXED_SECRET)
    ref = build_shards(config(jpeg_tree, tmp_path / "a", splits=("val",)), key)["val"]
    other = build_shards(
        config(jpeg_tree, tmp_path / "b", splits=("val",), encrypt_device=device), key
    )["val"]
    assert [s.sha256 for s in other.shards] == [s.sha256 for s in ref.shards]
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        build_shards(config(jpeg_tree, tmp_path / "c", encrypt_device="gpu0"), key)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_the_cpu_paths_never_import_torch(jpeg_tree, tmp_path, decoder):
    """torch adds about 450 MB to a process's peak RSS: make_shards on the CPU (numpy
    encryption) must not import it, in a fresh process as a user runs it."""
    import subprocess
    import sys

    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    code = (
        "import sys\n"
        "from pipeline import Key\n"
        "from pipeline.offline.build import ShardConfig, build_shards\n"
        f"build_shards(ShardConfig(src={str(jpeg_tree)!r}, out={str(tmp_path / 'out')!r}, "
        f"size=64, decoder={decoder!r}, device='cpu', splits=('val',)), Key(bytes(32)))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_more_ranks_than_gpus_share_them_round_robin(monkeypatch):
    """Four ranks on a node of two GPUs encrypt on cuda:0, 1, 0, 1 (no GPU here: torch's CUDA
    answers are set by hand, and set_device is recorded)."""
    from pipeline.offline.config import encryption_device

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert [encryption_device("cuda", "cpu", r) for r in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert [encryption_device("auto", "gpu", r) for r in range(4)] == ["auto"] * 4
    assert chosen == [0, 1, 0, 1]  # a GPU decoder's rank decodes on its shared GPU


def test_each_rank_says_which_stage_held_it_up(jpeg_tree, tmp_path, caplog):
    """The builder's time split (a decoder feeding this process: DALI on the CPU here), and how
    busy PIL's shard processes were: shares of the time, each within 0-100%."""
    import re

    key = Key(FIXED_SECRET)
    caplog.set_level("INFO", logger="pipeline.offline.build")
    build_shards(config(jpeg_tree, tmp_path / "dali", splits=("val",), decoder="dali"), key)
    line = re.search(r"val: rank 0: the builder spent [\d.]+ m?s: (.*)", caplog.text)
    assert line is not None
    shares = [int(p) for p in re.findall(r"(\d+)%", line.group(1))]
    assert len(shares) == 4 and all(0 <= p <= 100 for p in shares) and 97 <= sum(shares) <= 103
    threads = re.search(r"its 2 decode threads spent ([\d.]+) m?s reading files and ([\d.]+) m?s "
                        r"decoding", line.group(1))  # fmt: skip
    assert threads is not None and float(threads.group(2)) > 0  # DALI on 64 px JPEGs: > 0.05 ms
    caplog.clear()
    build_shards(config(jpeg_tree, tmp_path / "pil", splits=("val",), num_threads=2), key)
    busy = re.search(
        r"val: rank 0: 2 shard process\(es\) busy (\d+)% .* waited (\d+)%", caplog.text
    )
    assert busy is not None and 0 <= int(busy.group(1)) <= 100 and 0 <= int(busy.group(2)) <= 100
    caplog.clear()
    build_shards(config(jpeg_tree, tmp_path / "pil", splits=("val",), num_threads=2), key)
    assert "busy" not in caplog.text  # a complete output: nothing was built, nothing to say


def test_progress_made_under_another_key_never_counts(jpeg_tree, tmp_path, monkeypatch):
    """Two runs interleaved: records of shards made with key A, options file of key B."""
    from pipeline.offline import build
    from pipeline.offline.plan import plan_split
    from pipeline.offline.progress import record_bytes

    key_a, key_b = Key(FIXED_SECRET), Key(bytes(32))
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # run A dies after its shards, before its manifest
        m.setattr(build, "_finish_split", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build_shards(config(jpeg_tree, out, splits=("val",)), key_a)
    records = sorted((out / "_progress").glob("val.0*.json"))
    assert records and json.loads(records[0].read_text())["key_fingerprint"] == key_a.fingerprint
    identity_b = plan_split(config(jpeg_tree, out, splits=("val",)), "val", key_b).identity
    (out / "_progress" / "val.options.json").write_bytes(record_bytes(identity_b.to_json()))

    build_shards(config(jpeg_tree, out, splits=("val",)), key_b)
    build_shards(config(jpeg_tree, tmp_path / "clean", splits=("val",)), key_b)
    made = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert made == {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}


def test_a_rerun_with_decoder_auto_keeps_the_decoder_the_output_was_made_with(
    jpeg_tree, tmp_path, monkeypatch, caplog
):
    """Made with PIL (asked for), cut short, rerun with --decoder auto where auto would take
    DALI: it resumes with PIL and says so, the bytes are a clean PIL run's, and a rerun of the
    finished output with auto finds it complete (before, both were refused: other options)."""
    pytest.importorskip("nvidia.dali", reason="auto takes DALI only where it is installed")
    from pipeline.offline import build
    from pipeline.offline.config import choose_decoder

    assert choose_decoder("auto", "cpu") == ("dali", "cpu")
    key, out = Key(FIXED_SECRET), tmp_path / "out"
    with monkeypatch.context() as m:  # the PIL run dies after its shards, before its manifest
        m.setattr(build, "_finish_split", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build_shards(config(jpeg_tree, out, splits=("val",)), key)
    caplog.set_level("INFO", logger="pipeline.offline.build")
    auto = config(jpeg_tree, out, splits=("val",), decoder="auto", device="cpu")
    made = build_shards(auto, key)["val"]
    assert made.options["decoder"] == "pil" and "resuming:" in caplog.text
    assert "the one this output was made with; a new output here would get dali" in caplog.text
    build_shards(config(jpeg_tree, tmp_path / "clean", splits=("val",)), key)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    caplog.clear()
    build_shards(auto, key)
    assert "already complete" in caplog.text


def test_a_split_with_no_samples_is_an_error_naming_it(tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=2, val=2)
    for path in (src / "val").rglob("*.JPEG"):
        path.write_bytes(b"not an image")
    with pytest.raises(ShardBuildError, match="val: no samples: all 4 selected files"):
        build_shards(config(src, tmp_path / "o", plain=True, max_reject_fraction=1.0), None)
    assert (tmp_path / "o" / "train.manifest.json").exists()
    assert not (tmp_path / "o" / "val.manifest.json").exists()


def test_the_setup_verdict_crosses_ranks_as_text_and_back():
    from pipeline.offline.build import Handshake, SetupVerdict

    for verdict in (SetupVerdict(True, "abc"), SetupVerdict(False, "d" * 64)):
        assert SetupVerdict.from_text(verdict.to_text()) == verdict
    with pytest.raises(ShardBuildError, match="cannot read"):
        SetupVerdict.from_text("maybe:abc")
    assert Handshake.BUILT.of("val") == "val/built"


def test_pil_shards_built_in_processes_do_not_depend_on_how_many(jpeg_tree, tmp_path):
    """PIL with CPU encryption builds whole shards in --threads processes (issue 19): the
    shards, manifest and order are the same with 1 and 3 of them, sealed or not."""
    from pipeline.cipher.seal import generate_data_key
    from pipeline.shards.sealing import open_output

    key, data_key = Key(FIXED_SECRET), generate_data_key()
    made = {}
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        manifests = build_shards(config(jpeg_tree, out, num_threads=threads), key)
        made[threads] = {s: [(r.name, r.samples, r.sha256) for r in m.shards]
                         for s, m in manifests.items()}  # fmt: skip
        sealed = tmp_path / f"sealed{threads}"
        build_shards(config(jpeg_tree, sealed, num_threads=threads), key, data_key=data_key)
        opened = open_output(str(sealed), data_key)
        for name, _, sha in made[threads]["train"]:
            assert hashlib.sha256(opened.read_bytes(name)).hexdigest() == sha
    assert made[1] == made[3] and len(made[1]["train"]) == 5


def _dies_on_the_third(job):
    """In a shard-building process (imported there by name): killed on shard 2."""
    import pipeline.offline.makers as makers

    if job.name.endswith("000002.tar"):
        os.kill(os.getpid(), signal.SIGKILL)
    return makers._make_shard(job)


def test_a_killed_shard_process_is_one_line_and_the_rerun_resumes(jpeg_tree, tmp_path, monkeypatch):
    import pipeline.offline.makers as makers

    key, out = Key(FIXED_SECRET), tmp_path / "out"
    real = makers._make_shard
    monkeypatch.setattr(makers, "_make_shard", _dies_on_the_third)
    with pytest.raises(KeyprotectError) as caught:
        build_shards(config(jpeg_tree, out, num_threads=1, splits=("train",)), key)
    assert "a decoding process died" in str(caught.value) and "\n" not in str(caught.value)
    assert not list(out.rglob("*.partial"))  # no staging file left behind
    monkeypatch.setattr(makers, "_make_shard", real)
    manifest = build_shards(config(jpeg_tree, out, num_threads=1, splits=("train",)), key)
    assert manifest["train"].total_samples == 24


def test_the_builder_never_waits_on_the_disk_and_every_shard_is_synced_before_its_name(
    jpeg_tree, tmp_path, monkeypatch
):
    """With a decoder feeding this process (DALI on the CPU here) the builder's thread leaves
    each staged shard unsynced; the publisher's thread syncs it before it takes its name."""
    import threading

    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "dali"
    manifest = build_shards(config(jpeg_tree, out, splits=("val",), decoder="dali"),
                            Key(FIXED_SECRET))["val"]  # fmt: skip
    staged = {Path(path).name: thread for thread, path in synced if path.endswith(".tar.partial")}
    shards = [record.name for record in manifest.shards]
    assert len(shards) > 1 and sorted(staged) == sorted(f".{name}.partial" for name in shards)
    assert set(staged.values()) == {"shard-publish_0"}
    assert all((out / name).is_file() for name in shards)


def test_a_batchs_files_are_read_several_at_once_and_kept_in_order(
    jpeg_tree, tmp_path, monkeypatch
):
    """With a decoder feeding this process (DALI on the CPU here) a batch's files are read in
    parts at once, so a network file system's latency per file overlaps: each read here takes
    a few ms, as on one. The shards are those of one file at a time."""
    import threading

    key = Key(FIXED_SECRET)
    one_at_a_time = tmp_path / "one"
    monkeypatch.setattr(makers, "READ_PARTS", 1)
    build_shards(config(jpeg_tree, one_at_a_time, splits=("train",), decoder="dali",
                        batch_size=8), key)  # fmt: skip
    monkeypatch.setattr(makers, "READ_PARTS", 4)
    reading, most, lock = [0], [0], threading.Lock()
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        time.sleep(0.005)
        try:
            return real_read(path)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    at_once = tmp_path / "at-once"
    build_shards(config(jpeg_tree, at_once, splits=("train",), decoder="dali", batch_size=8), key)
    monkeypatch.setattr(Path, "read_bytes", real_read)
    assert most[0] >= 4  # four parts of a batch at once (two batches decode ahead)
    shards = sorted(p.name for p in one_at_a_time.glob("*.tar"))
    assert shards and all(
        (one_at_a_time / n).read_bytes() == (at_once / n).read_bytes() for n in shards
    )
