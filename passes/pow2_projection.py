"""Power-of-two code sets and the projection W ≈ α·q onto them (Leng et al., AAAI 2018).

`project_pow2` is the G-step of ADMM quantization and the whole of the data-free "one-click"
mode; it is plain numpy so it can be tested without torch or TVM.

Code sets and the bits each needs (ceil(log2(#levels))):

    name       levels                       #levels  bits
    binary     {-1, +1}                         2      1
    ternary    {0, ±1}                          3      2
    pow2-2     {0, ±1, ±2}                      5      3   the paper's {-2..2}
    pow2-4     {0, ±1, ±2, ±4}                  7      3   the paper's {-4..4}
    pow2-8     {0, ±1, ±2, ±4, ±8}              9      4
    pow2-64    {0, ±1, ±2, …, ±64}             15      4
    int8       {-127, …, 127}                 255      8   uniform, NOT power-of-two

"int8" is the symmetric uniform int8 grid the first and last layers are kept on (as the paper
and its peers keep them at 8 bit); it is here so one projection and one QuantInfo serve both.
`code_set(bits)` gives the largest set of the family that fits the width (binary, ternary,
pow2-4, pow2-64): each is a superset of every smaller one, so its best fit is never worse, and
3 bits hold 8 codes, so {-2..2} would waste two of them. 64 is the largest power of two an
int8 code holds, hence bits ≤ 4 for power-of-two sets; bits = 8 means "int8".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lastbit.errors import LastbitError

__all__ = [
    "BITS_TO_CODE_SET",
    "CODE_SETS",
    "INT8",
    "CodeSet",
    "QuantizationError",
    "code_set",
    "dequantize",
    "pow2_codes",
    "projection_error",
    "project_pow2",
    "round_to_set",
]

MAX_POW2_EXPONENT = 6  # ±2**6 = ±64 is the largest power of two an int8 code holds


class QuantizationError(LastbitError):
    """A bad code set, bit width, layer name or weight tensor given to quantization; the message names it."""


@dataclass(frozen=True, eq=False)
class CodeSet:
    """A symmetric set of integer levels; a quantized tensor is α·q with q drawn from `levels`."""

    name: str
    levels: np.ndarray

    def __post_init__(self) -> None:
        raw = np.asarray(self.levels)
        if raw.ndim != 1 or raw.size < 2:
            raise QuantizationError(f"code set {self.name!r} needs at least two levels, got {raw.tolist()}")
        if not np.all(np.isfinite(raw.astype(np.float64))) or not np.all(raw == np.round(raw)):
            raise QuantizationError(f"code set {self.name!r} has non-integer levels {raw.tolist()}")
        if np.any(np.abs(raw) > 127):
            raise QuantizationError(f"code set {self.name!r} has levels outside int8 [-127, 127]: {raw.tolist()}")
        levels = np.unique(raw.astype(np.int64)).astype(np.int8)
        # α > 0 carries the sign convention, so a lopsided set would make the fit depend on the sign of α.
        if not np.array_equal(levels, -levels[::-1]):
            raise QuantizationError(f"code set {self.name!r} is not symmetric about 0: {levels.tolist()}")
        levels.setflags(write=False)
        object.__setattr__(self, "levels", levels)

    @property
    def bits(self) -> int:
        """Storage width of one code: ceil(log2(#levels))."""
        return max(1, math.ceil(math.log2(self.levels.size)))

    @property
    def has_zero(self) -> bool:
        return bool(np.any(self.levels == 0))

    @property
    def max_level(self) -> int:
        return int(self.levels[-1])

    @property
    def magnitudes(self) -> np.ndarray:
        """The distinct |level| values, ascending (starts at 0 when the set holds 0)."""
        return np.unique(np.abs(self.levels.astype(np.int64)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodeSet) and self.name == other.name and np.array_equal(self.levels, other.levels)

    def __hash__(self) -> int:
        return hash((self.name, self.levels.tobytes()))

    def __repr__(self) -> str:
        lv = self.levels.tolist()
        shown = lv if len(lv) <= 15 else f"[{lv[0]}, {lv[1]}, …, {lv[-1]}]"
        return f"CodeSet({self.name!r}, levels={shown}, bits={self.bits})"


def pow2_codes(n: int) -> CodeSet:
    """{0, ±1, ±2, …, ±2**n}; n = 0 is ternary, n = 1 the paper's {-2..2}, n = 2 its {-4..4}."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_POW2_EXPONENT:
        raise QuantizationError(f"pow2 exponent must be an int in 0..{MAX_POW2_EXPONENT} (int8 codes), got {n!r}")
    n = int(n)
    mags = [2**k for k in range(n + 1)]
    return CodeSet("ternary" if n == 0 else f"pow2-{2**n}", np.array([-m for m in mags] + [0] + mags))


BINARY = CodeSet("binary", np.array([-1, 1]))
# Symmetric uniform int8 (no -128, so the grid is symmetric and α carries the sign convention).
INT8 = CodeSet("int8", np.arange(-127, 128))

CODE_SETS: dict[str, CodeSet] = {"binary": BINARY}
CODE_SETS.update({c.name: c for c in (pow2_codes(k) for k in range(MAX_POW2_EXPONENT + 1))})
CODE_SETS["int8"] = INT8

# Other spellings users meet: the paper's notation, and the "-Nbit" labels of the task brief.
# Note the brief's "pow2-4bit" ({0,±1,±2,±4}) needs only 3 bits; prefer the canonical names.
_ALIASES = {
    "{-1,+1}": "binary",
    "{-1,0,+1}": "ternary",
    "{-2..2}": "pow2-2",
    "{-4..4}": "pow2-4",
    "{-8..8}": "pow2-8",
    "pow2-3bit": "pow2-2",
    "pow2-4bit": "pow2-4",
}

# bits -> the largest pow2 set that fits: 2**b - 1 levels {0, ±1, …, ±2**(2**(b-1) - 2)} for b ≥ 2.
# 8 bits is the uniform int8 grid (no power-of-two set needs more than 4).
BITS_TO_CODE_SET: dict[int, CodeSet] = {
    1: BINARY, 2: CODE_SETS["ternary"], 3: CODE_SETS["pow2-4"], 4: CODE_SETS["pow2-64"], 8: INT8,
}


def code_set(spec: str | int | CodeSet) -> CodeSet:
    """Resolve a code set from a name ("ternary", "pow2-4", "int8", …), a bit width (1..4, 8) or a CodeSet."""
    if isinstance(spec, CodeSet):
        return spec
    if isinstance(spec, bool):  # bool is an int; True would silently mean 1 bit
        raise QuantizationError(f"code set must be a name, a bit width or a CodeSet, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        if int(spec) not in BITS_TO_CODE_SET:
            supported = ", ".join(str(b) for b in BITS_TO_CODE_SET)
            raise QuantizationError(f"bit width {int(spec)} out of range: supported {supported}")
        return BITS_TO_CODE_SET[int(spec)]
    if isinstance(spec, str):
        key = spec.strip().lower().replace(" ", "")
        if key.isdigit():
            return code_set(int(key))
        key = _ALIASES.get(key, key)
        if key in CODE_SETS:
            return CODE_SETS[key]
        known = ", ".join([*CODE_SETS, *_ALIASES])
        raise QuantizationError(f"unknown code set {spec!r}; known: {known}, or a bit width 1..4 or 8")
    raise QuantizationError(f"code set must be a name, a bit width or a CodeSet, got {type(spec).__name__} {spec!r}")


def _checked_array(w: object, what: str = "weight tensor", keep_float: bool = False) -> np.ndarray:
    """``w`` as float64 (``keep_float``: float32 stays float32, uncopied), checked finite."""
    arr = np.asarray(w)
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise QuantizationError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if not (keep_float and arr.dtype in (np.float32, np.float64)):
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise QuantizationError(f"{what} is empty (shape {arr.shape})")
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise QuantizationError(f"{what} has {bad} non-finite values (NaN/Inf) out of {arr.size}")
    return arr


def round_to_set(v: object, levels: np.ndarray | CodeSet) -> np.ndarray:
    """Nearest level for every element of v, in the levels' dtype.

    Ties go to the level of smaller magnitude (toward 0); an exact tie between -l and +l (v = 0 in
    a set without 0) goes to +l, so binary rounds 0 to +1 as sign() conventionally does.
    """
    lv = levels.levels if isinstance(levels, CodeSet) else np.asarray(levels)
    if lv.ndim != 1 or lv.size == 0:
        raise QuantizationError(f"levels must be a non-empty 1-D array, got shape {lv.shape}")
    lv = np.unique(lv)
    vals = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(vals)):
        bad = vals.size - int(np.count_nonzero(np.isfinite(vals)))
        raise QuantizationError(f"cannot round {bad} non-finite values (NaN/Inf) to a code set")
    lf = lv.astype(np.float64)
    hi = np.clip(np.searchsorted(lf, vals, side="left"), 1, max(lf.size - 1, 1))
    lo = hi - 1
    if lf.size == 1:
        return np.full(vals.shape, lv[0], dtype=lv.dtype)
    d_lo, d_hi = vals - lf[lo], lf[hi] - vals
    take_hi = d_hi < d_lo
    tie = d_hi == d_lo
    # tie: smaller |level| wins; |lo| == |hi| only for -l/+l, where +l (hi) wins.
    take_hi |= tie & (np.abs(lf[hi]) <= np.abs(lf[lo]))
    return lv[np.where(take_hi, hi, lo)]


def dequantize(q: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """α·q in float32 — the exact values a quantized layer holds (torch's float32 product agrees bit for bit)."""
    return np.asarray(alpha, dtype=np.float32) * np.asarray(q).astype(np.float32)


def projection_error(w: object, q: np.ndarray, alpha: np.ndarray | float) -> float:
    """‖w − α·q‖² in float64."""
    diff = np.asarray(w, dtype=np.float64) - np.asarray(alpha, dtype=np.float64) * np.asarray(q, dtype=np.float64)
    return float(np.sum(diff * diff))


# --- the exact search for small code sets (binary, ternary, pow2-*) ---------------------------
#
# With |w| = a and the signs fixed by w, the best q maximizes the gain ⟨a,q⟩²/⟨q,q⟩ (α = ⟨a,q⟩/⟨q,q⟩).
# The optimal q is round(a·u) for some u = 1/α, and as u grows element i moves from magnitude
# m_j to m_{j+1} at the breakpoint u = mid_j / a_i. So the candidates are the states along that
# path: with a sorted descending, a state is a count k_j per midpoint (the top k_j elements sit
# above mid_j), and ⟨a,q⟩, ⟨q,q⟩ come from prefix sums. Instead of scoring all T·n breakpoints,
# the search scores a grid of u, bounds every interval between grid points, and only sweeps the
# breakpoints of intervals whose bound beats the best state found: a branch and bound that
# returns the same global optimum (up to float rounding) at a fraction of the cost.
#
# The bound: a move inside (u1, u2] adds step_p·a_i to ⟨a,q⟩ and step_q = step_p·2·mid_j to
# ⟨q,q⟩, and a_i = mid_j/u, so every move adds at most 1/(2·u1) to ⟨a,q⟩ per unit of ⟨q,q⟩.
# Any state inside is then below (p1 + x/(2·u1))²/(q1 + x) for some x in [0, q2 − q1], a
# function whose maximum on an interval is at an end.

_GRID_POINTS = 64  # u-grid points over the whole path
_SPLIT_POINTS = 16  # grid points per interval split
_SWEEP_MOVES = 256  # an interval with at most this many breakpoints is swept outright
_SWEEP_ROW_MOVES = 8192  # rows with at most this many breakpoints are swept outright, all at once
_CHUNK_ELEMENTS = 1 << 22  # rows handled together: bounds the temporaries


def _optimal_counts(desc: np.ndarray, csum: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """The globally optimal state of one row: counts k_j (how many of the largest |w| sit above
    midpoint j), for magnitudes ``desc`` sorted descending with prefix sums ``csum``."""
    n, T = desc.size, mags.size - 1
    best_k = np.zeros(T, dtype=np.int64)
    if T == 0 or desc[0] <= 0:
        return best_k
    mids = (mags[:-1] + mags[1:]) / 2.0
    step_p, step_q = np.diff(mags), np.diff(mags * mags)
    base_p, base_q = mags[0] * csum[n], n * mags[0] ** 2
    asc = desc[::-1]

    def counts(u: np.ndarray) -> np.ndarray:  # (m,) grid -> (T, m): elements with a·u ≥ mid_j
        return n - np.searchsorted(asc, mids[:, None] / u[None, :], side="left")

    def sums(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return base_p + step_p @ csum[k], base_q + step_q @ k

    def gain(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.divide(p * p, q, out=np.zeros_like(p), where=q > 0)

    a_min = float(desc[np.count_nonzero(desc > 0) - 1])
    # just below the first breakpoint (all at m_0) to just past the last (all nonzero at m_T):
    # every state of the path lies between (the margin absorbs the rounding of mid/u)
    # (capped: elements below 1e-300 of the max moving up cannot raise the gain)
    u = np.geomspace(mids[0] / desc[0] * (1 - 1e-9), min(mids[-1] / max(a_min, 1e-300), 1e300) * (1 + 1e-9),
                     _GRID_POINTS)
    k = counts(u)
    p, q = sums(k)
    g = gain(p, q)
    best = base_p * base_p / base_q if base_q > 0 else 0.0
    if g.max() > best:
        best, best_k = float(g.max()), k[:, int(np.argmax(g))].copy()
    # intervals (u1, u2] as arrays of their end states
    lo = (u[:-1], k[:, :-1], p[:-1], q[:-1])
    hi = (u[1:], k[:, 1:], p[1:], q[1:])
    while lo[0].size:
        u1, k1, p1, q1 = lo
        u2, k2, p2, q2 = hi
        bound = np.maximum(gain(p1, q1), gain(p1 + (q2 - q1) / (2.0 * u1), q2))
        moves = np.sum(k2 - k1, axis=0)
        live = (bound > best * (1 + 1e-13)) & (moves > 0)
        sweep = live & (moves <= _SWEEP_MOVES)
        for i in np.flatnonzero(sweep):
            runs = [np.arange(k1[j, i], k2[j, i]) for j in range(T)]
            ranks = np.concatenate(runs)
            run_of = np.repeat(np.arange(T), [r.size for r in runs])
            with np.errstate(over="ignore"):  # subnormal |w|: its breakpoint is +inf, sorted last
                order = np.argsort(mids[run_of] / desc[ranks], kind="stable")
            run_of, ranks = run_of[order], ranks[order]
            pp = p1[i] + np.cumsum(step_p[run_of] * desc[ranks])
            qq = q1[i] + np.cumsum(step_q[run_of])
            gg = gain(pp, qq)
            t = int(np.argmax(gg))
            if gg[t] > best:
                best = float(gg[t])
                best_k = k1[:, i] + np.bincount(run_of[: t + 1], minlength=T)
        split = np.flatnonzero(live & ~sweep)
        if not split.size:
            break
        # split each remaining interval on a geometric grid and bound the pieces
        frac = np.linspace(0.0, 1.0, _SPLIT_POINTS)[None, :]
        grid = u1[split, None] * (u2[split, None] / u1[split, None]) ** frac
        grid[:, 0], grid[:, -1] = u1[split], u2[split]  # the ends exactly: their states are known
        inner = grid[:, 1:-1].ravel()
        k_in = counts(inner).reshape(T, split.size, _SPLIT_POINTS - 2)
        k_all = np.concatenate([k1[:, split, None], k_in, k2[:, split, None]], axis=2)
        p_all, q_all = sums(k_all.reshape(T, -1))
        p_all, q_all = p_all.reshape(split.size, -1), q_all.reshape(split.size, -1)
        g_in = gain(p_all[:, 1:-1], q_all[:, 1:-1])
        if g_in.size and g_in.max() > best:
            r, c = np.unravel_index(int(np.argmax(g_in)), g_in.shape)
            best, best_k = float(g_in[r, c]), k_in[:, r, c].copy()
        lo = (grid[:, :-1].ravel(), k_all[:, :, :-1].reshape(T, -1), p_all[:, :-1].ravel(), q_all[:, :-1].ravel())
        hi = (grid[:, 1:].ravel(), k_all[:, :, 1:].reshape(T, -1), p_all[:, 1:].ravel(), q_all[:, 1:].ravel())
    return best_k


def _swept_counts(desc: np.ndarray, csum: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """`_optimal_counts` for many short rows at once: every breakpoint of every row scored
    (sorted per row, prefix sums along it), no bound needed. Returns counts (rows, T)."""
    rows, n = desc.shape
    T = mags.size - 1
    mids = (mags[:-1] + mags[1:]) / 2.0
    step_p, step_q = np.diff(mags), np.diff(mags * mags)
    with np.errstate(divide="ignore", over="ignore"):  # |w| = 0 never moves: breakpoint +inf
        u = (mids[None, :, None] / desc[:, None, :]).reshape(rows, T * n)
    order = np.argsort(u, axis=1, kind="stable")
    run_of, rank = order // n, order % n
    p = mags[0] * csum[:, -1:] + np.cumsum(step_p[run_of] * np.take_along_axis(desc, rank, axis=1), axis=1)
    q = n * mags[0] ** 2 + np.cumsum(step_q[run_of], axis=1)
    gain = np.divide(p * p, q, out=np.zeros_like(p), where=q > 0)
    t = np.argmax(gain, axis=1)
    base_q = n * mags[0] ** 2
    base = (mags[0] * csum[:, -1]) ** 2 / base_q if base_q > 0 else np.zeros(rows)
    take = gain[np.arange(rows), t] > base
    counts = np.stack([np.cumsum(run_of == j, axis=1)[np.arange(rows), t] for j in range(T)], axis=1)
    return np.where(take[:, None], counts, 0)


def _exact_magnitudes_rows(a: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """Globally optimal magnitude codes for each row of |w| = a (rows, n): short rows swept
    outright, all at once; long ones by the branch and bound, row by row."""
    rows, n = a.shape
    desc = np.sort(a, axis=1)[:, ::-1]  # ties in any order: each order is a path through the same states
    csum = np.concatenate([np.zeros((rows, 1)), np.cumsum(desc, axis=1)], axis=1)
    T = mags.size - 1
    if T == 0:
        counts = np.zeros((rows, 0), dtype=np.int64)
    elif T == 1:  # one run of breakpoints, in rank order: the best prefix of the largest |w| moves up
        k = np.arange(n + 1)
        p = mags[0] * csum[:, -1:] + (mags[1] - mags[0]) * csum
        q = n * mags[0] ** 2 + (mags[1] ** 2 - mags[0] ** 2) * k
        gain = np.divide(p * p, q, out=np.zeros_like(p), where=q > 0)
        counts = np.argmax(gain, axis=1)[:, None]  # the first maximum: k = 0 (all at m_0) wins ties
    elif T * n <= _SWEEP_ROW_MOVES:
        counts = _swept_counts(desc, csum, mags)
    else:
        counts = np.stack([_optimal_counts(desc[r], csum[r], mags) for r in range(rows)])
    # Element i sits above midpoint j iff it is among the k_j largest: |w_i| ≥ the k_j-th largest,
    # unless equal values straddle that count (rows of repeated values); those rows go by rank.
    top = np.take_along_axis(desc, np.clip(counts - 1, 0, n - 1), axis=1)
    after = np.take_along_axis(desc, np.clip(counts, 0, n - 1), axis=1)
    straddle = np.any((counts > 0) & (counts < n) & (after == top), axis=1)
    threshold = np.where(counts > 0, top, np.inf)
    level = np.sum(a[:, :, None] >= threshold[:, None, :], axis=2)
    for r in np.flatnonzero(straddle):
        order = np.argsort(-a[r], kind="stable")
        level[r, order] = np.sum(np.arange(n)[:, None] < counts[r][None, :], axis=1)
    return mags[level]


# --- the alternation, for every row at once --------------------------------------------------


def _fit_alpha_rows(w: np.ndarray, q: np.ndarray) -> np.ndarray:
    qq = np.einsum("ij,ij->i", q, q)
    return np.divide(np.einsum("ij,ij->i", w, q), qq, out=np.zeros(w.shape[0]), where=qq > 0)


def _error_rows(w: np.ndarray, q: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    d = w - alpha[:, None] * q
    return np.einsum("ij,ij->i", d, d)


def _round_uniform(v: np.ndarray, top: int) -> np.ndarray:
    """round_to_set onto {-top..top}: nearest integer, ties toward 0, clipped (exact in floats).
    One temporary, updated in place: this runs over every weight of the largest layers."""
    out = np.abs(v)
    out -= 0.5
    np.ceil(out, out=out)
    np.minimum(out, top, out=out)
    np.copysign(out, v, out=out)
    out += 0.0  # -0 -> 0
    return out


def _rounder(cs: CodeSet):
    if _is_uniform(cs):
        return lambda v: _round_uniform(v, cs.max_level)
    return lambda v: round_to_set(v, cs).astype(np.float64)


def _refine_rows(w: np.ndarray, q: np.ndarray, cs: CodeSet, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's alternation from (q, α(q)) per row: α = ⟨w,q⟩/⟨q,q⟩, q = round(w/α), while
    it strictly improves the row's error. Returns (q, α); q is updated in place."""
    rnd = _rounder(cs)
    alpha = _fit_alpha_rows(w, q)
    err = _error_rows(w, q, alpha)
    active = np.ones(w.shape[0], dtype=bool)
    for _ in range(max_iter):
        active &= alpha > 0
        rows = np.flatnonzero(active)
        if not rows.size:
            break
        q_new = rnd(w[rows] / alpha[rows, None])
        alpha_new = _fit_alpha_rows(w[rows], q_new)
        err_new = _error_rows(w[rows], q_new, alpha_new)
        better = err_new < err[rows] * (1 - 1e-12)
        keep = rows[better]
        q[keep], alpha[keep], err[keep] = q_new[better], alpha_new[better], err_new[better]
        active[rows[~better]] = False
    return q, alpha


# --- the uniform grid (int8) -----------------------------------------------------------------

_EXACT_MAX_LEVELS = 15  # sets up to this size (pow2-64) take the exact search
_GRID_TOP_LEVELS = 32  # a uniform-grid input is recognised when its max|q| is within this of the top
_UNIFORM_STARTS = np.linspace(0.4, 1.3, 91)  # starting α as a fraction of max|w| / top level
_DIRECT_START_ELEMENTS = 1 << 26  # weights·starts up to this: every start is scored on the data itself
# int8 on sorted rows: past this size the (over-relaxed) alternation is capped at a few rounds;
# on an 8192² Linear 12 rounds end within 0.02% of the uncapped search's projection error
# (benchmarks/compile_time.py records the ratio). Never worse than the best start (max-abs
# scaling among them).
_LARGE_TENSOR_ELEMENTS = 1 << 24
_LARGE_TENSOR_ROUNDS = 12
_PROJECTION_THREADS = min(4, os.cpu_count() or 1)  # ~200 MB of temporaries each
_OVER_RELAX = 2.0  # ω grows by this each round that the over-relaxed step improves
_HISTOGRAM_BINS_PER_LEVEL = 4  # beyond: on a histogram of |w| with this many bins per level
_HISTOGRAM_CANDIDATES = 6  # the best starts on the histogram, scored exactly


def _best_uniform_starts(w: np.ndarray, a_max: np.ndarray, top: int) -> np.ndarray:
    """Per row, q at the best of a grid of scales α = f·max|w|/top, f in [0.4, 1.3]: the error
    as a function of α is jagged for a uniform grid, so the alternation alone stalls in the
    first dip it meets. Clipping a few outliers usually pays (f < 1); for a short row a scale
    that leaves the top level unused can fit better by chance (f > 1)."""
    alphas = _UNIFORM_STARTS[None, :] * (a_max[:, None] / top)  # (rows, starts)
    out = np.empty_like(w)
    step = max(1, _CHUNK_ELEMENTS // (w.shape[1] * _UNIFORM_STARTS.size))
    for s in range(0, w.shape[0], step):
        ws, al = w[s:s + step, None, :], alphas[s:s + step, :, None]
        q = np.clip(np.round(ws / al), -top, top)
        err = np.sum((ws - al * q) ** 2, axis=2)
        out[s:s + step] = q[np.arange(q.shape[0]), np.argmin(err, axis=1)]
    return out


@functools.lru_cache(maxsize=None)
def _histogram_levels(top: int) -> tuple[np.ndarray, np.ndarray]:
    """(level, level²) of each histogram bin's centre (in max-abs units) at each of the
    `_UNIFORM_STARTS` scales, (bins, starts): the same for every row and every chunk."""
    centre = (np.arange(top * _HISTOGRAM_BINS_PER_LEVEL + 1) + 0.5) / _HISTOGRAM_BINS_PER_LEVEL
    levels = np.minimum(np.round(centre[:, None] / _UNIFORM_STARTS[None, :]), top)
    return levels, levels * levels


def _histogram_starts(data: "_SortedRows", a_max: np.ndarray, top: int) -> np.ndarray:
    """Per row, the `_HISTOGRAM_CANDIDATES` most promising of the `_UNIFORM_STARTS` scales
    (rows, candidates): scored on a histogram of |w| (bins a quarter of a level wide, each bin's
    elements at its centre), so the scan costs the bins', not the row's. They are then scored
    exactly; the best of the 91 on the data is almost always among them. The histogram is read
    off the sorted rows: bin edges are looked up, counts and sums are prefix-sum differences."""
    rows, bins = a_max.size, top * _HISTOGRAM_BINS_PER_LEVEL + 1
    unit = a_max / (top * _HISTOGRAM_BINS_PER_LEVEL)  # one bin's width in |w|
    # element i is in bin ≥ j iff |w_i| ≥ j·unit (the last bin holds max|w| itself)
    edges = data.positions(np.arange(1, bins)[None, :] * unit[:, None], np.arange(rows), side="left")
    starts = (np.arange(rows) * data.n)[:, None]
    pos = np.concatenate([starts, edges, starts + data.n], axis=1)
    count = np.diff(pos, axis=1).astype(np.float64)
    csum = data.csum.ravel()[pos + np.arange(rows)[:, None]]  # row r's prefix sums start at r·(n + 1)
    total = np.diff(csum, axis=1)
    alpha_unit = a_max / top

    def error(f: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        alpha = f * alpha_unit[:, None]
        return data.sum_sq[:, None] - 2 * alpha * p + alpha * alpha * q

    # the scan: every row's bins sit at the same places in max-abs units, so the levels of a
    # start are shared and its ⟨a,q⟩, ⟨q,q⟩ are one matrix product for all rows
    levels, squares = _histogram_levels(top)
    err = error(_UNIFORM_STARTS[None, :], total @ levels, count @ squares)
    best = _UNIFORM_STARTS[np.argsort(err, axis=1)[:, :_HISTOGRAM_CANDIDATES]]
    # max-abs scaling always competes: the result is never worse than the usual int8 quantizer
    return np.concatenate([best, np.ones((rows, 1))], axis=1) * alpha_unit[:, None]


class _SortedRows:
    """Rows of |w| sorted, with prefix sums: ⟨a,q⟩ and ⟨q,q⟩ of q = round(a/α) on the uniform
    grid from 127 look-ups per row instead of a pass over it. All rows share one search: row r
    is shifted by 2·r (|w| < 1 after the power-of-two scaling, and thresholds are capped at 1),
    which can move a comparison only for an element within ~1e-13 of a rounding threshold.
    Look-ups are made in ascending key order: numpy's binary search then starts from the last
    answer and stays in cache, far faster than on the same keys in random order."""

    def __init__(self, asc: np.ndarray, top: int):
        """``asc``: the rows of |w| sorted ascending, float64; taken over (shifted in place)."""
        rows, self.n = asc.shape
        self.top = top
        self.offset = 2.0 * np.arange(rows)
        self.csum = np.zeros((rows, self.n + 1))
        np.cumsum(asc, axis=1, out=self.csum[:, 1:])
        self.sum_sq = np.einsum("ij,ij->i", asc, asc)
        asc += self.offset[:, None]
        self.keys = asc.ravel()
        self.odd = 2.0 * np.arange(top) + 1.0  # level² = Σ_{k < level} (2k + 1)
        self.cap = 1.0 + (np.arange(top) + 0.5) / (2 * top)

    def positions(self, thr: np.ndarray, rows: np.ndarray, side: str = "right") -> np.ndarray:
        """Index into the flat keys of the first element of row ``rows[i]`` above (side "right")
        or at least (side "left") ``thr[i, ...]``, thresholds in [0, 1]."""
        keys = (thr + self.offset[rows].reshape((-1,) + (1,) * (thr.ndim - 1))).ravel()
        if keys.size > 1 and not np.all(keys[1:] >= keys[:-1]):
            order = np.argsort(keys, kind="stable")
            pos = np.empty(keys.size, dtype=np.int64)
            pos[order] = np.searchsorted(self.keys, keys[order], side=side)
        else:
            pos = np.searchsorted(self.keys, keys, side=side)
        return pos.reshape(thr.shape)

    def sums(self, alpha: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(⟨a,q⟩, ⟨q,q⟩) for each of ``rows`` at scale ``alpha`` (m,) or (m, c)."""
        alpha = alpha.reshape(rows.size, -1)
        # element i is above level k iff a_i > (k + 0.5)·α; thresholds ≥ 1 are above every |w|,
        # so they are capped in [1, 1.5) (within the row's key range), on a ramp that keeps them
        # distinct: numpy's search restarts from the array's start on a repeated key
        thr = np.minimum((np.arange(self.top) + 0.5)[None, None, :] * alpha[:, :, None], self.cap)
        pos = self.positions(thr, rows)
        below = pos - (rows * self.n)[:, None, None]
        below_sum = self.csum.ravel()[below + (rows * (self.n + 1))[:, None, None]]
        p = self.csum[rows, -1][:, None] * self.top - below_sum.sum(axis=2)
        q = ((self.n - below) * self.odd).sum(axis=2)
        return p, q


def _refine_sorted_rows(w: np.ndarray, asc: np.ndarray, a_max: np.ndarray, top: int,
                        max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """`_best_uniform_starts` + `_refine_rows` for large tensors, on sorted rows (``asc``: the
    rows of |w| sorted ascending, consumed): the histogram picks candidate starts, `_SortedRows`
    scores them and runs the alternation, and one pass over the data turns the final α into
    codes.

    On long rows the plain alternation creeps (each round moves α a tiny step, in the same
    direction, for dozens of rounds), so it is over-relaxed: a row's next codes come from
    α_gen + ω·(α_fit − α_gen), ω doubling while that improves the row's error and falling back
    to the plain step (ω = 1) when it does not; a row stops when the plain step fails too. Only
    improvements are taken, so it is never worse than its start; on an 8192² Linear 12 rounds
    reach a lower error than 100 plain ones (benchmarks/compile_time.py records both)."""
    data = _SortedRows(asc, top)
    all_rows = np.arange(w.shape[0])
    cand = _histogram_starts(data, a_max, top)
    p, q = data.sums(cand, all_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = data.sum_sq[:, None] - 2 * cand * p + cand * cand * q
    pick = np.argmin(err, axis=1)
    gen = cand[all_rows, pick]  # q = round(|w| / gen): the start's codes
    p, q = p[all_rows, pick], q[all_rows, pick]
    alpha = np.where(q > 0, p / np.where(q > 0, q, 1.0), 0.0)
    gain = np.where(q > 0, p * p / np.where(q > 0, q, 1.0), 0.0)  # ‖a‖² − error at α = fit(q)
    active = alpha > 0
    omega = np.ones(w.shape[0])
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if not rows.size:
            break
        trial = gen[rows] + omega[rows] * (alpha[rows] - gen[rows])
        p_new, q_new = (x[:, 0] for x in data.sums(trial, rows))
        gain_new = np.where(q_new > 0, p_new * p_new / np.where(q_new > 0, q_new, 1.0), 0.0)
        err, err_new = data.sum_sq[rows] - gain[rows], data.sum_sq[rows] - gain_new
        better = err_new < err * (1 - 1e-12)
        keep = rows[better]
        gen[keep], gain[keep] = trial[better], gain_new[better]
        alpha[keep] = p_new[better] / q_new[better]
        omega[keep] *= _OVER_RELAX
        failed = rows[~better]
        active[failed[omega[failed] == 1.0]] = False
        omega[failed] = 1.0
    codes = _round_uniform(w / gen[:, None], top)
    return codes, _fit_alpha_rows(w, codes)


def _on_uniform_grid_rows(w: np.ndarray, a_max: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of w (already scaled by a power of two) that are exactly float32(α)·q on the uniform
    grid, with max|q| near the top level: (mask, q, α) (q, α valid where mask). The alternation
    may settle with max|q| a little below the top, so checking only α = max|w|/127 would miss
    such an output: with this, projecting a projection returns it unchanged (error 0), which
    ADMM → graph (``QuantInfo.exact``) relies on. A few probe elements rule out most rows and
    scales before any full row is checked."""
    tops = np.arange(top, max(top - _GRID_TOP_LEVELS, 0), -1)
    base = (a_max[:, None] / tops[None, :]).astype(np.float32)  # (rows, tops)
    # max|w| = float32(α·max|q|) is rounded, so max|w| / max|q| can land one float32 step off α:
    # try the neighbours too, each top's own α first
    near = (base, np.nextafter(base, np.float32(0)), np.nextafter(base, np.float32(np.inf)))
    alphas = np.stack(near, axis=-1).reshape(base.shape[0], -1).astype(np.float64)  # (rows, tops·3)
    probe_cols = np.unique(np.concatenate([np.arange(min(8, w.shape[1])), [0]]))
    probe = np.concatenate([w[:, probe_cols], np.take_along_axis(w, np.argmax(np.abs(w), axis=1)[:, None], 1)], axis=1)

    def fits(x: np.ndarray, al: np.ndarray) -> np.ndarray:
        q = np.round(x / al)
        ok = np.all(np.abs(q) <= top, axis=-1) & np.all(al.astype(np.float32) * q.astype(np.float32) == x.astype(np.float32), axis=-1)
        return ok, q

    maybe, _ = fits(probe[:, None, :], alphas[:, :, None])
    mask = np.zeros(w.shape[0], dtype=bool)
    q_out, a_out = np.zeros_like(w), np.ones(w.shape[0])
    for r in np.flatnonzero(maybe.any(axis=1)):
        for t in np.flatnonzero(maybe[r]):
            ok, q = fits(w[r], alphas[r, t])
            if ok:
                mask[r], q_out[r], a_out[r] = True, q, alphas[r, t]
                break
    return mask, q_out, a_out


def _is_uniform(cs: CodeSet) -> bool:
    """Levels are every integer in [-m, m] (int8): a grid, not powers of two."""
    return bool(np.array_equal(cs.levels, np.arange(-cs.max_level, cs.max_level + 1)))


def _project_uniform_rows(w: np.ndarray, cs: CodeSet, max_iter: int, direct: bool,
                          native: np.ndarray, exponent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8: too many levels for the exact search (O(levels) breakpoints per element). Start from
    the best of a grid of clipping scales (max-abs scaling, the usual symmetric int8 quantizer,
    among them) and let the alternation polish it: a local optimum, never worse than max-abs
    scaling. Large tensors (``direct`` False) take the same steps on sorted rows
    (`_refine_sorted_rows`), sorted in the input's own precision (``native``, w = native·2^-exponent
    per row: float32 sorts in half the time and its values convert exactly)."""
    top = cs.max_level
    a_max = np.maximum(w.max(axis=1), -w.min(axis=1))
    q, alpha = np.zeros_like(w), np.ones(w.shape[0])
    grid, q_grid, a_grid = _on_uniform_grid_rows(w, np.where(a_max > 0, a_max, 1.0), top)
    q[grid], alpha[grid] = q_grid[grid], a_grid[grid]
    rest = np.flatnonzero((a_max > 0) & ~grid)
    if rest.size == w.shape[0]:
        rest = slice(None)  # every row: views, not copies
    if direct and w[rest].size:
        q[rest], alpha[rest] = _refine_rows(w[rest], _best_uniform_starts(w[rest], a_max[rest], top), cs, max_iter)
    elif w[rest].size:
        asc = np.sort(np.abs(native[rest]), axis=1).astype(np.float64)
        np.ldexp(asc, -exponent[rest, None], out=asc)
        q[rest], alpha[rest] = _refine_sorted_rows(w[rest], asc, a_max[rest], top, max_iter)
    return q, alpha


# --- per-row driver ---------------------------------------------------------------------------


def _project_rows(rows: np.ndarray, cs: CodeSet, max_iter: int, method: str, direct: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q, α) for every row of a (rows, n) float32 or float64 array, each row on its own α;
    ``direct``: the tensor is small enough to score int8's starting scales on the data itself."""
    native, rows = rows, rows.astype(np.float64, copy=False)
    # Scale each row by a power of two so max|w| is in [0.5, 1): exact, so q is scale-invariant,
    # and ⟨w,q⟩² cannot underflow for tiny weights (or overflow for huge ones).
    exponent = np.frexp(np.max(np.abs(rows), axis=1))[1]
    w = np.ldexp(rows, -exponent[:, None])
    if method == "alternating":
        pairs = [_project_row_alternating(row, cs, max_iter) for row in w]
        q = np.stack([p[0] for p in pairs])
        alpha = np.array([p[1] for p in pairs])
    elif _is_uniform(cs) and cs.levels.size > _EXACT_MAX_LEVELS:
        q, alpha = _project_uniform_rows(w, cs, max_iter, direct, native, exponent)
    else:
        sign = np.where(w < 0, -1.0, 1.0)  # 0 -> +1, matching round_to_set's binary tie rule
        # the global optimum: the alternation the paper polishes with cannot improve on it
        q = sign * _exact_magnitudes_rows(np.abs(w), cs.magnitudes.astype(np.float64))
        alpha = _fit_alpha_rows(w, q)
    nonzero = np.any(q != 0, axis=1)
    # all-zero slice in a set with 0: α is arbitrary, 1 keeps α·q = 0 and divisions safe
    alpha = np.where(nonzero, np.ldexp(alpha, exponent), 1.0)
    return q, alpha


def _project_row_alternating(w: np.ndarray, cs: CodeSet, max_iter: int) -> tuple[np.ndarray, float]:
    """The paper's alternation alone from several deterministic starting scales: a local optimum."""
    a = np.abs(w)
    nonzero = cs.magnitudes[cs.magnitudes > 0].astype(np.float64)
    a_max, a_mean = float(a.max()), float(a.mean())
    starts = [a_max / nonzero[-1], 1.4 * a_mean / nonzero[0]]
    if a_max > 0:
        starts += list(np.geomspace(max(a_mean, 1e-300) / nonzero[-1], a_max / nonzero[0], 8))
    best: tuple[np.ndarray, float, float] | None = None
    for alpha0 in starts:
        if alpha0 <= 0:
            continue
        q0 = round_to_set(w / alpha0, cs).astype(np.float64)[None, :]
        q, alpha = _refine_rows(w[None, :], q0, cs, max_iter)
        err = float(_error_rows(w[None, :], q, alpha)[0])
        if best is None or err < best[2]:
            best = (q[0], float(alpha[0]), err)
    if best is None:  # all-zero slice
        best = (round_to_set(np.zeros_like(w), cs).astype(np.float64), 0.0, 0.0)
    return best[0], best[1]


def project_pow2(
    w: object,
    codes: str | int | CodeSet = "ternary",
    axis: int | None = None,
    max_iter: int = 100,
    method: str = "exact",
    progress: "Callable[[int], None] | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best fit w ≈ α·q with q from the code set: argmin over α > 0, q of ‖w − α·q‖².

    axis=None: one α for the tensor (alpha has shape ()). axis=k: one α per slice along k (the
    output channel is axis 0 for conv and linear weights); alpha has the size of that axis there
    and 1 elsewhere, so α·q broadcasts.

    method="exact" (default) finds the global optimum by a branch and bound over the rounding
    breakpoints and then runs the paper's alternation as a polish (for "int8", too many levels
    for that search, it starts from the best of a grid of clipping scales instead: a local
    optimum); method="alternating" is the paper's alternation alone (α = ⟨w,q⟩/⟨q,q⟩,
    q = round(w/α)) from several starting scales, a local optimum. Returns (q as int8 level
    values, alpha as float32). ``progress``, if given, is called with the number of weights
    done after each batch of slices.

    A slice of zeros gets q = 0 and α = 1; for binary (no 0 level) it gets q = +1 and α = 0, the
    only exact fit. NaN/Inf or an empty tensor raise QuantizationError.
    """
    cs = code_set(codes)
    if method not in ("exact", "alternating"):
        raise QuantizationError(f"unknown projection method {method!r}; use 'exact' or 'alternating'")
    arr = _checked_array(w, keep_float=True)
    if axis is None:
        rows, alpha_shape = arr.reshape(1, -1), ()
    else:
        if arr.ndim == 0 or not -arr.ndim <= axis < arr.ndim:
            raise QuantizationError(f"axis {axis} out of range for a weight tensor of shape {arr.shape}")
        axis = axis % arr.ndim
        rows = np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)
        alpha_shape = tuple(arr.shape[axis] if d == axis else 1 for d in range(arr.ndim))
    q_rows = np.empty(rows.shape, dtype=np.int8)
    alphas = np.empty(rows.shape[0], dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // rows.shape[1])
    direct = rows.size * _UNIFORM_STARTS.size <= _DIRECT_START_ELEMENTS
    if rows.size >= _LARGE_TENSOR_ELEMENTS and method == "exact" and _is_uniform(cs):
        max_iter = min(max_iter, _LARGE_TENSOR_ROUNDS)

    def chunk(s: int) -> int:
        q_r, alphas[s:s + step] = _project_rows(rows[s:s + step], cs, max_iter, method, direct)
        q_rows[s:s + step] = q_r
        return q_r.size

    starts = range(0, rows.shape[0], step)
    # numpy's sorts, searches and ufuncs release the GIL: large tensors take their row chunks
    # a few at a time (the work per chunk dwarfs the Python in between)
    threads = min(_PROJECTION_THREADS, len(starts)) if rows.size >= _LARGE_TENSOR_ELEMENTS else 1
    with ThreadPoolExecutor(threads) as pool:
        for done in pool.map(chunk, starts):
            if progress is not None:
                progress(done)
    if axis is None:
        q = q_rows.reshape(arr.shape)
    else:
        moved = tuple(arr.shape[axis] if d == 0 else np.delete(arr.shape, axis)[d - 1] for d in range(arr.ndim))
        q = np.moveaxis(q_rows.reshape(moved), 0, axis)
    return np.ascontiguousarray(q), alphas.astype(np.float32).reshape(alpha_shape)
