"""The projection as it was before the fast search (commit 32590b6): every row on its own,
the exact breakpoint search scoring all T·n breakpoints, and int8 scoring all 91 starting
scales on the data. Kept only to test the fast path (passes/pow2_projection.py) against it."""

from __future__ import annotations

import numpy as np

from lastbit.passes.pow2_projection import (
    CodeSet,
    QuantizationError,
    _checked_array,
    code_set,
    round_to_set,
)

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


def project_pow2_reference(
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
