"""Integer kernels for quantized layers, one module per kernel family, and the registry the
lowering picks from.

Every kernel computes exactly the accumulators of ``lastbit.codegen.quant_reference``:
int8 activations × weight codes → int32, nothing else (quantizing the input and the float
epilogue are separate Relax ops that fusion may merge). A kernel declares which layers it can
serve; a target's strategy (``Target.kernels``) orders the candidates and the lowering takes
the first that supports the layer.

Calling convention of ``IntKernel.prim_func(layer)`` (argument order of the PrimFunc):
    dense:  x_q int8 [M, K], *packed weights, acc int32 [M, N]
    conv2d: x_q int8 [N, C, H, W], *packed weights, acc int32 [N, O, OH, OW]
``pack(layer, codes)`` turns the int8 codes ([N, K] for dense, OIHW for conv2d, as torch lays
them out) into those packed arrays at compile time.

A kernel may also offer ``fused_prim_func(layer, io)``: the same accumulation with the layer's
activation quantize and float epilogue done inside it (:class:`FusedIO`), so the whole layer
is one PrimFunc whose schedule (and tuning space) covers all of it:
    conv2d: x float32 [N, C, H, W], inv float32 (), *packed weights, bias_q int32 [O],
            scale float32 [O], y float32 [N, O, OH, OW]
It must give exactly ``quant_reference.epilogue(kernel(quantize_activation(x)), ...)``.
``fuses(layer)``, when given, says which layers the lowering builds in the fused form (the
others keep three functions: where the fused form would count more instructions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lastbit.errors import LastbitError


class KernelError(LastbitError):
    """A kernel cannot serve a layer, or no kernel is registered under a name."""


@dataclass(frozen=True)
class IntLayer:
    """What a kernel needs to know about one quantized layer (static shapes only)."""

    op: str  # "dense" or "conv2d"
    code_set: str  # "pow2-4", "ternary", "binary", "int8", …
    bits: int  # storage width of one weight code
    data_shape: tuple[int, ...]  # dense [M, K]; conv2d NCHW
    weight_shape: tuple[int, ...]  # dense [N, K]; conv2d OIHW
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    act_bits: int = 8  # activation codes are known to fit this many bits (bitserial planes)
    act_unsigned: bool = False  # ... as unsigned 0..2^act_bits−1 (after a ReLU), else two's complement


@dataclass(frozen=True)
class FusedIO:
    """What a fused kernel does around the accumulation: quantize its float input to codes in
    ``[act_lo, act_hi]`` (``quant_reference.quantize_activation``; ``input_relu``: of
    ``max(x, 0)``, the ReLU before the layer folded in) and turn the accumulators into
    ``float32((acc + bias_q) [max 0]) · scale`` (``quant_reference.epilogue``; ``output_relu``:
    with the max). The reciprocal scale, bias and scale are runtime arguments, so one
    function serves calibrated and dynamic activation scales alike."""

    act_lo: int
    act_hi: int
    input_relu: bool = False
    output_relu: bool = False


@dataclass(frozen=True)
class IntKernel:
    """One kernel family: its name (shown in the report), what it serves, and its code.

    ``supports(layer, features)`` returns None when it can serve the layer on a target with
    those features, else the reason it cannot (the report and logs show it).
    ``schedule(sch, layer, features)`` applies the default schedule to a tvm.s_tir.Schedule of
    ``prim_func(layer)``; ``tuning_space(layer, features)`` returns a function ``fn(sch)`` that
    samples the same knobs (sample_perfect_tile / sample_categorical) for MetaSchedule.
    """

    name: str
    supports: Callable[[IntLayer, frozenset[str]], "str | None"]
    pack: Callable[[IntLayer, np.ndarray], list[np.ndarray]]
    prim_func: Callable[[IntLayer], object]
    schedule: Callable[[object, IntLayer, frozenset[str]], None]
    tuning_space: Callable[[IntLayer, frozenset[str]], Callable] | None = None
    description: str = ""
    # the layer's quantize and epilogue inside the kernel (FusedIO); schedule and
    # tuning_space apply to it unchanged
    fused_prim_func: Callable[[IntLayer, FusedIO], object] | None = None
    # the layers the fused form serves (None: every conv2d); the others keep three functions
    fuses: Callable[[IntLayer], bool] | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


_KERNELS: dict[str, IntKernel] = {}


def register_kernel(kernel: IntKernel) -> IntKernel:
    if kernel.name in _KERNELS and _KERNELS[kernel.name] is not kernel:
        raise KernelError(f"kernel '{kernel.name}' is registered twice")
    _KERNELS[kernel.name] = kernel
    return kernel


def get_kernel(name: str) -> IntKernel:
    _load_all()
    try:
        return _KERNELS[name]
    except KeyError:
        raise KernelError(f"unknown kernel '{name}'; known: {', '.join(sorted(_KERNELS))}") from None


def list_kernels() -> list[IntKernel]:
    _load_all()
    return [_KERNELS[k] for k in sorted(_KERNELS)]


def _load_all() -> None:
    """Import every module of this package once, so each registers its kernels."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
