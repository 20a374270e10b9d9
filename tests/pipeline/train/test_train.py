"""The training library in process: one rank on the CPU, a tiny model, the digit shards."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import pytest
import torch

from pipeline.model.checkpoint import Checkpoint
from pipeline.train import TrainConfig, TrainError, TrainProgress, train
from pipeline.train.config import check_resume
from pipeline.train.distributed import Dist
from pipeline.train.entry import command_line, run_training, stopped_line
from pipeline.train.outputs import check_out, keep_metrics_before
from pipeline.train.state import lr_lambda, rng_state, set_rng_state

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model="test_efficientnet",
                       pretrained="none", batch_size=64, workers=0, warmup_epochs=0.5,
                       **kw)  # fmt: skip


def test_lr_warms_up_then_follows_a_cosine_to_zero():
    f = lr_lambda(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_rng_states_round_trip():
    torch.manual_seed(3)
    state = rng_state()
    first = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(state)
    again = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_metrics_of_later_epochs_and_torn_lines_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2}\n{"epo')
    keep_metrics_before(path, 2)
    assert [json.loads(x)["epoch"] for x in path.read_text().splitlines()] == [0, 1]


def test_resume_with_a_changed_setting_names_it():
    saved = Checkpoint(model_name="resnet18", classes=("a",), image_shape=(8, 8, 3),
                       key_fingerprint=None, config={**vars(TrainConfig()), "lr": 0.1},
                       world_size=1)  # fmt: skip
    with pytest.raises(TrainError, match=r"lr 0.1 -> 0.005.*only these may change"):
        check_resume(saved, TrainConfig(), 1, "ck.pt")
    check_resume(saved, TrainConfig(lr=0.1, epochs=8), 1, "ck.pt")  # the same: no error


def test_the_record_keeps_paths_as_given_and_of_the_key_its_file_name_only():
    config = TrainConfig(data="shards", out="runs/x", init="absorb", init_checkpoint="p/c.pt",
                         key="/home/owner/vault/k.bin", data_key="../data.key")  # fmt: skip
    record = config.record()
    assert record["key"] == "k.bin" and "vault" not in json.dumps(record)
    assert (record["data"], record["out"], record["init_checkpoint"], record["data_key"]) == (
        "shards", "runs/x", "p/c.pt", "../data.key")  # fmt: skip
    assert {**record, "key": config.key} == vars(config)  # nothing else changed
    assert TrainConfig().record()["key"] is None


def test_an_out_with_a_checkpoint_is_refused_unless_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "summary.json").write_text("{}")
    config = TrainConfig(out=str(tmp_path))
    with pytest.raises(TrainError) as refused:
        check_out(config, "python train/ddp.py --out R")
    said = str(refused.value)
    assert "a finished run" in said
    assert f"python train/ddp.py --out R --resume {tmp_path / 'checkpoint.pt'}" in said
    assert "python train/ddp.py --out R --overwrite" in said
    check_out(replace(config, overwrite=True), "x")
    check_out(replace(config, resume=str(tmp_path / "checkpoint.pt")), "x")


def test_the_commands_that_go_on_drop_resume_and_overwrite(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    argv = ["--out", "r", "--resume", "r/checkpoint.pt", "--epochs", "3", "--overwrite"]
    assert command_line(argv) == "python train/ddp.py --out r --epochs 3"
    assert command_line(["--resume", "--out", "r"]) == "python train/ddp.py --out r"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert command_line(["--out", "r"]).startswith("torchrun --standalone --nproc_per_node=2 ")


def test_ctrl_c_line_says_where_the_run_stands(tmp_path):
    config = TrainConfig(out=str(tmp_path))
    line = stopped_line(config, TrainProgress(epoch=1, step=7, saved=(1, 0)), "CMD")
    assert "epoch 1 at step 7" in line and "holds epoch 1, step 0" in line
    assert f"`CMD --resume {tmp_path / 'checkpoint.pt'}`" in line
    assert "start it again with `CMD`" in stopped_line(config, TrainProgress(), "CMD")


@pytest.mark.slow
def test_one_rank_trains_in_process_and_marks_its_checkpoint(digit_shards, tmp_path, caplog):
    out = tmp_path / "run"
    progress = TrainProgress()
    metrics = train(tiny(digit_shards, out, epochs=1, max_steps=3), CPU, progress=progress)
    assert metrics["epoch"] == 0 and 0 <= metrics["val_top1"] <= 1
    saved = Checkpoint.load(out / "checkpoint.pt")
    assert (saved.epoch, saved.step_in_epoch, saved.finished) == (0, 3, False)
    assert progress.saved == (0, 3) and (progress.epoch, progress.step) == (0, 3)
    assert not (out / "summary.json").exists()  # stopped by --max-steps: not finished
    assert "unfinished run" in saved.unfinished_note(out / "checkpoint.pt")

    # the same command again is refused, the finished run is not touched
    with caplog.at_level(logging.ERROR):
        assert run_training(tiny(digit_shards, out, epochs=1), argv=["--out", str(out)]) == 2
    assert "--resume" in caplog.text and "--overwrite" in caplog.text
    assert Checkpoint.load(out / "checkpoint.pt").step_in_epoch == 3

    # --resume finishes it: the checkpoint says so, and summary.json is there
    config = tiny(digit_shards, out, epochs=1, resume=str(out / "checkpoint.pt"))
    with caplog.at_level(logging.INFO):
        train(config, CPU)
    assert "resuming from" in caplog.text
    finished = Checkpoint.load(out / "checkpoint.pt")
    assert finished.finished is True and finished.unfinished_note("x") is None
    assert (out / "summary.json").exists()


@pytest.mark.slow
def test_config_json_and_the_checkpoint_keep_relative_paths(digit_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(digit_shards, tmp_path)
    train(tiny(data, "runs/rel", epochs=1, max_steps=1), CPU)
    written = json.loads((tmp_path / "runs/rel/config.json").read_text())
    saved = Checkpoint.load(tmp_path / "runs/rel/checkpoint.pt")
    for config in (written, saved.config):
        assert (config["data"], config["out"]) == (data, "runs/rel") and config["key"] is None
        assert str(tmp_path) not in json.dumps(config)


def test_a_collective_timeout_counts_as_a_lost_peer():
    from pipeline.train.distributed import lost_peer

    # gloo's words when DDP's own buffer broadcast times out on a hung rank
    assert lost_peer(RuntimeError("Application timeout caused pair closure"))
    assert lost_peer(
        RuntimeError("[/pytorch/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    )
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
