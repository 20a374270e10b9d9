"""bench/results.json: one flat JSON object of named figures that every benchmark adds to."""

from __future__ import annotations

import json
import os
from pathlib import Path


def merge_results(path: str | os.PathLike, figures: dict, *, note_key: str, note: str) -> Path:
    """Add ``figures`` (and a note on how they were measured) to the file, atomically."""
    path = Path(path)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(figures)
    merged[note_key] = note
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    for name, value in figures.items():
        print(f"{name:<36} {value}")
    return path
