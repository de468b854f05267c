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

import math
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


def _checked_array(w: object, what: str = "weight tensor") -> np.ndarray:
    arr = np.asarray(w)
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise QuantizationError(f"{what} must be real numbers, got dtype {arr.dtype}")
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


def _exact_magnitudes(a: np.ndarray, mags: np.ndarray) -> np.ndarray:
    """Globally optimal magnitude codes for |w| = a: argmax over q of ⟨a,q⟩²/⟨q,q⟩.

    For the optimal α the optimal q is the elementwise rounding of a/α, and that rounding only
    changes where a_i/α crosses a midpoint between two magnitudes. So the candidates are the
    states just past each breakpoint u = mid_l / a_i (u = 1/α); in the state of candidate
    (l, i) element k sits above midpoint j iff a_k ≥ a_i·mid_j/mid_l. With a sorted once and its
    prefix sums, each candidate's ⟨a,q⟩ and ⟨q,q⟩ cost one searchsorted per midpoint:
    O(T²·n log n) for T midpoints, memory O(n). Every evaluated state is a feasible q, so the
    maximum found is the global one (ties of the rounding cost nothing: both sides are scored).
    """
    n = a.size
    asc = np.sort(a)
    csum = np.concatenate([[0.0], np.cumsum(asc)])
    mids = (mags[:-1] + mags[1:]) / 2.0
    step_p, step_q = np.diff(mags), np.diff(mags * mags)
    base_p, base_q = mags[0] * csum[-1], n * mags[0] ** 2
    best_score = base_p * base_p / base_q if base_q > 0 else 0.0
    best_thresholds: np.ndarray | None = None  # None: every element at mags[0]
    pivots = np.unique(asc[asc > 0])
    for l in range(mids.size):
        ratios = mids / mids[l]
        p = np.full(pivots.shape, base_p)
        qq = np.full(pivots.shape, base_q)
        for j in range(mids.size):
            thr = pivots if j == l else pivots * ratios[j]  # j == l: exactly a_i, so a_i counts itself
            above = n - np.searchsorted(asc, thr, side="left")
            p = p + step_p[j] * (csum[n] - csum[n - above])
            qq = qq + step_q[j] * above
        score = np.divide(p * p, qq, out=np.zeros_like(p), where=qq > 0)
        k = int(np.argmax(score)) if score.size else 0
        if score.size and score[k] > best_score:
            best_score = score[k]
            best_thresholds = np.array([pivots[k] if j == l else pivots[k] * ratios[j] for j in range(mids.size)])
    if best_thresholds is None:
        return np.full(n, mags[0])
    level = np.sum(a[:, None] >= best_thresholds[None, :], axis=1)
    return mags[level]


def _fit_alpha(w: np.ndarray, q: np.ndarray) -> float:
    qq = float(np.dot(q, q))
    return float(np.dot(w, q)) / qq if qq > 0 else 0.0


def _refine(w: np.ndarray, q: np.ndarray, cs: CodeSet, max_iter: int) -> tuple[np.ndarray, float, float]:
    """The paper's alternation from (q, α(q)): α = ⟨w,q⟩/⟨q,q⟩, q = round(w/α), while it strictly improves."""
    alpha = _fit_alpha(w, q)
    err = float(np.sum((w - alpha * q) ** 2))
    for _ in range(max_iter):
        if alpha <= 0:
            break
        q_new = round_to_set(w / alpha, cs).astype(np.float64)
        alpha_new = _fit_alpha(w, q_new)
        err_new = float(np.sum((w - alpha_new * q_new) ** 2))
        if not err_new < err * (1 - 1e-12):
            break
        q, alpha, err = q_new, alpha_new, err_new
    return q, alpha, err


_EXACT_MAX_LEVELS = 15  # the largest set (pow2-64) the exact breakpoint search handles
_GRID_TOP_LEVELS = 32  # a uniform-grid input is recognised when its max|q| is within this of the top


_UNIFORM_STARTS = np.linspace(0.4, 1.3, 91)  # starting α as a fraction of max|w| / top level


def _best_uniform_start(w: np.ndarray, a_max: float, cs: CodeSet) -> np.ndarray:
    """q at the best of a grid of scales α = f·max|w|/top, f in [0.4, 1.3]: the error
    as a function of α is jagged for a uniform grid, so the alternation alone stalls in the
    first dip it meets. Clipping a few outliers usually pays (f < 1); for a short row a scale
    that leaves the top level unused can fit better by chance (f > 1)."""
    top = cs.max_level
    alphas = _UNIFORM_STARTS * (a_max / top)
    q = np.clip(np.round(w[None, :] / alphas[:, None]), -top, top)
    err = np.sum((w[None, :] - alphas[:, None] * q) ** 2, axis=1)
    return q[int(np.argmin(err))]


def _on_uniform_grid(w: np.ndarray, a_max: float, cs: CodeSet) -> tuple[np.ndarray, float] | None:
    """(q, α) when w (already scaled by a power of two) is exactly float32(α)·q on the uniform
    grid, with max|q| near the top level; else None. The alternation may settle with max|q|
    a little below the top, so checking only α = max|w|/127 would miss such an output: with
    this, projecting a projection returns it unchanged (error 0), which ADMM → graph
    (``QuantInfo.exact``) relies on."""
    for top in range(cs.max_level, max(cs.max_level - _GRID_TOP_LEVELS, 0), -1):
        alpha = float(np.float32(a_max / top))
        q = np.round(w / alpha)
        if np.abs(q).max() <= cs.max_level and np.array_equal(np.float32(alpha) * q.astype(np.float32), w.astype(np.float32)):
            return q, alpha
    return None


def _is_uniform(cs: CodeSet) -> bool:
    """Levels are every integer in [-m, m] (int8): a grid, not powers of two."""
    return bool(np.array_equal(cs.levels, np.arange(-cs.max_level, cs.max_level + 1)))


def _project_row(w: np.ndarray, cs: CodeSet, max_iter: int, method: str) -> tuple[np.ndarray, float]:
    # Scale by a power of two so max|w| is in [0.5, 1): exact, so q is scale-invariant, and
    # ⟨w,q⟩² cannot underflow for tiny weights (or overflow for huge ones).
    exponent = int(np.frexp(np.max(np.abs(w)))[1])
    q, alpha = _project_unit_row(np.ldexp(w, -exponent), cs, max_iter, method)
    return q, (float(np.ldexp(alpha, exponent)) if np.any(q) else alpha)


def _project_unit_row(w: np.ndarray, cs: CodeSet, max_iter: int, method: str) -> tuple[np.ndarray, float]:
    a = np.abs(w)
    sign = np.where(w < 0, -1.0, 1.0)  # 0 -> +1, matching round_to_set's binary tie rule
    mags = cs.magnitudes.astype(np.float64)
    if method == "exact" and _is_uniform(cs) and cs.levels.size > _EXACT_MAX_LEVELS:
        # int8: the breakpoint search costs O(levels²·n log n). Start from the best of a grid of
        # clipping scales (max-abs scaling, the usual symmetric int8 quantizer, among them) and
        # let the alternation polish it: a local optimum never worse than max-abs scaling.
        a_max = float(a.max())
        if a_max == 0.0:
            q, alpha = np.zeros_like(w), 1.0
        else:
            found = _on_uniform_grid(w, a_max, cs)
            if found is not None:
                q, alpha = found
            else:
                q, alpha, _ = _refine(w, _best_uniform_start(w, a_max, cs), cs, max_iter)
    elif method == "exact":
        q, alpha, _ = _refine(w, sign * _exact_magnitudes(a, mags), cs, max_iter)
    else:
        # Several deterministic starting scales; the alternation only finds a local optimum.
        nonzero = mags[mags > 0]
        a_max, a_mean = float(a.max()), float(a.mean())
        starts = [a_max / nonzero[-1], 1.4 * a_mean / nonzero[0]]
        if a_max > 0:
            starts += list(np.geomspace(max(a_mean, 1e-300) / nonzero[-1], a_max / nonzero[0], 8))
        best: tuple[np.ndarray, float, float] | None = None
        for alpha0 in starts:
            if alpha0 <= 0:
                continue
            q0 = round_to_set(w / alpha0, cs).astype(np.float64)
            cand = _refine(w, q0, cs, max_iter)
            if best is None or cand[2] < best[2]:
                best = cand
        if best is None:  # all-zero slice
            best = (round_to_set(np.zeros_like(w), cs).astype(np.float64), 0.0, 0.0)
        q, alpha, _ = best
    if not np.any(q):  # all-zero slice in a set with 0: α is arbitrary, 1 keeps α·q = 0 and divisions safe
        alpha = 1.0
    return q, alpha


def project_pow2(
    w: object,
    codes: str | int | CodeSet = "ternary",
    axis: int | None = None,
    max_iter: int = 100,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """Best fit w ≈ α·q with q from the code set: argmin over α > 0, q of ‖w − α·q‖².

    axis=None: one α for the tensor (alpha has shape ()). axis=k: one α per slice along k (the
    output channel is axis 0 for conv and linear weights); alpha has the size of that axis there
    and 1 elsewhere, so α·q broadcasts.

    method="exact" (default) finds the global optimum by a search over the rounding breakpoints
    and then runs the paper's alternation as a polish (for "int8", too many levels for that
    search, it starts from the best of a grid of clipping scales instead: a local optimum); method="alternating" is the paper's
    alternation alone (α = ⟨w,q⟩/⟨q,q⟩, q = round(w/α)) from several starting scales, a local
    optimum. Returns (q as int8 level values, alpha as float32).

    A slice of zeros gets q = 0 and α = 1; for binary (no 0 level) it gets q = +1 and α = 0, the
    only exact fit. NaN/Inf or an empty tensor raise QuantizationError.
    """
    cs = code_set(codes)
    if method not in ("exact", "alternating"):
        raise QuantizationError(f"unknown projection method {method!r}; use 'exact' or 'alternating'")
    arr = _checked_array(w)
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
    for r in range(rows.shape[0]):
        q_r, alphas[r] = _project_row(rows[r], cs, max_iter, method)
        q_rows[r] = q_r.astype(np.int8)
    if axis is None:
        q = q_rows.reshape(arr.shape)
    else:
        moved = tuple(arr.shape[axis] if d == 0 else np.delete(arr.shape, axis)[d - 1] for d in range(arr.ndim))
        q = np.moveaxis(q_rows.reshape(moved), 0, axis)
    return np.ascontiguousarray(q), alphas.astype(np.float32).reshape(alpha_shape)
