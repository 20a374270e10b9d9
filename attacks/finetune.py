"""The fine-tuning attack: does a stolen protected model give a head start without the key?

The attacker fine-tunes the protected model on a few plain labelled images; the comparison is
the public pre-trained model fine-tuned on the same images with the same budget. If the
stolen model ends clearly higher, its training on encrypted data leaked into plain-image
accuracy.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from tqdm import tqdm

from pipeline.device import model_device
from pipeline.stream.dataset import to_model_input

logger = logging.getLogger(__name__)


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``fraction`` of the images, at least one of every class."""
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def finetune(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """A fine-tuned copy of ``model`` (on ``model``'s device unless ``device`` says otherwise):
    AdamW with a cosine schedule and no augmentation, the same recipe for the stolen and the
    public model."""
    device = model_device(model) if device is None else torch.device(device)
    model = copy.deepcopy(model).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels).long()
    for _ in tqdm(range(steps), desc=f"fine-tune on {len(images)} images", leave=False):
        batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        logits = model(to_model_input(x_all[batch], device))
        loss = torch.nn.functional.cross_entropy(logits, y_all[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
