"""Per-layer sensitivity for mixed-precision search: how much the loss and the accuracy on
calibration data move when one layer alone takes a choice (a code set, a keep ratio, a rank),
everything else left as trained. HAQ/HAWQ rank choices the same way (HAWQ with a Hessian
trace; the measured loss change here needs no second derivatives and sees the real choice).

The additive model of :func:`additive_drop_model` turns these single-layer changes into a
predicted accuracy drop of a whole configuration: a least-squares factor from loss change to
accuracy points, fitted on the single-layer measurements, times the summed loss change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

__all__ = ["Score", "additive_drop_model", "lowrank_weight", "quantized_weight", "score", "swapped_weight"]


@dataclass(frozen=True)
class Score:
    """Mean cross-entropy and top-1 accuracy (0..1) of a model on calibration data."""

    loss: float
    accuracy: float


def score(module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Score:
    """Loss and accuracy of ``module`` (eval mode, no gradients) on (x, y): admm.evaluate."""
    import torch

    from lastbit.passes.admm import evaluate

    with torch.no_grad():
        return Score(*evaluate(module, (x, y), batch_size))


@contextlib.contextmanager
def swapped_weight(module, layer: str, weight: np.ndarray):
    """``module.<layer>.weight`` replaced by ``weight`` inside the block, restored after."""
    import torch

    target = dict(module.named_modules())[layer]
    saved = target.weight.detach().clone()
    with torch.no_grad():
        target.weight.copy_(torch.as_tensor(weight, dtype=saved.dtype))
    try:
        yield module
    finally:
        with torch.no_grad():
            target.weight.copy_(saved)


def quantized_weight(w: np.ndarray, codes: str, per_channel: bool = True) -> np.ndarray:
    """w projected onto α·codes (one α per output channel), as the quantization pass does."""
    from lastbit.passes.pow2_projection import dequantize, project_pow2

    q, alpha = project_pow2(w, codes, axis=0 if per_channel else None)
    return dequantize(q, alpha).astype(np.float32)


def lowrank_weight(w: np.ndarray, rank: int) -> np.ndarray:
    """The weight the low-rank split computes (k×k conv with ``rank`` filters then 1×1, or
    two dense factors), multiplied back together."""
    from lastbit.passes.lowrank import split_conv

    if w.ndim == 2:  # torch Linear: [out, in]
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(np.float32)
    first, second = split_conv(w, rank)  # [r, I, kh, kw], [O, r, 1, 1]
    return np.einsum("or,rikl->oikl", second[:, :, 0, 0], first).astype(np.float32)


def additive_drop_model(loss_deltas: np.ndarray, accuracy_drops: np.ndarray) -> float:
    """Points of accuracy per unit of loss change: least squares through the origin over the
    single-layer measurements (negative changes count as 0); at least a small positive slope,
    so a choice that raises the loss is never free."""
    dl = np.maximum(np.asarray(loss_deltas, dtype=np.float64), 0.0)
    da = np.maximum(np.asarray(accuracy_drops, dtype=np.float64), 0.0)
    if dl.size == 0 or float(dl @ dl) == 0.0:
        return 1.0
    return max(float(dl @ da) / float(dl @ dl), 1e-3)
