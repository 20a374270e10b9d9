"""Block-wise learnable image encryption: pixel shuffling, negative/positive and FFX.

An H x W x 3 uint8 image is cut into non-overlapping M x M blocks; each block is flattened in
(row, column, channel) order into a vector of L = 3*M*M bytes, and the SAME keyed operation is
applied to every block (MaungMaung & Kiya, arXiv 2103.03525; reference code
github.com/fugokidi/block_transform):

- ``shuffle``: ``out[i] = in[permutation[i]]``
- ``np``: ``out[i] = 255 - in[i]`` where ``np_mask[i] == 1`` (for uint8 that is ``in[i] ^ 0xFF``)
- ``ffx``: ``out[i] = ffx_table[in[i]]`` where ``ffx_mask[i] == 1``

The transforms listed in a key apply in order, each to the previous one's output. Because every
transform appears at most once, any composition reduces to one gather plus per-position byte
maps of a fixed shape (``BlockOp``)::

    out[i] = xor_out[i] ^ F_i(xor_in[i] ^ in[index[i]]),  F_i = table if table_mask[i] else id

Encryption and decryption are both a ``BlockOp``; one numpy and one torch routine apply it to a
whole batch at once (one gather over the flattened image, then elementwise work), with no Python
loop over blocks. The torch routine keeps everything on the tensor's device.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)


class Transform(str, Enum):
    """The closed set of block transforms; each member equals (and prints as) its name."""

    SHUFFLE = "shuffle"
    NP = "np"
    FFX = "ffx"

    def __str__(self) -> str:
        return self.value


# Plain strings, in the canonical order: key files, manifests and derivations use these bytes.
TRANSFORMS: tuple[str, ...] = tuple(t.value for t in Transform)

if TYPE_CHECKING:
    import torch

ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")


def block_length(block_size: int) -> int:
    """L, the number of bytes in one flattened M x M x 3 block."""
    return 3 * block_size * block_size


def check_transforms(transforms: Sequence[str]) -> tuple[str, ...]:
    """Validate an ordered list of transform names (each at most once, at least one)."""
    names = tuple(t.value if isinstance(t, Transform) else t for t in transforms)
    if not names:
        raise ValueError(f"transforms is empty; choose an ordered subset of {TRANSFORMS}")
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown transform(s) {unknown}; must be among {TRANSFORMS}")
    if len(set(names)) != len(names):
        raise ValueError(f"transforms {names} repeat a name; each may appear once")
    return names


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if not 1 <= int(block_size) <= 255:
        raise ValueError(f"block_size {block_size} is out of range; must be in 1..255")
    return int(block_size)


@dataclass(frozen=True, eq=False)
class KeyMaterial:
    """Everything the transforms need: the parts in use, derived from a secret or estimated.

    All four arrays are always present; only those named in ``transforms`` take effect.
    """

    block_size: int
    transforms: tuple[str, ...]
    permutation: np.ndarray  # (L,) int64, out[i] = in[permutation[i]]
    np_mask: np.ndarray  # (L,) uint8 in {0, 1}
    ffx_mask: np.ndarray  # (L,) uint8 in {0, 1}
    ffx_table: np.ndarray  # (256,) uint8, a bijection of 0..255

    def __post_init__(self) -> None:
        m = check_block_size(self.block_size)
        n = block_length(m)
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "transforms", check_transforms(self.transforms))
        perm = np.asarray(self.permutation, dtype=np.int64).reshape(-1)
        if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
            raise ValueError(f"permutation must be a permutation of range({n}) for block size {m}")
        set_(self, "permutation", perm)
        for name in ("np_mask", "ffx_mask"):
            mask = np.asarray(getattr(self, name)).reshape(-1)
            if mask.shape != (n,) or not np.isin(mask, (0, 1)).all():
                raise ValueError(f"{name} must hold {n} values in {{0, 1}} for block size {m}")
            set_(self, name, mask.astype(np.uint8))
        table = np.asarray(self.ffx_table).reshape(-1)
        if table.shape != (256,) or not np.array_equal(np.sort(table), np.arange(256)):
            raise ValueError("ffx_table must be a bijection of 0..255 (256 distinct values)")
        set_(self, "ffx_table", table.astype(np.uint8))

    def __repr__(self) -> str:  # the arrays are the key: never print them
        return (
            f"KeyMaterial(block_size={self.block_size}, transforms={self.transforms!r}, "
            "<permutation, masks and table redacted>)"
        )

    __str__ = __repr__

    @cached_property
    def encrypt_op(self) -> BlockOp:
        return BlockOp.compose(self)

    @cached_property
    def decrypt_op(self) -> BlockOp:
        return self.encrypt_op.inverse()


@dataclass(frozen=True, eq=False)
class BlockOp:
    """``out[i] = xor_out[i] ^ F_i(xor_in[i] ^ in[index[i]])`` on every block; see module doc."""

    block_size: int
    index: np.ndarray  # (L,) int64
    xor_in: np.ndarray  # (L,) uint8, 0x00 or 0xFF
    table_mask: np.ndarray  # (L,) bool
    table: np.ndarray  # (256,) uint8
    xor_out: np.ndarray  # (L,) uint8
    _plans: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # equivalent to the key material: never print it
        return f"BlockOp(block_size={self.block_size}, <index, masks and table redacted>)"

    __str__ = __repr__

    @classmethod
    def compose(cls, material: KeyMaterial) -> BlockOp:
        n = block_length(material.block_size)
        index = np.arange(n)
        xor_in = np.zeros(n, np.uint8)
        table_mask = np.zeros(n, bool)
        xor_out = np.zeros(n, np.uint8)
        for name in material.transforms:
            if name == "shuffle":  # positions move; every per-position map moves with them
                p = material.permutation
                index, xor_in, table_mask, xor_out = index[p], xor_in[p], table_mask[p], xor_out[p]
            elif name == "np":
                xor_out = xor_out ^ (material.np_mask * np.uint8(0xFF))
            else:  # ffx: no table yet (each transform appears once), so fold xor_out inward
                xor_in, xor_out = xor_in ^ xor_out, np.zeros(n, np.uint8)
                table_mask = material.ffx_mask.astype(bool)
        return cls(material.block_size, index, xor_in, table_mask, material.ffx_table, xor_out)

    def inverse(self) -> BlockOp:
        # in[index[i]] = xor_in[i] ^ F_i^-1(xor_out[i] ^ out[i]); re-index by the inverse gather.
        inv = np.argsort(self.index)
        table_inv = np.argsort(self.table).astype(np.uint8)
        return BlockOp(
            self.block_size,
            inv,
            self.xor_out[inv],
            self.table_mask[inv],
            table_inv,
            self.xor_in[inv],
        )

    def plan(self, width: int) -> _BandPlan:
        """The op expanded to every byte of a band of M image rows, W pixels wide (cached)."""
        plan = self._plans.get(width)
        if plan is None:
            plan = self._plans[width] = _BandPlan.build(self, width)
        return plan


# Work on this many bytes at a time, so intermediates stay in cache between the steps.
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, eq=False)
class _BandPlan:
    """Per-byte arrays over one band (M rows x W x 3 bytes); None where a step is the identity.

    Every band of every image gets the same treatment, so a batch is viewed as (bands, band
    bytes) and each step is one vectorised call over all bands.
    """

    index: np.ndarray | None  # (B,) intp gather within the band
    xor_in: np.ndarray | None  # (B,) uint8
    table_mask: np.ndarray | None  # (B,) uint8 0x00/0xFF, for a branch-free blend
    table: np.ndarray | None  # (256,) uint8
    table16: np.ndarray | None  # (65536,) uint16: the table on two bytes at once
    xor_out: np.ndarray | None  # (B,) uint8
    _torch: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # per-byte key material: never print it
        return "_BandPlan(<redacted>)"

    @classmethod
    def build(cls, op: BlockOp, width: int) -> _BandPlan:
        m = op.block_size
        r, c, ch = np.ix_(np.arange(m), np.arange(width), np.arange(3))
        # position q of each byte inside its block, in (row, column, channel) order
        q = ((r * m + c % m) * 3 + ch).reshape(-1)
        block_col = np.broadcast_to(c - c % m, (m, width, 3)).reshape(-1)
        src = op.index[q]  # the block position each output byte is read from
        src_row, src_col = src // (3 * m), block_col + (src % (3 * m)) // 3
        gather = ((src_row * width + src_col) * 3 + src % 3).astype(np.intp)
        use_table = bool(op.table_mask.any())
        table16 = None
        if use_table:  # little-endian pairs: low byte first
            pairs = np.arange(65536)
            table16 = op.table[pairs & 0xFF].astype(np.uint16) | (
                op.table[pairs >> 8].astype(np.uint16) << 8
            )
        return cls(
            index=None if np.array_equal(op.index, np.arange(op.index.size)) else gather,
            xor_in=op.xor_in[q] if op.xor_in.any() else None,
            table_mask=op.table_mask[q] * np.uint8(0xFF) if use_table else None,
            table=op.table if use_table else None,
            table16=table16,
            xor_out=op.xor_out[q] if op.xor_out.any() else None,
        )

    def apply_numpy(self, bands: np.ndarray) -> np.ndarray:
        """bands: (n, B) uint8, C-contiguous. Returns a new (n, B) array."""
        out = np.empty_like(bands)
        step = max(1, _CHUNK_BYTES // bands.shape[1])
        for start in range(0, len(bands), step):  # chunks of whole bands, not per block
            self._apply_numpy_chunk(bands[start : start + step], out[start : start + step])
        return out

    def _apply_numpy_chunk(self, src: np.ndarray, dst: np.ndarray) -> None:
        if self.index is not None:
            np.take(src, self.index, axis=1, out=dst)
        else:
            dst[...] = src
        if self.xor_in is not None:
            np.bitwise_xor(dst, self.xor_in, out=dst)
        if self.table is not None:  # dst ^= (table[dst] ^ dst) & mask: the table where masked
            if dst.shape[1] % 2 == 0 and sys.byteorder == "little":
                assert self.table16 is not None  # made with the table
                mapped = self.table16[dst.view(np.uint16)].view(np.uint8)  # half the lookups
            else:
                mapped = self.table[dst]
            np.bitwise_xor(mapped, dst, out=mapped)
            assert self.table_mask is not None  # made with the table
            np.bitwise_and(mapped, self.table_mask, out=mapped)
            np.bitwise_xor(dst, mapped, out=dst)
        if self.xor_out is not None:
            np.bitwise_xor(dst, self.xor_out, out=dst)

    def apply_torch(self, bands: Any) -> Any:
        """bands: (n, B) uint8 tensor on any device; every step stays on that device."""
        import torch

        t = self._tensors(bands.device)
        out = bands.index_select(1, t["index"]) if "index" in t else bands.clone()
        if "xor_in" in t:
            out.bitwise_xor_(t["xor_in"])
        if "table" in t:
            out = torch.where(t["table_mask"], t["table"][out.long()], out)
        if "xor_out" in t:
            out.bitwise_xor_(t["xor_out"])
        return out

    def _tensors(self, device: Any) -> dict:
        """This plan's arrays as tensors on ``device``, made once per device."""
        cached = self._torch.get(str(device))
        if cached is None:
            import torch

            cached = {}
            if self.index is not None:
                cached["index"] = torch.as_tensor(self.index, dtype=torch.int64, device=device)
            for name in ("xor_in", "table", "xor_out"):
                if getattr(self, name) is not None:
                    cached[name] = torch.as_tensor(getattr(self, name), device=device)
            if self.table_mask is not None:
                cached["table_mask"] = torch.as_tensor(self.table_mask != 0, device=device)
            self._torch[str(device)] = cached
        return cached


def _is_torch(images: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to find out
    return torch is not None and isinstance(images, torch.Tensor)


def _check_images(images: Any, block_size: int) -> tuple[int, int]:
    shape = tuple(images.shape)
    if len(shape) not in (3, 4) or shape[-1] != 3:
        raise ValueError(f"images must be HWC or NHWC with 3 channels, got shape {shape}")
    dtype = str(images.dtype)
    if dtype not in ("uint8", "torch.uint8"):
        raise TypeError(f"images must be uint8, got {dtype}; convert before encrypting")
    height, width = shape[-3], shape[-2]
    if height % block_size or width % block_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the key's block size {block_size}; "
            f"crop or resize to a multiple of {block_size}"
        )
    return height, width


def _material(key: Any) -> KeyMaterial:
    material = getattr(key, "material", key)  # a Key derives its material; KeyMaterial is itself
    if not isinstance(material, KeyMaterial):
        raise TypeError(f"key must be a Key or KeyMaterial, got {type(key).__name__}")
    return material


def apply_op(images: ArrayT, op: BlockOp) -> ArrayT:
    """Apply a ``BlockOp`` to HWC or NHWC uint8 images (numpy array or torch tensor)."""
    _, width = _check_images(images, op.block_size)
    plan = op.plan(width)
    shape, band = tuple(images.shape), op.block_size * width * 3
    if _is_torch(images):
        return plan.apply_torch(images.reshape(-1, band)).reshape(shape)  # a view if contiguous
    flat = np.ascontiguousarray(images).reshape(-1, band)
    return plan.apply_numpy(flat).reshape(shape)  # type: ignore[return-value]  # numpy in, out


def encrypt(images: ArrayT, key: Any) -> ArrayT:
    """Encrypt uint8 HWC/NHWC images (numpy or torch, any device) block-wise with ``key``.

    Returns the same type, shape and device. ``key`` is a ``Key`` or a ``KeyMaterial``.
    """
    return apply_op(images, _material(key).encrypt_op)


def decrypt(images: ArrayT, key: Any) -> ArrayT:
    """Exact inverse of :func:`encrypt`: ``decrypt(encrypt(x, k), k) == x``."""
    return apply_op(images, _material(key).decrypt_op)
