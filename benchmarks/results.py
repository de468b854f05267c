"""What every benchmark shares: bench/results.json, one section per benchmark that each run
replaces atomically, and the one way latencies are measured (warm, median of repeats)."""

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

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


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms over ``repeat`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def model_bench_args(argv, description: str) -> argparse.Namespace:
    """The options every per-model latency benchmark takes (--quick, --models, --repeat),
    with torch on the same 2 threads as every other engine and quiet logging."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small models, fewer repeats")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    return args


def cached_result(folder: str, key: dict, compute, tag_fields: tuple[str, ...] = ("model",)) -> dict:
    """``compute()`` once per ``key``: its result (a dict of plain numbers) lives as JSON under
    the weight cache's ``folder``, so a rerun only re-prints and re-plots. A damaged entry is
    recomputed; ``compute_s`` records how long the computation took."""
    from lastbit.frontend.training import cache_dir

    blob = json.dumps(key, sort_keys=True)
    tag = "-".join(str(key[k]) for k in tag_fields if k in key)
    path = cache_dir() / folder / f"{tag}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["result"]
        except (json.JSONDecodeError, KeyError):
            pass
    start = time.perf_counter()
    result = compute()
    result["compute_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(path, {"key": key, "result": result})
    return result
