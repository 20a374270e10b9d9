"""Which GPU an offline-stage rank takes. No GPU here: torch's device count is set by hand
(the one stand-in, for that reason)."""

from __future__ import annotations

import pytest
import torch

from pipeline.device import rank_gpu
from pipeline.errors import ConfigError


@pytest.mark.parametrize("gpus, expected", [(8, [0, 1, 2, 3]), (2, [0, 1, 0, 1]), (1, [0] * 4)])
def test_ranks_take_their_own_gpu_and_share_when_there_are_fewer(monkeypatch, gpus, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert [rank_gpu(local_rank) for local_rank in range(4)] == expected


def test_no_gpu_is_an_error_that_says_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="no CUDA device.*cpu"):
        rank_gpu(0)
