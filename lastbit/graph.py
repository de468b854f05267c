"""The Graph every lastbit pass takes and returns: a Relax IRModule plus its named parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class QuantInfo:
    """How one weight of a Graph is quantized, so later stages can pick integer kernels.

    The Relax graph computes the weight as ``astype(codes, "float32") * alpha`` from the two
    parameters named here (``passes/quantize_pow2.py`` writes this, and its
    ``quantized_layer_patterns()`` match the ops that consume it).
    """

    weight: str  # the Relax parameter the codes replaced ("p_conv2_weight")
    source_name: str  # its name in the source model ("conv2.weight")
    codes_param: str  # int8 code values, the weight's shape ("p_conv2_weight.codes")
    alpha_param: str  # float32 scale, shape () or per output channel ("p_conv2_weight.alpha")
    code_set: str  # "pow2-4", "ternary", …
    bits: int  # storage width of one code once packed
    per_channel: bool
    axis: int | None  # output-channel axis of the weight that alpha varies along; None per-tensor
    alpha_shape: tuple[int, ...]
    op: str  # "conv2d" or "dense"
    exact: bool  # the weight was already α·codes (after ADMM), so nothing was rounded here
    activation_scale: float | None = None  # int8 symmetric scale of the layer input; None = dynamic
    activation_calibration: str = "dynamic"  # how the scale was found, e.g. "percentile-99.99 of 256 samples"
    fake_quant_activations: bool = False  # the graph quantize->dequantizes the layer input
    act_bits: int = 8  # activation grid (Squeeze.act_bits); < 8: the graph fake-quantizes the input to it
    act_unsigned: bool = False  # the input is a ReLU output: grid 0..2^act_bits−1, not ±(2^(act_bits−1)−1)


@dataclass
class Graph:
    """A model in lastbit's IR.

    ``mod["main"]`` takes the model inputs first (``num_input`` of them) and then one
    Relax parameter per entry of ``params``, in the same order.  ``source_names`` maps a
    Relax parameter name back to the name it has in the source model (``conv1.weight`` in
    torch, the initializer name in ONNX): the data-dependent passes train the source
    module and write weights back through it.
    """

    mod: "tvm.IRModule"  # noqa: F821 - tvm is imported lazily (3 s, 400 MB)
    params: dict[str, np.ndarray]
    inputs: list[TensorSpec]
    source_names: dict[str, str] = field(default_factory=dict)
    source: str = "relax"
    name: str = "model"
    # Quantized weights, keyed by the weight parameter they replaced (see QuantInfo).
    quant: dict[str, QuantInfo] = field(default_factory=dict)
    # FLOPs of each conv/dense layer (by source name) before a structural pass (pruning,
    # low-rank) changed it, so the report can show before/after; empty when none ran.
    layer_flops_before: dict[str, int] = field(default_factory=dict)
    # Lines a squeeze pass leaves for the report (e.g. what data-free calibration ran on).
    notes: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    @property
    def param_bytes(self) -> int:
        return int(sum(p.nbytes for p in self.params.values()))

    def replace(self, **changes) -> "Graph":
        """A copy with some fields replaced (passes return new graphs, never mutate)."""
        return dataclasses.replace(self, **changes)

    def bound_module(self) -> "tvm.IRModule":  # noqa: F821
        """The module with every parameter bound as a constant (``main`` takes only inputs)."""
        import tvm
        from tvm import relax

        bindings = {var: tvm.runtime.tensor(np.ascontiguousarray(self.params[name]))
                    for var, name in self.param_vars().items()}
        return relax.transform.BindParams("main", bindings)(self.mod)

    def param_vars(self) -> dict:
        """``main``'s parameter vars (after the inputs) -> the ``params`` key each stands for.
        By name, never by position: a weight bound to the wrong tensor fails far away (a conv
        "weight" of ndim 1) or, worse, not at all."""
        from lastbit.errors import ModelFormatError

        param_vars = self.mod["main"].params[len(self.inputs):]
        names = [var.name for var in param_vars]
        if sorted(names) != sorted(self.params) or len(set(names)) != len(names):
            raise ModelFormatError(f"{self.name}: the graph's parameters {names[:8]} do not match its "
                                   f"weights {list(self.params)[:8]}")
        return {var: var.name for var in param_vars}
