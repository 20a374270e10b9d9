"""Every attack and evaluation entry point runs where the model is, with no device argument.

The bug this guards against: the audit put the model on CUDA, then the key searches called
``predict`` with its CPU default ("Input type (torch.FloatTensor) and weight type
(torch.cuda.FloatTensor) should be the same"). There is no GPU here, so a stand-in model plays
one (the only mock, for that reason): its weights are on PyTorch's ``meta`` device, it refuses
inputs from anywhere else, as CUDA does, and it records where each input came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import audit
from attacks.finetune import finetune
from attacks.key_search import heuristic_key_search, random_key_search
from pipeline import TRANSFORMS, Key
from pipeline.device import model_device, resolve_device
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.classifier import ProtectedClassifier
from pipeline.model.evaluation import EvalSet, predict, top1
from tests.conftest import FIXED_SECRET

pytestmark = pytest.mark.slow  # subprocesses, torchrun, moto or training: the full suite only

CLASSES = 3
SEEN: list[torch.device] = []  # module-level: copies of the model (fine-tuning) record here too


class ElsewhereModel(torch.nn.Module):
    """A model on another device than the CPU's. Meta tensors hold no data, so its logits do
    not depend on the input: fixed CPU values in eval mode (what ``predict`` copies to the host
    anyway), and differentiable meta values in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(CLASSES, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(x.device)
        if x.device != self.weight.device:
            raise RuntimeError(f"input on {x.device}, weights on {self.weight.device}")
        if self.training:
            return x.mean((1, 2, 3))[:, None] * 0 + self.weight
        return torch.arange(CLASSES, dtype=torch.float32).repeat(len(x), 1)


@pytest.fixture
def model():
    SEEN.clear()
    return ElsewhereModel().eval()


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(12) % CLASSES
    return images, labels


def assert_all_on_meta():
    assert SEEN and all(d.type == "meta" for d in SEEN), SEEN


def test_the_stand_in_refuses_cpu_inputs_as_cuda_does(model, data):
    with pytest.raises(RuntimeError, match="input on cpu"):
        predict(model, data[0], device="cpu")


def test_predict_top1_and_finetune_follow_the_model(model, data):
    images, labels = data
    assert model_device(model).type == "meta"
    assert predict(model, images).shape == (12, CLASSES)
    top1(model, EvalSet(images, labels, ["a", "b", "c"], None, 4, list(TRANSFORMS)))
    tuned = finetune(model, images, labels, steps=2, batch_size=4)
    assert model_device(tuned).type == "meta"
    assert_all_on_meta()


def test_key_searches_follow_the_model(model, data):
    images, labels = data
    rng = np.random.default_rng(0)
    random_key_search(model, images, labels, (4, TRANSFORMS), keys=2, rng=rng)
    heuristic_key_search(model, images, labels, (4, TRANSFORMS), steps=2, rng=rng)
    assert_all_on_meta()


def test_the_classifier_follows_the_model(model, data):
    key = Key(FIXED_SECRET)
    saved = Checkpoint("resnet18", ("a", "b", "c"), (16, 16, 3), key.fingerprint, block_size=4,
                       transforms=key.transforms)  # fmt: skip
    clf = ProtectedClassifier(model, saved, key)
    assert clf.device.type == "meta"
    assert clf.logits(data[0]).shape == (12, CLASSES)
    assert_all_on_meta()


def test_audit_scenarios_follow_the_model(model, data, tmp_path):
    images, labels = data
    key = Key(FIXED_SECRET)
    plain = EvalSet(images, labels, ["a", "b", "c"], None, 4, list(key.transforms))
    config = audit.AuditConfig(checkpoint="-", key="-", data="-", out=str(tmp_path),
                               wrong_keys=2, attacker_images=8, search_keys=2, search_steps=2,
                               leaked_images=12)  # fmt: skip
    saved = Checkpoint("resnet18", ("a", "b", "c"), (16, 16, 3), key.fingerprint)
    a = audit.Audit(
        config=config, model=model, saved=saved, val=plain, encrypted_val=plain,
        train_plain=plain, train_encrypted=images, train_total=12,
        true_op=key.material.encrypt_op, scheme=(4, key.transforms),
    )  # fmt: skip
    assert a.device.type == "meta"
    for scenario in (audit.correct_key, audit.no_key, audit.wrong_keys, audit.random_search,
                     audit.heuristic_search, audit.ciphertext_only,
                     audit.known_plaintext, audit.source_matching):  # fmt: skip
        SEEN.clear()
        assert scenario(a).rows, scenario.__name__
        assert_all_on_meta()


def test_one_device_resolution():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu0", "cuda:x", "tpu", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no weights: the CPU
