"""The fine-tuning attack's pieces: stratified subsets and a fine-tune that learns."""

from __future__ import annotations

import numpy as np
import torch

from attacks.finetune import finetune, stratified_subset
from pipeline.model.evaluation import predict
from pipeline.model.factory import create_model


def test_subsets_take_every_class_and_the_fraction():
    labels = np.repeat(np.arange(5), [40, 40, 40, 40, 3])
    picked = stratified_subset(labels, 0.1, np.random.default_rng(0))
    counts = np.bincount(labels[picked], minlength=5)
    assert counts.tolist() == [4, 4, 4, 4, 1]  # at least one of every class
    assert len(set(picked.tolist())) == len(picked)


def test_finetune_learns_its_images_and_leaves_the_model_alone(rng):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=2, pretrained="none").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = np.zeros((16, 32, 32, 3), np.uint8)
    images[8:] = 255  # class 1: white, class 0: black
    labels = np.repeat([0, 1], 8)
    tuned = finetune(model, images, labels, steps=30, batch_size=8, lr=1e-2)
    assert (predict(tuned, images).argmax(1) == labels).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy
