"""The integer path of a quantized layer, in numpy: the one definition every integer kernel
(x86, ARM, the accelerator simulator) must reproduce bit for bit.

A layer ``y = op(x, α·q) + b`` with power-of-two (or int8) weight codes ``q`` runs as

    x_q   = quantize_activation(x, s_x)                  int8, per tensor
    acc   = int_dense(x_q, q) / int_conv2d(x_q, q, ...)  int32: Σ x_q·q, shifts for 2^e codes
    out   = epilogue(acc, bias_q, scale, relu)           float32

with ``scale[o] = float32(α[o]·s_x)`` and the bias folded into the integer domain,
``bias_q = rint(b / scale)`` (:func:`integer_bias`).

k-bit activations (``Squeeze(act_bits=k)``, k < 8) use the same steps on a narrower grid
(:func:`activation_range`): unsigned 0..2^k−1 when the layer input is known non-negative (a
ReLU output), else symmetric ±(2^(k−1)−1) (at least ±1). ``x_q`` stays an int8 tensor; the
scale is the k-bit one, max|x| / (top of the grid). The float reference graph fake-quantizes
to the same grid, ``quantize_activation(x, s, k, unsigned) · s`` (:func:`fake_quantize_activation`).

Every float step is a single IEEE operation (one multiply, no add after it), so no compiler
can contract it into an FMA and results are identical on every target, not only close.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127

__all__ = [
    "activation_code_bits",
    "activation_range",
    "activation_scale",
    "fake_quantize_activation",
    "epilogue",
    "int_conv2d",
    "int_dense",
    "integer_bias",
    "output_scale",
    "quantize_activation",
]


def activation_range(bits: int = 8, unsigned: bool = False) -> tuple[int, int]:
    """(lo, hi) of the activation codes: 8 bits ±127; k < 8 bits unsigned 0..2^k−1, signed
    ±max(2^(k−1)−1, 1) (a signed 1-bit grid would hold only 0, so it is −1..1)."""
    if bits == 8 and not unsigned:
        return -INT8_MAX, INT8_MAX
    if not 1 <= bits <= 7:
        raise ValueError(f"activation bits must be 1..8 (unsigned: 1..7), got {bits}")
    if unsigned:
        return 0, (1 << bits) - 1
    top = max((1 << (bits - 1)) - 1, 1)
    return -top, top


def activation_code_bits(bits: int = 8, unsigned: bool = False) -> int:
    """Bits a kernel needs per activation code (two's complement when signed): the ±1 grid of a
    signed 1-bit activation takes 2."""
    return bits if unsigned else max(bits, 2)


def activation_scale(x: np.ndarray, calibrated: float | None = None, bits: int = 8,
                     unsigned: bool = False) -> np.float32:
    """The scale of a layer input: the calibrated one, else dynamic max|x|/hi (float32)."""
    if calibrated is not None:
        return np.float32(calibrated)
    hi = activation_range(bits, unsigned)[1]
    peak = np.float32(np.abs(np.asarray(x, dtype=np.float32)).max(initial=0.0))
    return np.maximum(peak / np.float32(hi), np.finfo(np.float32).tiny)


def quantize_activation(x: np.ndarray, scale: float, bits: int = 8, unsigned: bool = False) -> np.ndarray:
    """int8 = clip(rint(x · float32(1/scale)), lo, hi) (±127 at 8 bits); rint rounds half to even.

    Multiplying by the reciprocal (not dividing) is what the kernels do; the reciprocal is
    computed once, in float64 then rounded to float32."""
    lo, hi = activation_range(bits, unsigned)
    inv = np.float32(1.0 / float(scale))
    q = np.rint(np.asarray(x, dtype=np.float32) * inv)
    return np.clip(q, lo, hi).astype(np.int8)


def fake_quantize_activation(x: np.ndarray, scale: float, bits: int = 8, unsigned: bool = False) -> np.ndarray:
    """What the float reference graph feeds a k-bit layer: the codes times the scale, float32."""
    return quantize_activation(x, scale, bits, unsigned).astype(np.float32) * np.float32(scale)


def int_dense(x_q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """acc[m, n] = Σ_k x_q[m, k]·codes[n, k] in int32 (codes laid out [out, in], as torch)."""
    return np.asarray(x_q, dtype=np.int32) @ np.asarray(codes, dtype=np.int32).T


def int_conv2d(
    x_q: np.ndarray,
    codes: np.ndarray,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> np.ndarray:
    """NCHW int8 input × OIHW codes → NCHW int32 accumulators (zero padding)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    x = np.pad(np.asarray(x_q, dtype=np.int32), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    w = np.asarray(codes, dtype=np.int32)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"int_conv2d: input has {c} channels, weight {w.shape} with groups={groups}")
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (wd - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow), dtype=np.int32)
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg]
        wg = w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
    return out


def output_scale(alpha: np.ndarray | float, act_scale: float) -> np.ndarray:
    """scale[o] = float32(α[o]·s_x): what one int32 accumulator unit is worth in float."""
    return (np.asarray(alpha, dtype=np.float64) * float(act_scale)).astype(np.float32)


def integer_bias(bias: np.ndarray | None, scale: np.ndarray, channels: int) -> np.ndarray:
    """The float bias in accumulator units, rint(b / scale), as int32 (zeros when no bias)."""
    if bias is None:
        return np.zeros(channels, dtype=np.int32)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (channels,))
    q = np.rint(np.asarray(bias, dtype=np.float64).reshape(channels) / scale)
    return np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)


def epilogue(acc: np.ndarray, bias_q: np.ndarray, scale: np.ndarray, relu: bool = False, axis: int = 1) -> np.ndarray:
    """float32((acc + bias_q) [max 0]) · scale, with bias/scale broadcast along the channel axis."""
    acc = np.asarray(acc, dtype=np.int32)
    shape = [1] * acc.ndim
    shape[axis] = -1
    total = acc + np.asarray(bias_q, dtype=np.int32).reshape(shape)
    if relu:
        total = np.maximum(total, 0)
    return total.astype(np.float32) * np.asarray(scale, dtype=np.float32).reshape(shape)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))
