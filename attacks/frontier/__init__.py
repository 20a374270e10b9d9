"""The security frontier: how much of a fresh key the ciphertext-only estimate recovers, by
block size and by the number of leaked blocks, with the spread over keys.

    python -m attacks.frontier                          # embedded photos -> report/frontier
    python -m attacks.frontier --block-sizes 4,8 --keys 5 --budgets 1e4,1e5,1e6 \\
        --time-budget-s 600 --page docs/results/frontier.md          # make frontier
    python -m attacks.frontier --data /data/imagenet    # your images (SRC/train/<class>/*)
    python -m attacks.frontier --data s3://bucket/plain # or plain shards, local or S3
    python -m attacks.frontier --block-sizes 4 --checkpoint runs/demo/protected/checkpoint.pt \\
        --key runs/demo/k.bin --model-data runs/demo/shards   # also that model's accuracy

For each block size, each leaked-data budget (in blocks) and each of ``--keys`` fresh keys of
the scheme, the leaked blocks are encrypted with the key and the key is estimated from them
(``attacks.ciphertext_only``) with the attacker's natural-image statistics taken from other
images: other photos for the embedded photos, other files (or other samples) for ``--data``.
Every key part is reported as the median and range over the keys. A point where the data has
fewer blocks than the budget, or where an estimate runs out of ``--time-budget-s``, is "not
measured": it says nothing about the key. No model is needed; the 96 candidates that image
statistics cannot tell apart (block symmetries, each also negated) are resolved in the
attacker's favour (by eye or with a model an attacker tells an upright, positive image from
the others). The fresh keys come from ``--seed``: measurement keys, never printed or written.
``frontier.json`` is written after every point; a rerun with the same configuration (and the
same estimator) into the same ``--out`` resumes from it.
"""

# The docstring above is also `python -m attacks.frontier --help`. The modules: config (the
# configuration, the seeded streams), inputs (the plain images: embedded photos, an image
# folder or plain shards), points (the estimates: a block size's points, the models' points),
# record (frontier.json's records, typed), run (run_frontier, resuming), report (the table,
# the chart, the page block), cli (the command line).

from attacks.frontier.cli import build_parser, main, parse_args
from attacks.frontier.config import FrontierConfig, FrontierError, _rng
from attacks.frontier.inputs import Inputs, load_inputs
from attacks.frontier.points import PARTS, block_size_points, measured_budgets, model_points
from attacks.frontier.record import Frontier, FrontierPoint, ModelPoint
from attacks.frontier.run import run_frontier

__all__ = [
    "PARTS",
    "Frontier",
    "FrontierConfig",
    "FrontierError",
    "FrontierPoint",
    "Inputs",
    "ModelPoint",
    "_rng",
    "block_size_points",
    "build_parser",
    "load_inputs",
    "main",
    "measured_budgets",
    "model_points",
    "parse_args",
    "run_frontier",
]
