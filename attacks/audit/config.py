"""What every scenario shares: the configuration, the scenario names, and the loaded audit
(the model, the owner's key, plain val and the attacker's data), prepared once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cached_property

import numpy as np
import torch

from attacks.keyspace import KeyRecovery, key_recovery
from attacks.report import Row
from pipeline import BlockOp, apply_op, decrypt, load_key
from pipeline.device import model_device, resolve_device
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.evaluation import EvalSet, load_model, load_split, top1
from pipeline.model.factory import PACKAGED, has_packaged_weights
from pipeline.shards.manifest import load_manifest
from pipeline.shards.sealing import open_output

logger = logging.getLogger("attacks")


class Scenario(str, Enum):
    """The audit's scenarios, in the order they run (their values are the CLI and JSON names)."""

    CORRECT_KEY = "correct_key"
    NO_KEY = "no_key"
    WRONG_KEYS = "wrong_keys"
    RANDOM_KEY_SEARCH = "random_key_search"
    HEURISTIC_KEY_SEARCH = "heuristic_key_search"
    CIPHERTEXT_ONLY = "ciphertext_only"
    KNOWN_PLAINTEXT = "known_plaintext"
    SOURCE_MATCHING = "source_matching"
    FINETUNE = "finetune"
    WEIGHT_MATCHING = "weight_matching"


SCENARIOS = tuple(s.value for s in Scenario)  # the names, for command lines


class AuditError(KeyprotectError, ValueError):
    """An audit that cannot run: wrong key for the checkpoint, shards of another key, ..."""


@dataclass(frozen=True)
class AuditConfig:
    checkpoint: str
    key: str
    data: str
    out: str = "report"
    data_key: str | None = None  # sealed shards: the data key file (else $KEYPROTECT_DATA_KEY)
    baseline: str | None = None
    scenarios: tuple[Scenario, ...] = tuple(Scenario)
    wrong_keys: int = 100
    attacker_images: int = 100  # the attacker's labelled plain set (key searches)
    search_keys: int = 200  # random key search: keys tried
    search_steps: int = 300  # heuristic key search: moves evaluated
    leaked_images: int = 2000  # ciphertext-only, source matching: encrypted train images used
    known_pairs: tuple[int, ...] = (1, 10)  # known-plaintext: (plain, cipher) pairs held
    finetune_fractions: tuple[float, ...] = (0.01, 0.10)
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    # the public start of the finetune_pretrained rows: a local weights file, "package" or
    # "hub" (only when asked for); None: the model's packaged weights, else those rows skip
    pretrained: str | None = None
    eval_images: int | None = None  # cap on held-out val images (default: all)
    seed: int = 0
    device: str = "auto"
    page: str | None = None  # a results page whose attacks-report block is replaced
    reference: str | None = None  # weight matching: the weights the model started from


@dataclass
class Audit:
    """What the scenarios share: the model, the key, plain val and the attacker's data."""

    config: AuditConfig
    model: torch.nn.Module
    saved: Checkpoint  # the protected model's checkpoint, without its tensors
    val: EvalSet  # plain val images (decrypted with the owner's key)
    encrypted_val: EvalSet
    train_plain: EvalSet  # the attacker's pool of plain images
    train_encrypted: np.ndarray  # the leaked shards' images
    train_total: int
    true_op: BlockOp
    scheme: tuple[int, tuple[str, ...]]

    @property
    def device(self) -> torch.device:
        """Where the model is: every scenario runs there."""
        return model_device(self.model)

    @cached_property
    def correct_top1(self) -> float:
        """Top-1 on the encrypted val shards as stored (the authorized user)."""
        return top1(self.model, self.encrypted_val)

    def rng(self, name: str) -> np.random.Generator:
        """An independent, reproducible stream per scenario."""
        return np.random.default_rng([self.config.seed, *name.encode()])

    def accuracy(self, op: BlockOp | None) -> float:
        """Top-1 on held-out val, encrypted with ``op`` (plain when None)."""
        transform = None if op is None else (lambda x: apply_op(x, op))
        return top1(self.model, self.val, transform)

    def attacker_set(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.config.attacker_images
        return self.train_plain.images[:n], self.train_plain.labels[:n]

    def recovery(self, op: BlockOp) -> KeyRecovery:
        return key_recovery(op, self.true_op, self.scheme[1])


@dataclass(frozen=True)
class Outcome:
    """What a scenario gives: its report rows, and the keys it ends with (a column each in
    samples.png: what that key makes of the true ciphertext; those estimated from the leaked
    train images also in reconstruction.png, as ``reconstructions``)."""

    rows: list[Row]
    keys: dict[str, BlockOp] = field(default_factory=dict)
    reconstructions: dict[str, BlockOp] = field(default_factory=dict)
    skipped: str | None = None  # why the scenario did not run, when it did not


def prepare(config: AuditConfig) -> Audit:
    device = resolve_device(config.device)
    model, saved = load_model(config.checkpoint, device)
    key = load_key(config.key, expected=saved.key_fingerprint)
    if saved.key_fingerprint is None:
        raise AuditError(f"{config.checkpoint}: a model trained on plain data has no key to audit")
    if saved.key_fingerprint != key.fingerprint:
        raise AuditError(
            f"{config.checkpoint}: trained with key {saved.key_fingerprint}, but {config.key} "
            f"is key {key.fingerprint}; audit a model with its own key"
        )
    if (config.pretrained == PACKAGED and Scenario.FINETUNE in config.scenarios
            and not has_packaged_weights(saved.model_name)):  # fmt: skip
        raise AuditError(
            f"--pretrained package: no package ships weights of {saved.model_name}"
            "; pass --pretrained PATH (a local weights file) or leave it out"
        )
    crop = saved.crop_size
    encrypted_val = load_split(
        config.data, "val", crop_size=crop, limit=config.eval_images, data_key=config.data_key
    )
    if encrypted_val.key_fingerprint != key.fingerprint:
        raise AuditError(
            f"{config.data}: shards are encrypted with {encrypted_val.key_fingerprint}, not with "
            f"{config.key} ({key.fingerprint}); pass the shards this model was trained on"
        )
    train_total = load_manifest(open_output(config.data, config.data_key), "train").total_samples
    needed = max(
        config.attacker_images + config.leaked_images,  # ciphertext-only: disjoint sets
        max(config.known_pairs, default=0),
        math.ceil(max(config.finetune_fractions, default=0) * train_total),
    )
    train = load_split(config.data, "train", crop_size=crop, limit=needed, data_key=config.data_key)
    plain_val = replace(encrypted_val, images=decrypt(encrypted_val.images, key))
    train_plain = replace(train, images=decrypt(train.images, key))
    logger.info(
        "audit: %d val and %d train images, key %s (block size %d, %s), device %s",
        len(plain_val.labels),
        len(train.labels),
        key.fingerprint,
        key.block_size,
        "+".join(key.transforms),
        device,
    )
    return Audit(
        config=config, model=model, saved=saved, val=plain_val, encrypted_val=encrypted_val,
        train_plain=train_plain, train_encrypted=train.images, train_total=train_total,
        true_op=key.material.encrypt_op, scheme=(key.block_size, key.transforms),
    )  # fmt: skip
