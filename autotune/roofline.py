"""How far tuning can still go: the host's measured int8 dot-product peak and the useful MACs of
each integer-kernel function, so a tuning report can say what fraction of the machine a schedule
reaches and bound what any schedule of the same kernels could gain for the whole model.

The peak comes from a register-only loop of independent ``vpdpbusd`` chains (64 MACs each, no
loads), built with the system C compiler and run on every thread the kernels use: nothing a
kernel of that instruction does can go faster, so it is an upper bound, not an estimate.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from lastbit.errors import LastbitError

__all__ = ["MACS_PER_CHAIN_STEP", "RooflineError", "function_macs", "host_vnni_peak_gmacs", "model_kernel_macs",
           "tuning_bound", "vnni_chains"]

CHAINS = 16  # independent accumulators: more than vpdpbusd's latency × throughput on any x86 core
MACS_PER_CHAIN_STEP = 64  # one zmm vpdpbusd: 16 int32 lanes × 4 byte products
_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
/* iters rounds of CHAINS independent vpdpbusd chains; each chain starts from its own value (so
   the compiler cannot merge them) and the inputs pass through an empty asm each round (so it
   cannot hoist the products). Returns the sum of every lane of every chain. */
int64_t vnni_chains(int64_t iters, int32_t a_word, int32_t b_word) {
  __m512i a = _mm512_set1_epi32(a_word), b = _mm512_set1_epi32(b_word);
  __m512i c[CHAINS];
  for (int k = 0; k < CHAINS; ++k) c[k] = _mm512_set1_epi32(k);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+v"(a), "+v"(b));
#pragma GCC unroll 64
    for (int k = 0; k < CHAINS; ++k) c[k] = _mm512_dpbusd_epi32(c[k], a, b);
  }
  int64_t total = 0;
  for (int k = 0; k < CHAINS; ++k) total += _mm512_reduce_add_epi32(c[k]);
  return total;
}
"""


class RooflineError(LastbitError):
    """The peak cannot be measured here: no C compiler, or the host lacks AVX-512 VNNI."""


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    from lastbit.targets.x86_64 import host_features

    missing = {"avx512f", "avx512vnni"} - set(host_features())
    if missing:
        raise RooflineError(f"the host has no {', '.join(sorted(missing))}: no vpdpbusd peak to measure")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RooflineError("no C compiler (gcc or cc) on PATH to build the peak loop")
    build = Path(tempfile.mkdtemp(prefix="lastbit-roofline-"))
    try:
        src, lib = build / "peak.c", build / "peak.so"
        src.write_text(_SOURCE.replace("CHAINS", str(CHAINS)))
        done = subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vnni", "-shared", "-fPIC", "-o", str(lib), str(src)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise RooflineError(f"{cc} could not build the peak loop: {last}")
        handle = ctypes.CDLL(str(lib))  # mapped: the file can go
    finally:
        shutil.rmtree(build, ignore_errors=True)
    handle.vnni_chains.restype = ctypes.c_int64
    handle.vnni_chains.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    return handle


def vnni_chains(iters: int, a_word: int, b_word: int) -> int:
    """Run the peak loop once (``iters`` rounds) and return its checksum: what a test compares
    with the arithmetic, so the timed loop is known to do all the work it is credited with."""
    return int(_library().vnni_chains(iters, a_word, b_word))


def host_vnni_peak_gmacs(threads: int, seconds: float = 0.25, rounds: int = 3) -> float:
    """The host's int8 dot-product peak in GMAC/s with ``threads`` threads each running the
    loop (ctypes drops the GIL): the best of ``rounds`` runs of about ``seconds`` each."""
    if threads < 1:
        raise RooflineError(f"threads must be >= 1, got {threads}")
    lib = _library()
    start = time.perf_counter()
    lib.vnni_chains(100_000, 1, 1)  # calibrate the round count to the wanted duration
    per_iter = max(time.perf_counter() - start, 1e-6) / 100_000
    iters = max(int(seconds / per_iter), 1000)
    best = 0.0
    for _ in range(rounds):
        workers = [threading.Thread(target=lib.vnni_chains, args=(iters, 3, 5)) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
        best = max(best, threads * iters * CHAINS * MACS_PER_CHAIN_STEP / elapsed / 1e9)
    return best


def function_macs(mod) -> dict[str, int]:
    """Useful MACs of one call of every integer-kernel PrimFunc of a lowered module, by name
    (from the layer each carries in its attributes)."""
    from lastbit.codegen.kernels.common import layer_macs
    from lastbit.codegen.quant_lowering import INT_LAYER_ATTR, int_layer_from_json

    macs = {}
    for gv, func in mod.functions_items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and INT_LAYER_ATTR in attrs:
            layer, _ = int_layer_from_json(str(attrs[INT_LAYER_ATTR]))
            macs[gv.name_hint] = layer_macs(layer)
    return macs


def model_kernel_macs(mod) -> int:
    """Useful MACs of one inference in the integer kernels: each kernel's MACs times the calls
    ``main`` makes to it."""
    from lastbit.autotune.tasks import _call_counts

    calls = _call_counts(mod)
    return sum(macs * calls.get(name, 0) for name, macs in function_macs(mod).items())


def tuning_bound(model_ms: float, kernels_ms: float, macs: int, peak_gmacs: float) -> dict[str, float]:
    """What retuning the kernels could give the whole model at most: the model's time with its
    kernels' share (``kernels_ms`` of ``model_ms``) replaced by their MACs at the peak, and the
    fraction of peak the kernels reach now."""
    if not 0 <= kernels_ms <= model_ms or peak_gmacs <= 0:
        raise RooflineError(f"kernels take {kernels_ms} ms of a {model_ms} ms model at peak {peak_gmacs} GMAC/s")
    floor_ms = macs / peak_gmacs / 1e6
    return {"kernels_at_peak_ms": floor_ms, "kernel_fraction_of_peak": floor_ms / kernels_ms if kernels_ms else 0.0,
            "max_model_speedup": model_ms / (model_ms - kernels_ms + min(floor_ms, kernels_ms))}
