"""Key search with the model as an oracle (after github.com/fugokidi/block_transform,
cifar10/attacks/adaptive_attacks.py).

The attacker knows the algorithm and the scheme, holds the protected model and a small labelled
set of plain images. Random search draws keys of the scheme and keeps the one with the best
accuracy on that set. Heuristic search starts from a random key and climbs: swap two
permutation entries, flip an NP or FFX mask bit, or swap two table entries, and keep the change
unless accuracy drops (ties are broken by the mean log-likelihood of the true labels, which makes
the climb far less blind than accuracy alone).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from attacks.keyspace import random_material
from pipeline import KeyMaterial, encrypt
from pipeline.model.evaluation import predict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    material: KeyMaterial
    accuracy: float  # on the attacker's set
    tried: int  # keys evaluated
    accepted: int = 0  # heuristic search: moves kept


def fitness(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, material: KeyMaterial
) -> tuple[float, float]:
    """(accuracy, mean log-likelihood of the true label) of the model on images encrypted
    with ``material``."""
    logits = torch.from_numpy(predict(model, encrypt(images, material)))
    log_p = torch.log_softmax(logits, 1)[torch.arange(len(labels)), torch.from_numpy(labels)]
    return float((logits.argmax(1).numpy() == labels).mean()), float(log_p.mean())


def random_key_search(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    scheme: tuple[int, tuple[str, ...]],
    *,
    keys: int,
    rng: np.random.Generator,
    extra: Iterable[KeyMaterial] = (),
) -> SearchResult:
    """Try ``keys`` random keys of ``scheme`` (plus any ``extra`` candidates); keep the best."""
    candidates = [random_material(*scheme, rng) for _ in range(keys)] + list(extra)
    best, best_fit = None, (-1.0, -np.inf)
    for material in tqdm(candidates, desc="random key search", leave=False):
        fit = fitness(model, images, labels, material)
        if fit > best_fit:
            best, best_fit = material, fit
    assert best is not None
    return SearchResult(best, best_fit[0], len(candidates))


def _neighbour(material: KeyMaterial, rng: np.random.Generator) -> KeyMaterial:
    """One random move within the parts the scheme uses."""
    moves = [t for t in material.transforms] + (["table"] if "ffx" in material.transforms else [])
    move = moves[rng.integers(len(moves))]
    n = len(material.permutation)
    i, j = rng.choice(n if move != "table" else 256, size=2, replace=False)
    if move == "shuffle":
        perm = material.permutation.copy()
        perm[[i, j]] = perm[[j, i]]
        return replace(material, permutation=perm)
    if move == "table":
        table = material.ffx_table.copy()
        table[[i, j]] = table[[j, i]]
        return replace(material, ffx_table=table)
    name = "np_mask" if move == "np" else "ffx_mask"
    mask = getattr(material, name).copy()
    mask[i] ^= 1
    return replace(material, **{name: mask})


def heuristic_key_search(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    scheme: tuple[int, tuple[str, ...]],
    *,
    steps: int,
    rng: np.random.Generator,
    start: KeyMaterial | None = None,
) -> SearchResult:
    """Hill-climb from ``start`` (default: a random key) for ``steps`` evaluated moves."""
    current = start if start is not None else random_material(*scheme, rng)
    current_fit, accepted = fitness(model, images, labels, current), 0
    for _ in tqdm(range(steps), desc="heuristic key search", leave=False):
        candidate = _neighbour(current, rng)
        fit = fitness(model, images, labels, candidate)
        if fit >= current_fit:  # accuracy does not drop (likelihood breaks ties)
            current, current_fit, accepted = candidate, fit, accepted + 1
    return SearchResult(current, current_fit[0], steps + 1, accepted)
