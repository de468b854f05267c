"""bench/results.json holds one section per benchmark; each run replaces its own section atomically."""

import json
from pathlib import Path

from lastbit.fileio import atomic_write_json

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results.json"


def update_section(section: str, data: dict, path: Path = RESULTS) -> Path:
    results = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError:
            results = {}  # a damaged file is rebuilt from the sections run now
    results[section] = data
    return atomic_write_json(path, results)
