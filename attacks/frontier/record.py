"""The records of ``frontier.json``, typed: a ``FrontierPoint`` per (block size, leaked
blocks), a ``ModelPoint`` per (protected model, leaked blocks), and the whole ``Frontier``.

``to_json`` gives the dict written to ``frontier.json`` (the keys in the order they have
always been written; an optional field that is None is left out, as a point that is not
measured has no ``parts``); ``from_json`` reads it back, refusing unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# a measured value over the fresh keys: {"median", "min", "max", "all"} (per-key values)
Summary = dict[str, Any]


def _json(record: Any, optional: frozenset[str]) -> dict:
    """The record's fields in declaration order, leaving out the optional ones that are None."""
    values = {f.name: getattr(record, f.name) for f in fields(record)}
    return {k: v for k, v in values.items() if v is not None or k not in optional}


@dataclass(frozen=True, kw_only=True)
class FrontierPoint:
    """One block size at one leaked-data budget, over ``keys`` fresh keys. Not measured (out of
    data or time): ``reason`` says why and there are no ``parts``; measured: ``parts`` has each
    key part's summary over the keys. ``seconds`` is there when an estimate ran."""

    block_size: int
    transforms: tuple[str, ...]
    budget_blocks: int
    leaked_blocks: int | None  # None: the data has fewer blocks than the budget
    keys: int
    statistics_blocks: int
    seconds: Summary | None = None
    measured: bool
    reason: str | None = None
    candidates: int | None = None  # the symmetric candidates resolved
    parts: dict[str, Summary] | None = None  # key part (attacks.keyspace) -> summary
    # the leaked images decrypted with the estimated key, against the plain ones (over keys)
    psnr: Summary | None = None  # dB
    ssim: Summary | None = None

    OPTIONAL = frozenset({"seconds", "reason", "candidates", "parts", "psnr", "ssim"})

    def to_json(self) -> dict:
        d = _json(self, self.OPTIONAL)
        d["transforms"] = list(self.transforms)  # a JSON list, in its place
        return d

    @classmethod
    def from_json(cls, d: dict) -> FrontierPoint:
        return cls(**{**d, "transforms": tuple(d["transforms"])})


@dataclass(frozen=True, kw_only=True)
class ModelPoint:
    """One protected model at one leaked-data budget: its own key estimated from its own
    encrypted train shards, and its top-1 with that key (or why it was not measured)."""

    checkpoint: str
    key_fingerprint: str
    block_size: int
    budget_blocks: int
    leaked_blocks: int | None  # None: the model's train shards have fewer blocks
    top1_correct_key: float
    measured: bool
    reason: str | None = None
    top1_estimated_key: float | None = None
    key_recovered: float | None = None
    parts: dict[str, float] | None = None
    seconds: float | None = None
    statistics_images: int | None = None

    OPTIONAL = frozenset(
        {"reason", "top1_estimated_key", "key_recovered", "parts", "seconds", "statistics_images"}
    )

    def to_json(self) -> dict:
        return _json(self, self.OPTIONAL)

    @classmethod
    def from_json(cls, d: dict) -> ModelPoint:
        return cls(**d)


@dataclass(frozen=True)
class Frontier:
    """A whole run: ``meta`` (the data, the configuration, the resume signature, how long it
    took), the points, and the protected models' points."""

    meta: dict
    points: list[FrontierPoint]
    models: list[ModelPoint]

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "points": [p.to_json() for p in self.points],
            "models": [m.to_json() for m in self.models],
        }

    @classmethod
    def from_json(cls, d: dict) -> Frontier:
        return cls(
            d["meta"],
            [FrontierPoint.from_json(p) for p in d["points"]],
            [ModelPoint.from_json(m) for m in d["models"]],
        )
