"""bench/results.json: one flat JSON object of named figures that every benchmark adds to."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from pipeline.atomic import atomic_write


def merge_results(path: str | os.PathLike, figures: dict, *, note_key: str, note: str) -> Path:
    """Add ``figures`` (and a note on how they were measured) to the file, atomically."""
    path = Path(path)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(figures)
    merged[note_key] = note
    merged[f"{note_key}_date"] = datetime.date.today().isoformat()  # when these were measured
    atomic_write(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    for name, value in figures.items():
        print(f"{name:<36} {value}")
    return path
