"""Attacks on a protected model, and the owner's audit that runs them all.

    python -m attacks --checkpoint runs/protected/checkpoint.pt --key k.bin --data shards

- ``keyspace``: random keys of a scheme, keys as byte maps, how much of a key an estimate
  recovers.
- ``key_search``: random and heuristic key search with the model as an oracle.
- ``ciphertext_only``: the key estimated from leaked encrypted shards and image statistics.
- ``finetune``: fine-tuning a stolen model on a few plain images.
- ``audit``: every scenario on one model, written as ``report/`` (Markdown, JSON, PNGs).
- ``frontier``: what the ciphertext-only estimate recovers of fresh keys, by block size and
  leaked blocks, with no model (``python -m attacks.frontier``, ``report/frontier``).
"""

from attacks.audit import SCENARIOS, AuditConfig, AuditError, Scenario, run_audit
from attacks.ciphertext_only import EstimateTimeout, estimate_key
from attacks.key_search import heuristic_key_search, random_key_search
from attacks.keyspace import KeyRecovery, key_recovery, random_material

__all__ = [
    "SCENARIOS",
    "Scenario",
    "AuditConfig",
    "AuditError",
    "EstimateTimeout",
    "estimate_key",
    "heuristic_key_search",
    "KeyRecovery",
    "key_recovery",
    "random_key_search",
    "random_material",
    "run_audit",
]
