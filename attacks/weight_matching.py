"""Weight matching: the key of a patch-aligned model, from its weights and a reference model.

A key absorbed into a patch embedding (``pipeline/model/patch.py``) is visible in the weights:
column ``i`` of the protected map is column ``index[i]`` of the plain one, negated where NP
flipped position ``i``. An attacker holding the protected model and any model sharing its
start (the public pre-trained weights it was fine-tuned from) correlates the columns of the two
patch embeddings over their output channels and solves an assignment on the absolute
correlations; the sign of each matched correlation gives the NP bit. Fine-tuning after the
absorption moves the columns a little, so the matches survive it as long as the weights stay
closer to their start than to each other. FFX is not linear, so no absorbed model has it; a
model fine-tuned with FFX from public weights would still show its permutation and signs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline import BlockOp
from pipeline.errors import KeyprotectError
from pipeline.model.patch import PatchAlignmentError, conv_positions, require_patch_embedding

logger = logging.getLogger(__name__)

_IDENTITY = np.arange(256, dtype=np.uint8)


class WeightMatchingError(KeyprotectError, ValueError):
    """A reference model that cannot be matched; the message says why."""


@dataclass(frozen=True)
class Match:
    op: BlockOp  # the recovered encryption (permutation and NP bits; no table)
    correlation: float  # mean |correlation| of the matched column pairs (1.0: exact)


def match_patch_embeddings(
    protected: torch.Tensor, reference: torch.Tensor, transforms: tuple[str, ...]
) -> Match:
    """The encryption that turns ``reference`` (an (O, 3, P, P) patch embedding weight) into
    ``protected``: ``protected[:, i] ~ sign[i] * reference[:, index[i]]`` in block order."""
    if protected.shape != reference.shape or protected.ndim != 4 or protected.shape[1] != 3:
        raise WeightMatchingError(
            f"the patch embeddings differ in shape: protected {tuple(protected.shape)}, "
            f"reference {tuple(reference.shape)}; the reference must be the same architecture"
        )
    patch = protected.shape[-1]
    a = _standardise(conv_positions(protected.detach().double().cpu()).numpy())
    b = _standardise(conv_positions(reference.detach().double().cpu()).numpy())
    corr = a.T @ b / a.shape[0]  # (L, L): protected column i against reference column j
    n = corr.shape[0]
    strength = np.abs(corr) if "np" in transforms else corr
    if "shuffle" in transforms:
        rows, cols = linear_sum_assignment(strength, maximize=True)
        index = cols[np.argsort(rows)]
    else:
        index = np.arange(n)
    matched = corr[np.arange(n), index]
    negated = (matched < 0) if "np" in transforms else np.zeros(n, bool)
    op = BlockOp(
        patch,
        index.astype(np.int64),
        np.zeros(n, np.uint8),
        np.zeros(n, bool),
        _IDENTITY.copy(),
        (negated * np.uint8(0xFF)).astype(np.uint8),
    )
    return Match(op, float(np.abs(matched).mean()))


def _standardise(columns: np.ndarray) -> np.ndarray:
    """Each column centred over the output channels and scaled to unit variance."""
    centred = columns - columns.mean(0, keepdims=True)
    return centred / np.maximum(centred.std(0, keepdims=True), 1e-12)


def reference_weight(path: str | Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The patch embedding weight ``name + ".weight"`` of a reference file: a train/ddp.py
    checkpoint, or a state dict (timm's or another's; then the one tensor of ``shape`` when
    the names differ). Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise WeightMatchingError(f"{path}: reference weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a damaged or foreign file
        raise WeightMatchingError(f"{path}: not readable weights ({type(exc).__name__})") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict):
        raise WeightMatchingError(f"{path}: holds no state dict")
    tensor = state.get(f"{name}.weight")
    if not isinstance(tensor, torch.Tensor):
        same = [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == shape]
        if len(same) != 1:
            raise WeightMatchingError(
                f"{path}: no tensor {name}.weight and {len(same)} of shape {tuple(shape)}; pass "
                "the weights of the architecture the protected model started from"
            )
        tensor = same[0]
    if tuple(tensor.shape) != tuple(shape):
        raise WeightMatchingError(
            f"{path}: {name}.weight has shape {tuple(tensor.shape)}, the protected model's "
            f"{tuple(shape)}; the reference must be the same architecture"
        )
    return tensor


def recover_key(
    model: torch.nn.Module,
    reference: str | Path,
    *,
    image_size: int,
    block_size: int,
    transforms: tuple[str, ...],
) -> Match:
    """The key of ``model`` (a patch-aligned protected model), matched against the reference
    weights in the file ``reference``. Refused (``WeightMatchingError``, with the reason) for a
    model without a patch embedding or one whose patch is not the block."""
    try:
        embedding = require_patch_embedding(model, image_size=image_size, block_size=block_size)
    except PatchAlignmentError as exc:
        raise WeightMatchingError(str(exc)) from None
    weight = embedding.conv.weight
    match = match_patch_embeddings(
        weight, reference_weight(reference, embedding.name, tuple(weight.shape)), transforms
    )
    logger.info("weight matching: %s against %s, mean |correlation| %.3f", embedding.name,
                Path(reference).name, match.correlation)  # fmt: skip
    return match
