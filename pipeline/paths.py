"""Default locations shared by the command lines, so that the README's commands compose.

``make_shards.py`` writes ``SHARDS`` and ``verify_shards.py`` checks it; ``train/ddp.py``
trains on it and writes its run to ``RUN``; ``python -m attacks`` and ``predict.py`` read
``CHECKPOINT`` and ``SHARDS``. All are relative to the working directory. ``make demo`` passes
its own folders (``runs/demo/...``) explicitly.
"""

from __future__ import annotations

SHARDS = "shards"
RUN = "runs/protected"
CHECKPOINT = f"{RUN}/checkpoint.pt"
