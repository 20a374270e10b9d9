"""The model owner's audit: every scenario of the threat model, one row each.

    python -m attacks --checkpoint runs/protected/checkpoint.pt --key k.bin   # ./shards -> report
    python -m attacks --checkpoint runs/demo/protected/checkpoint.pt --key runs/demo/k.bin \\
        --data runs/demo/shards --baseline runs/demo/baseline/checkpoint.pt --out report

The encrypted shards are reused: the val shards are decrypted with the owner's key (exactly)
and re-encrypted as each scenario needs; accuracy is always measured on those held-out val
images. The attackers' plain images come from the decrypted train split, and the encrypted
train shards are the "leaked data" of the ciphertext-only attack (other images than those its
natural-image statistics come from) and of source matching (which pairs them with the plain
train split, shuffled, as with a public dataset); the first train images and
their ciphertexts are the known-plaintext pairs. Budgets are options; the
defaults finish on the embedded demo on a 2-core CPU in a few minutes.
"""

# The docstring above is also `python -m attacks --help`. The modules: config (the
# configuration, the scenario names, the loaded Audit), scenarios (one function per scenario,
# in STEPS order), run (run_audit and the samples figure), cli (the command line).

from attacks.audit.cli import build_parser, main, parse_args
from attacks.audit.config import (
    SCENARIOS,
    Audit,
    AuditConfig,
    AuditError,
    Outcome,
    Scenario,
    prepare,
)
from attacks.audit.run import run_audit
from attacks.audit.scenarios import (
    STEPS,
    ciphertext_only,
    correct_key,
    finetune_attacks,
    heuristic_search,
    key_row,
    known_plaintext,
    leaked_images,
    no_key,
    random_search,
    source_matching,
    weight_matching,
    wrong_keys,
)

__all__ = [
    "SCENARIOS",
    "STEPS",
    "Audit",
    "AuditConfig",
    "AuditError",
    "Outcome",
    "Scenario",
    "build_parser",
    "ciphertext_only",
    "correct_key",
    "finetune_attacks",
    "heuristic_search",
    "key_row",
    "known_plaintext",
    "leaked_images",
    "main",
    "no_key",
    "parse_args",
    "prepare",
    "random_search",
    "run_audit",
    "source_matching",
    "weight_matching",
    "wrong_keys",
]
