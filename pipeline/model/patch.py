"""Patch embeddings: the linear first layer of isotropic models, found, checked and keyed.

ViT, DeiT, ConvMixer and MLP-Mixer (and Swin, ConvNeXt) start with a Conv2d whose kernel and
stride are both P: each P x P patch goes through one linear map. When the key's block size is P
and the blocks sit on the patch grid, pixel shuffling permutes that map's inputs and NP
(``x -> 255 - x``) negates some of them after the loader's normalisation (plus a constant,
folded into the bias), so the key can be absorbed into the map exactly: the model on encrypted
images gives what the plain model gives on plain images (MaungMaung & Kiya, arXiv 2207.05366
for ViT, 2207.11939 for ConvMixer). FFX maps bytes through a table, which no linear map
follows, so it is refused.

"First layer" is checked, not guessed from names: a pre-hook on every leaf module records which
one runs first in a forward pass (stopped there, so nothing is computed) and whether it gets
the model's input tensor itself, unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.cipher.blockwise import BlockOp, KeyMaterial, block_length, encrypt
from pipeline.cipher.keys import Key
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.factory import create_model
from pipeline.stream.dataset import INPUT_MEAN, INPUT_STD, to_model_input

logger = logging.getLogger(__name__)


class PatchAlignmentError(KeyprotectError, ValueError):
    """A model and key that cannot be patch-aligned; the message says why and what to do."""


@dataclass(frozen=True)
class PatchEmbedding:
    name: str  # module path in the model, e.g. "patch_embed.proj"
    conv: torch.nn.Conv2d
    patch_size: int


class _Reached(Exception):
    """Stops the probing forward pass at the first layer."""


def first_layer(model: torch.nn.Module, *, image_size: int) -> tuple[str, torch.nn.Module, bool]:
    """(name, module, whether it got the input unchanged) of the first leaf module a forward
    pass on a ``3 x image_size x image_size`` input runs."""
    names = {module: name for name, module in model.named_modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    seen: list[tuple[torch.nn.Module, bool]] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        seen.append((module, bool(args) and args[0] is x))
        raise _Reached

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    except _Reached:
        pass
    except Exception as exc:  # the model's own check of the input size, usually
        raise PatchAlignmentError(
            f"{type(model).__name__} does not take a {image_size}x{image_size} input "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use the crop size the "
            "model was built for (timm: --model-kwargs img_size=N)"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise PatchAlignmentError(f"{type(model).__name__} runs no layer on its input")
    module, direct = seen[0]
    return names[module], module, direct


def _why_not(module: torch.nn.Module, direct: bool) -> str | None:
    """None when ``module`` is a linear patch embedding of the raw input, else the reason."""
    if type(module) is not torch.nn.Conv2d:  # a subclass may pad or scale in its forward
        return f"is a {type(module).__name__}, not a Conv2d"
    if not direct:
        return "does not take the model's input unchanged"
    k, s = module.kernel_size, module.stride
    if not (k[0] == k[1] == s[0] == s[1]):
        return f"has kernel {tuple(k)} and stride {tuple(s)} (a patch embedding has both equal)"
    if module.padding not in ((0, 0), "valid") or module.dilation != (1, 1) or module.groups != 1:
        return "pads, dilates or groups its input"
    if module.in_channels != 3:
        return f"takes {module.in_channels} channels, not 3"
    return None


def find_patch_embedding(model: torch.nn.Module, *, image_size: int) -> PatchEmbedding | None:
    """The model's patch embedding (its first layer, a Conv2d with kernel = stride = P and no
    padding, on the raw input), or None for models without one (CNNs)."""
    name, module, direct = first_layer(model, image_size=image_size)
    if _why_not(module, direct) is not None:
        return None
    assert isinstance(module, torch.nn.Conv2d)  # what _why_not accepts
    return PatchEmbedding(name, module, int(module.kernel_size[0]))


def require_patch_embedding(
    model: torch.nn.Module, *, image_size: int, block_size: int
) -> PatchEmbedding:
    """The patch embedding whose patch size is ``block_size``; otherwise an error saying why."""
    name, module, direct = first_layer(model, image_size=image_size)
    reason = _why_not(module, direct)
    if reason is not None:
        raise PatchAlignmentError(
            f"{type(model).__name__} has no patch embedding: its first layer {name} {reason}. "
            "Only models that start with a linear patch embedding (ViT, DeiT, ConvMixer, "
            "MLP-Mixer) can absorb a key; train others on the encrypted shards instead"
        )
    assert isinstance(module, torch.nn.Conv2d)  # what _why_not accepts
    patch = int(module.kernel_size[0])
    if block_size != patch:
        raise PatchAlignmentError(
            f"the key's block size {block_size} is not the patch size {patch} of {name}: "
            + (
                "a block spans several patches, so shuffling moves pixels between them"
                if block_size > patch
                else "absorbable in principle (whole blocks inside a patch) but not supported, "
                "and a smaller block only makes a weaker key"
            )
            + f"; make a key with `python tools/make_key.py --block-size {patch}`"
        )
    if image_size % patch:
        raise PatchAlignmentError(f"crop size {image_size} is not a multiple of the patch {patch}")
    return PatchEmbedding(name, module, patch)


def conv_positions(weight: torch.Tensor) -> torch.Tensor:
    """(O, 3, P, P) conv weight -> (O, L) columns in the cipher's block order (row, col, ch)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def from_positions(columns: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`conv_positions`."""
    out = columns.shape[0]
    return columns.reshape(out, patch_size, patch_size, 3).permute(0, 3, 1, 2).contiguous()


def affine_part(op: BlockOp) -> tuple[np.ndarray, np.ndarray]:
    """(index, negated) of an op without a table: ``enc[i] = in[index[i]]``, or ``255 -`` that
    where ``negated[i]``. Raises for an op that maps bytes through the FFX table."""
    if op.table_mask.any():
        raise PatchAlignmentError(
            "the key uses FFX, a byte table that no linear layer can follow, so it cannot be "
            "absorbed into the patch embedding; absorb a key of shuffle and/or np only "
            "(`python tools/make_key.py --transforms shuffle,np`)"
        )
    # with no table, the input and output XORs of each position simply add up
    return op.index, (op.xor_in ^ op.xor_out) != 0


@torch.no_grad()
def absorb_into(
    embedding: PatchEmbedding, op: BlockOp, *, mean: float = INPUT_MEAN, std: float = INPUT_STD
) -> None:
    """Rewrite the patch embedding in place so that, on inputs encrypted with ``op`` (and
    normalised as ``(x/255 - mean)/std``), it computes what it computed on the plain inputs.

    With ``u = (x/255 - mean)/std``, the plain value at ``index[i]`` is ``u_enc[i]``, or
    ``c - u_enc[i]`` with ``c = (1 - 2*mean)/std`` where NP flipped it; so column ``i`` of the
    new map is column ``index[i]`` of the old one (negated where flipped) and the bias gains
    ``c`` times the flipped columns.
    """
    conv, patch = embedding.conv, embedding.patch_size
    if op.block_size != patch:
        raise PatchAlignmentError(f"key block size {op.block_size} is not the patch size {patch}")
    index, negated = affine_part(op)
    columns = conv_positions(conv.weight)
    assert columns.shape[1] == block_length(patch)
    moved = columns[:, torch.as_tensor(index, device=columns.device)]
    flip = torch.as_tensor(negated, device=columns.device)
    shift = (1.0 - 2.0 * mean) / std
    if shift and flip.any():
        if conv.bias is None:
            raise PatchAlignmentError(
                f"{embedding.name} has no bias to take the NP shift (mean {mean} is not 0.5)"
            )
        conv.bias += shift * moved[:, flip].sum(1).to(conv.bias.dtype)
    signs = 1.0 - 2.0 * flip.to(columns.dtype)
    conv.weight.copy_(from_positions(moved * signs, patch))
    logger.debug("absorbed the key into %s (patch %d)", embedding.name, patch)


def absorb_key(
    model: torch.nn.Module, key: Key | KeyMaterial, *, image_size: int
) -> PatchEmbedding:
    """Absorb ``key`` into the model's patch embedding, in place: the model then takes images
    encrypted with ``key`` and gives what it gave on the plain ones. Refused (with the reason)
    for a key with FFX, a model without a patch embedding, or a block size other than P."""
    material: KeyMaterial = key.material if isinstance(key, Key) else key
    affine_part(material.encrypt_op)  # FFX first: the most basic reason to refuse
    embedding = require_patch_embedding(
        model, image_size=image_size, block_size=material.block_size
    )
    absorb_into(embedding, material.encrypt_op)
    return embedding


def absorb_checkpoint(
    saved: Checkpoint, key: Key, *, source: str = "<checkpoint>"
) -> tuple[Checkpoint, dict]:
    """A checkpoint of a plain model -> the same model with ``key`` absorbed, as a checkpoint of
    that key (its fingerprint, never the key), and a summary. The optimiser, scheduler and RNG
    states are dropped (they belong to the plain run); ``absorbed_from`` names the plain
    weights by digest."""
    if saved.key_fingerprint is not None:
        raise PatchAlignmentError(
            f"{source}: the model is already protected (key {saved.key_fingerprint}); "
            "absorb a key into a model of plain images"
        )
    model = create_model(saved.model_name, num_classes=saved.num_classes, pretrained="none",
                         model_kwargs=saved.model_kwargs)  # fmt: skip
    model.load_state_dict(saved.model)
    model.eval()
    image_size = saved.crop_size or saved.image_shape[0]
    plain_model = copy.deepcopy(model)
    embedding = absorb_key(model, key, image_size=image_size)
    # check the result on random images: the protected model on their encryption gives the
    # plain model's outputs (float rounding aside)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, image_size, image_size, 3), dtype=np.uint8)
    with torch.no_grad():
        want = plain_model(to_model_input(torch.from_numpy(x), torch.device("cpu")))
        got = model(to_model_input(torch.from_numpy(encrypt(x, key)), torch.device("cpu")))
    error = float((got - want).abs().max())
    digest = hashlib.sha256()
    for name, tensor in saved.model.items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    absorbed = replace(
        saved, model=model.state_dict(), key_fingerprint=key.fingerprint,
        block_size=key.block_size, transforms=tuple(key.transforms), optimizer={}, scheduler={},
        rng=[], epoch=0, step_in_epoch=0, global_step=0, world_size=None,
        manifest_digests={},  # no shards of this key trained it yet
        absorbed_from=digest.hexdigest(),
    )  # fmt: skip
    summary = {"layer": embedding.name, "patch_size": embedding.patch_size,
               "max_logit_error": error, "image_size": image_size}  # fmt: skip
    return absorbed, summary
