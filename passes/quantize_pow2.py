"""Power-of-two weight quantization as a graph rewrite: each conv/dense weight parameter W
becomes two parameters, int8 codes q and a float32 scale α, and the graph computes
W = astype(q, "float32") * α in front of the layer.

That product is the reference lowering: with the parameters bound it is constant, so
FoldConstant folds it at compile time and the fp32 kernels run unchanged. A kernel stage
that has integer kernels finds the layers with :func:`find_quantized_layers` (relax.dpl
patterns from :func:`quantized_layer_patterns`) and ``Graph.quant`` (one
:class:`~lastbit.graph.QuantInfo` per weight: code set, bits, α shape, activation scale).

Activation scales (int8, per-tensor, symmetric) are for those future integer kernels: with
calibration data they are the ``activation_percentile`` of |input| of each quantized layer
over up to ``calibration_samples`` samples, measured on the weight-quantized fp32 graph
(the activations the integer kernel will see), divided by 127; without data they are
"dynamic" (None). The reference graph keeps float activations unless
``Squeeze.fake_quant_activations`` asks for int8 quantize→dequantize on each quantized
layer's input (:func:`fake_quant_int8` is its numpy reference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lastbit.codegen.quant_reference import activation_range
from lastbit.graph import Graph, QuantInfo
from lastbit.passes.pow2_projection import CodeSet, QuantizationError, code_set, dequantize, project_pow2

log = logging.getLogger(__name__)

__all__ = [
    "QuantizePow2",
    "QuantizedLayerPattern",
    "WeightedLayer",
    "calibration_inputs",
    "fake_quant_int8",
    "find_quantized_layers",
    "quantized_layer_patterns",
    "weighted_layers",
]

INT8_MAX = 127
PROGRESS_MIN_WEIGHTS = 16_000_000  # about a few seconds of projection
_CALIBRATION_ELEMENTS = 1 << 20  # per layer: |x| values kept for the percentile (a seeded subsample)
# Ops a weight may pass through between its parameter and the layer.
_WEIGHT_VIEWS = ("relax.permute_dims", "relax.reshape")
_LAYER_OPS = {"relax.nn.conv2d": "conv2d", "relax.nn.conv1d": "conv1d", "relax.matmul": "dense"}


# --- the IR patterns later stages match -----------------------------------------------------


@dataclass(frozen=True)
class QuantizedLayerPattern:
    """A relax.dpl pattern for one quantized layer and handles on its parts.

    ``root.extract_matched_expr(expr, var2val)`` maps each handle to the matched expression:
    ``data`` is the layer input (the fake-quant output when activations are fake-quantized),
    ``codes`` / ``alpha`` the parameters (Vars) or, in a bound module, Constants.
    """

    root: Any
    data: Any
    weight: Any
    codes: Any
    alpha: Any


def quantized_layer_patterns() -> dict[str, QuantizedLayerPattern]:
    """Patterns for ``conv2d(x, astype(codes) * alpha)``, its conv1d twin and
    ``matmul(x, permute_dims(astype(codes) * alpha))`` (or without the permute), keyed
    by layer kind ("conv2d", "conv1d", "dense")."""
    from tvm.relax.dpl import is_op, wildcard

    def parts():
        codes = wildcard().has_dtype("int8")
        alpha = wildcard().has_dtype("float32")
        weight = is_op("relax.multiply")(is_op("relax.astype")(codes).has_dtype("float32"), alpha)
        return wildcard(), weight, codes, alpha

    patterns = {}
    for kind, op in (("conv2d", "relax.nn.conv2d"), ("conv1d", "relax.nn.conv1d")):
        data, weight, codes, alpha = parts()
        patterns[kind] = QuantizedLayerPattern(is_op(op)(data, weight), data, weight, codes, alpha)
    data, weight, codes, alpha = parts()
    root = is_op("relax.matmul")(data, is_op("relax.permute_dims")(weight) | weight)
    patterns["dense"] = QuantizedLayerPattern(root, data, weight, codes, alpha)
    return patterns


def find_quantized_layers(func) -> list[tuple[Any, str, dict[str, Any]]]:
    """Every quantized layer of a Relax function: (bound var, kind, {"data", "codes", "alpha",
    "weight": matched expr}), in binding order."""
    from tvm import relax

    patterns = quantized_layer_patterns()
    var2val = relax.analysis.get_var2val(func)
    found = []
    for var, value in var2val.items():
        if not isinstance(value, relax.Call):
            continue
        for kind, pat in patterns.items():
            matched = pat.root.extract_matched_expr(value, var2val)
            if matched is not None:
                parts = {k: matched[getattr(pat, k)] for k in ("data", "codes", "alpha", "weight")}
                found.append((var, kind, parts))
                break
    return found


# --- which layers have parameter weights -----------------------------------------------------


@dataclass(frozen=True)
class WeightedLayer:
    """A conv/dense binding of ``main`` whose weight operand is (a view of) a parameter."""

    var: str  # the Relax var the layer binds
    kind: str  # "conv2d", "conv1d" or "dense"
    weight: str  # the parameter name
    axis: int | None  # output-channel axis of the parameter; None when it cannot be told
    axis_reason: str = ""  # why axis is None
    unsupported: str = ""  # why the layer cannot be quantized at all
    relax_var: Any = field(default=None, repr=False, compare=False)  # the bound relax.Var itself
    call: Any = field(default=None, repr=False, compare=False)  # the conv/matmul relax.Call


def weighted_layers(graph: Graph) -> list[WeightedLayer]:
    """The conv/dense layers of ``main`` whose weight is a parameter, possibly through
    permute_dims/reshape (as the torch and ONNX importers emit for dense layers), in order.

    A quantized layer is found through its decode ``astype(codes) * alpha``; its
    ``weight`` is then the int8 codes parameter (``Graph.quant`` maps it back)."""
    from tvm import relax

    main = graph.mod["main"]
    param_of = graph.param_vars()
    # var -> (parameter, views): views maps an axis of var back to the parameter, None after a reshape
    view_of: dict = {var: (name, list(range(graph.params[name].ndim))) for var, name in param_of.items()}
    codes_params = {info.codes_param for info in graph.quant.values()}
    layers: list[WeightedLayer] = []
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
                continue
            op = value.op.name
            if op in _WEIGHT_VIEWS and value.args[0] in view_of:
                name, axes = view_of[value.args[0]]
                if op == "relax.permute_dims" and axes is not None:
                    order = value.attrs.axes
                    order = list(reversed(range(len(axes)))) if order is None else [int(a) for a in order]
                    axes = [axes[a] for a in order]
                else:
                    axes = None
                view_of[binding.var] = (name, axes)
                continue
            if op in ("relax.astype", "relax.multiply") and value.args[0] in view_of:
                if view_of[value.args[0]][0] in codes_params:  # the decode keeps the codes' axes
                    view_of[binding.var] = view_of[value.args[0]]
                continue
            if op not in _LAYER_OPS or len(value.args) < 2 or value.args[1] not in view_of:
                continue
            name, axes = view_of[value.args[1]]
            kind = _LAYER_OPS[op]
            layers.append(_describe_layer(binding.var, value, kind, name, axes, graph.params[name]))
    return layers


def _describe_layer(var, call, kind: str, name: str, axes: list[int] | None, weight: np.ndarray) -> WeightedLayer:
    def layer(axis: int | None = None, **why) -> WeightedLayer:
        return WeightedLayer(var.name, kind, name, axis, relax_var=var, call=call, **why)

    out_dtype = str(getattr(var.ty, "dtype", ""))
    if weight.dtype != np.float32 or out_dtype != "float32":
        return layer(unsupported=f"{weight.dtype} weight, {out_dtype} output (float32 only)")
    operand_ndim = len(call.args[1].ty.shape)
    if kind == "dense":
        if operand_ndim < 2:
            return layer(unsupported="matmul with a 1-D weight operand")
        operand_axis = operand_ndim - 1  # x @ W: W is [..., K, N], N the output features
    else:
        layout = str(call.attrs.kernel_layout)
        if "O" not in layout:
            return layer(unsupported=f"kernel layout {layout} has no output axis")
        operand_axis = layout.index("O")
    if axes is None:
        return layer(axis_reason="the weight is reshaped before the layer")
    return layer(axes[operand_axis])


# --- numpy references ------------------------------------------------------------------------


def fake_quant_int8(x: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Symmetric int8 quantize→dequantize, as the graph does it: clip(round(x/s), ±127)·s in
    float32, round half to even; scale None is dynamic, max|x|/127."""
    x = np.asarray(x, dtype=np.float32)
    if scale is None:
        s = np.maximum(np.float32(np.abs(x).max()) / np.float32(INT8_MAX), np.finfo(np.float32).tiny)
    else:
        s = np.float32(scale)
    return (np.clip(np.round(x / s), -INT8_MAX, INT8_MAX) * s).astype(np.float32)


def calibration_inputs(data: Any, limit: int) -> np.ndarray | None:
    """Up to ``limit`` input samples from (X, y) arrays, X alone or an iterable of (x, y) batches."""
    if data is None:
        return None

    def as_array(a):
        return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        return as_array(data[0])[:limit]
    if hasattr(data, "shape"):
        return as_array(data)[:limit]
    chunks, seen = [], 0
    for batch in data:
        x = as_array(batch[0] if isinstance(batch, (tuple, list)) else batch)
        chunks.append(x)
        seen += len(x)
        if seen >= limit:
            break
    return np.concatenate(chunks)[:limit] if chunks else None


# --- the pass --------------------------------------------------------------------------------


# Above this share of the weights, keeping the first/last layers at 8 bits defeats the
# low-bit squeeze (a one-layer model, a language-model head): say so.
FIRST_LAST_WARN_SHARE = 0.2


def _warn_if_first_last_dominate(graph: Graph, layers: list, keep: set[str], first_last: str | None,
                                 codes: str) -> None:
    sizes = {layer.weight: int(graph.params[layer.weight].size) for layer in layers}
    total = sum(sizes.values())
    kept = sum(sizes[w] for w in keep)
    if total and kept / total > FIRST_LAST_WARN_SHARE:
        names = ", ".join(sorted(graph.source_names.get(w, w) for w in keep))
        log.warning("%s: the first and last weighted layers (%s) hold %.0f%% of the weights and stay on %s, "
                    "not %s (keep_first_last); Squeeze(keep_first_last=False) (CLI: --no-keep-first-last) "
                    "quantizes them too", graph.name, names, 100 * kept / total, first_last or "float32", codes)


class QuantizePow2:
    """Graph -> Graph: replace each conv/dense weight parameter by int8 codes and an α.

    Weights that are already α·codes (the output of ADMM fine-tuning) are recovered
    exactly (``QuantInfo.exact``); others are projected with ``project_pow2``. With
    ``keep_first_last`` the first and last weighted layers go on ``first_last_codes``
    ("int8", code_set "int8", 8 bits, per output channel) instead, or stay float32. Layers it
    cannot quantize (non-float32, a weight reshaped before a per-channel layer, a kernel
    layout without an output axis) stay float and the reason is logged. A layer that
    ``Squeeze.layers`` names gets its own code set ("fp32": stays float), over the global one
    and ``keep_first_last``; without a global code set, the layers it does not name stay float.
    """

    def __init__(self, squeeze, datafree_state=None):
        self.squeeze = squeeze
        self.codes = squeeze.code_set if squeeze.global_quantizes else None
        self.layer_choices = squeeze.layers
        # passes/datafree.py: per-layer code sets (depthwise int8) and ZeroQ calibration inputs
        self.datafree_state = datafree_state

    def __call__(self, graph: Graph) -> Graph:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weight -> (codes, alpha)
        self._layers: dict[str, list] = {}  # weight -> the relax Vars of the layers using it
        plan = self._plan(graph)
        if not plan:
            log.warning("%s: no layer to quantize; the graph stays float", graph.name)
            return graph
        grids = self._activation_grids(graph, plan)
        for weight, (bits, unsigned) in grids.items():
            plan[weight] = replace(plan[weight], act_bits=bits, act_unsigned=unsigned)
        scales, how = self._activation_scales(graph, plan)
        fake_quant = self.squeeze.fake_quant_activations
        for weight, info in plan.items():
            plan[weight] = replace(info, activation_scale=scales.get(weight), activation_calibration=how,
                                   fake_quant_activations=fake_quant or info.act_bits < 8)
        layer_scales = {}
        for w, info in plan.items():
            if info.act_bits < 8:  # the reference path sees the k-bit grid the integer kernels see
                lo, hi = activation_range(info.act_bits, info.act_unsigned)
                layer_scales.update({var: KbitFakeQuant(scales.get(w), lo, hi) for var in self._layers[w]})
            elif fake_quant:
                layer_scales.update({var: scales.get(w) for var in self._layers[w]})
        quantized, _ = self._rewrite(graph, plan, fake_quant=layer_scales)
        return quantized.replace(quant={**graph.quant, **plan})

    # -- planning: which weights, which axis, their codes ------------------------------------
    def _plan(self, graph: Graph) -> dict[str, QuantInfo]:
        layers = weighted_layers(graph)
        keep: set[str] = set()
        first_last = self.squeeze.first_last_codes
        if self.squeeze.keep_first_last and layers:
            keep = {layers[0].weight, layers[-1].weight}
            log.info("keeping first/last weighted layers %s: %s", first_last or "float32", sorted(keep))
            # with only per-layer code sets the named layers decide; on int8 already, nothing to say
            if self.codes is not None and self.codes.name != first_last:
                _warn_if_first_last_dominate(graph, layers, keep, first_last, self.codes.name)
        self._kept = keep
        by_weight: dict[str, list[WeightedLayer]] = {}
        for layer in layers:
            by_weight.setdefault(layer.weight, []).append(layer)
        self._layers = {w: [layer.relax_var for layer in ls] for w, ls in by_weight.items()}
        plan: dict[str, QuantInfo] = {}
        total = sum(graph.params[w].size for w in by_weight)
        with _progress(total) as bar:
            for weight, uses in by_weight.items():
                choice = self._layer_choice(graph, weight)
                if choice is not None:
                    if choice.codes == "fp32":
                        bar.update(graph.params[weight].size)
                        continue
                    cs = code_set(choice.codes)
                    per_channel = self.squeeze.per_channel and all(u.axis is not None for u in uses)
                elif self.codes is None or (weight in keep and first_last is None):
                    bar.update(graph.params[weight].size)
                    continue
                elif weight in keep:
                    # the kept layers go on their own (int8) grid, per output channel where it can be told
                    cs, per_channel = code_set(first_last), all(u.axis is not None for u in uses)
                else:
                    cs, per_channel = self.codes, self.squeeze.per_channel
                chosen = (self.datafree_state.layer_codes.get(graph.source_names.get(weight, weight))
                          if self.datafree_state and choice is None else None)
                if chosen is not None and chosen != cs.name:
                    cs, per_channel = code_set(chosen), per_channel or chosen == "int8"
                reason = self._skip_reason(uses, per_channel)
                if reason:
                    log.info("not quantizing %s (%s): %s", weight, graph.source_names.get(weight, weight), reason)
                    bar.update(graph.params[weight].size)
                    continue
                plan[weight] = self._quantize_weight(graph, weight, uses, cs, per_channel, bar.update)
        return plan

    def _layer_choice(self, graph: Graph, weight: str):
        """The per-layer choice (``Squeeze.layers``) for the layer of ``weight``, or None."""
        if self.layer_choices is None:
            return None
        from lastbit.passes.flops import layer_key

        return self.layer_choices.get(layer_key(graph, weight))

    def _skip_reason(self, uses: list[WeightedLayer], per_channel: bool) -> str:
        for layer in uses:
            if layer.unsupported:
                return f"layer {layer.var}: {layer.unsupported}"
        if per_channel:
            axes = {layer.axis for layer in uses}
            if None in axes:
                return next(f"layer {u.var}: per-channel α impossible, {u.axis_reason}" for u in uses if u.axis is None)
            if len(axes) > 1:
                return f"shared by layers with different output axes {sorted(axes)}"
        return ""

    def _quantize_weight(self, graph: Graph, weight: str, uses: list[WeightedLayer], cs: CodeSet,
                         per_channel: bool, progress=None) -> QuantInfo:
        w = graph.params[weight]
        if w.size == 0:
            raise QuantizationError(f"layer {uses[0].var}: weight {weight!r} is empty (shape {w.shape})")
        axis = uses[0].axis if per_channel else None
        try:
            q, alpha = project_pow2(w, cs, axis=axis, progress=progress)
        except QuantizationError as err:
            raise QuantizationError(f"layer {uses[0].var}, weight {weight!r}: {err}") from err
        exact = bool(np.array_equal(dequantize(q, alpha), w))
        self._arrays[weight] = (q, alpha)
        return QuantInfo(
            weight=weight,
            source_name=graph.source_names.get(weight, weight),
            codes_param=f"{weight}.codes",
            alpha_param=f"{weight}.alpha",
            code_set=cs.name,
            bits=cs.bits,
            per_channel=axis is not None,
            axis=axis,
            alpha_shape=tuple(alpha.shape),
            op=uses[0].kind,
            exact=exact,
        )

    def _activation_grids(self, graph: Graph, plan: dict[str, QuantInfo]) -> dict[str, tuple[int, bool]]:
        """Weight -> (act bits, unsigned) for the layers ``Squeeze.act_bits`` < 8 narrows: every
        low-bit layer (not the kept first/last ones); unsigned when each layer using the weight
        takes a ReLU output (through pooling and reshapes), which holds for every input."""
        bits = self.squeeze.act_bits
        if bits >= 8:
            return {}
        from tvm import relax

        var2val = relax.analysis.get_var2val(graph.mod["main"])
        grids = {}
        for weight in plan:
            if weight in self._kept:
                continue
            unsigned = all(_nonnegative(var2val[var].args[0], var2val) for var in self._layers[weight])
            if not unsigned and bits == 1:
                log.info("%s: input may be negative, so 1-bit activations use the signed grid -1..1", weight)
            grids[weight] = (bits, unsigned)
        return grids

    # -- the rewrite --------------------------------------------------------------------------
    def _rewrite(self, graph: Graph, plan: dict[str, QuantInfo], fake_quant: dict | None = None,
                 taps: dict | None = None) -> tuple[Graph, list[str]]:
        """The graph with ``plan``'s weights replaced; ``fake_quant`` maps layer Vars to their
        activation scale (None: dynamic). With ``taps`` (layer Var -> weight) ``main`` instead
        returns the inputs of those layers, and the weights they belong to come back too."""
        from tvm import relax

        main = graph.mod["main"]
        n_in = len(graph.inputs)
        var_of = {name: var for var, name in graph.param_vars().items()}
        new_params = list(main.params[:n_in])
        params: dict[str, np.ndarray] = {}
        source_names = {k: v for k, v in graph.source_names.items() if k not in plan}
        dequant: dict = {}  # old weight Var -> (codes Var, alpha Var)
        for name, value in graph.params.items():
            if name not in plan:
                new_params.append(var_of[name])
                params[name] = value
                continue
            info = plan[name]
            q, alpha = self._arrays[name]
            codes_var = relax.Var(info.codes_param, relax.TensorType(q.shape, "int8"))
            alpha_var = relax.Var(info.alpha_param, relax.TensorType(alpha.shape, "float32"))
            new_params += [codes_var, alpha_var]
            params[info.codes_param], params[info.alpha_param] = q, alpha
            source_names[info.codes_param] = f"{info.source_name}.codes"
            source_names[info.alpha_param] = f"{info.source_name}.alpha"
            dequant[var_of[name]] = (codes_var, alpha_var)
        rewriter = _dequant_rewriter()(graph.mod, dequant, fake_quant or {}, taps or {})
        body = rewriter.visit_expr(main).body
        ret_ty = main.ret_ty
        if taps:
            ret_ty = relax.TupleType([v.ty for v in rewriter.tapped])
            body = relax.BlockBuilder().normalize(relax.SeqExpr(body.blocks, relax.Tuple(rewriter.tapped)))
        func = relax.Function(new_params, body, ret_ty, main.is_pure, main.attrs)
        mod = _with_main(graph.mod, func)
        relax.analysis.well_formed(mod)
        return graph.replace(mod=mod, params=params, source_names=source_names), rewriter.tap_owner

    # -- activation scales --------------------------------------------------------------------
    def _activation_scales(self, graph: Graph, plan: dict[str, QuantInfo]) -> tuple[dict[str, float], str]:
        """Per weight, the int8 scale of its layer's input (pooled over all layers sharing the
        weight), rounded to float32 so the graph constant and QuantInfo agree exactly."""
        sq = self.squeeze
        x = calibration_inputs(sq.data, sq.calibration_samples)
        if x is None and self.datafree_state is not None and self.datafree_state.calibration is not None:
            x = self.datafree_state.calibration[:sq.calibration_samples]  # ZeroQ synthetic inputs
        if x is None:
            return {}, "dynamic"
        if len(graph.inputs) != 1:
            log.warning("calibration supports single-input models; %s has %d inputs, scales stay dynamic",
                        graph.name, len(graph.inputs))
            return {}, "dynamic"
        spec = graph.inputs[0]
        batch = spec.shape[0]
        if tuple(x.shape[1:]) != tuple(spec.shape[1:]):
            raise QuantizationError(
                f"calibration samples have shape {tuple(x.shape[1:])}, the model input '{spec.name}' takes {spec.shape[1:]}"
            )
        usable = (len(x) // batch) * batch
        if usable == 0:
            raise QuantizationError(f"{len(x)} calibration samples are fewer than the model's batch size {batch}")
        taps = {var: w for w in plan for var in self._layers[w]}
        tapped, owners = self._rewrite(graph, plan, taps=taps)
        samples = _layer_inputs(tapped, owners, x[:usable].astype(spec.dtype), batch)
        scales = {}
        for weight, values in samples.items():
            bound = float(np.percentile(values, sq.activation_percentile)) if values.size else 0.0
            hi = activation_range(plan[weight].act_bits, plan[weight].act_unsigned)[1]
            scales[weight] = float(np.float32(bound / hi)) if bound > 0 else 1.0  # all-zero input: any s works
        return scales, f"percentile-{sq.activation_percentile:g} of {usable} samples"


def _progress(weights: int):
    """A progress bar over the weights to project, shown only when there are enough of them to
    take more than a few seconds (`PROGRESS_MIN_WEIGHTS`): quiet for small models and tests."""
    from tqdm.auto import tqdm

    return tqdm(total=weights, desc="quantize", unit="weight", unit_scale=True, leave=False,
                disable=weights < PROGRESS_MIN_WEIGHTS)


def _with_main(mod, func):
    import tvm

    functions = {gv: f for gv, f in mod.functions_items()}
    main_gv = mod.get_global_var("main")
    functions[main_gv] = func
    return tvm.IRModule(functions, attrs=mod.attrs)


def _dequant_rewriter():
    """The mutator class (built lazily: tvm is imported on first use, 3 s)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class DequantRewriter(PyExprMutator):
        """Emits ``w = astype(codes) * alpha`` just before the first binding that uses each
        quantized weight parameter, and optionally fake-quantizes the input of given layers.
        Every binding is visited once, so nothing can loop. With taps, each tapped layer's
        input is also bound as a dataflow output (``tapped``, owners in ``tap_owner``)."""

        def __init__(self, mod, dequant: dict, fake_quant: dict, taps: dict):
            super().__init__(mod)
            self.dequant = dequant
            self.fake_quant = fake_quant
            self.taps = taps
            self.tapped: list = []
            self.tap_owner: list[str] = []

        def visit_var_binding_(self, binding):
            for var in relax.analysis.free_vars(binding.value):
                if var in self.dequant:
                    codes, alpha = self.dequant.pop(var)
                    w = relax.op.multiply(relax.op.astype(codes, "float32"), alpha)
                    self.set_var_remap(var, self.builder_.emit(w, var.name))
            if binding.var in self.taps:
                self.tapped.append(self.builder_.emit_output(self.visit_expr(binding.value.args[0])))
                self.tap_owner.append(self.taps[binding.var])
            if binding.var in self.fake_quant:
                call = self.visit_expr(binding.value)
                data = self.builder_.emit(_fake_quant_expr(call.args[0], self.fake_quant[binding.var]),
                                          binding.var.name + "_input_fq")
                new_call = relax.Call(call.op, [data, *call.args[1:]], call.attrs, call.ty_args)
                if isinstance(binding.var, relax.DataflowVar):
                    new = self.builder_.emit(new_call, binding.var.name)
                else:
                    new = self.builder_.emit_output(new_call, binding.var.name)
                self.set_var_remap(binding.var, new)
                return
            super().visit_var_binding_(binding)

    return DequantRewriter


@dataclass(frozen=True)
class KbitFakeQuant:
    """A k-bit activation fake-quant for the rewriter: scale (None: dynamic) and the code grid."""

    scale: float | None
    lo: int
    hi: int


# Ops through which a ReLU output stays non-negative.
_SIGN_PRESERVING = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d",
                    "relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze", "relax.expand_dims")


def _nonnegative(expr, var2val) -> bool:
    """Whether ``expr`` is a ReLU output, possibly through pooling and reshapes."""
    from tvm import relax

    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
        name = str(expr.op.name) if isinstance(expr, relax.Call) and hasattr(expr.op, "name") else ""
        if name == "relax.nn.relu":
            return True
        if name not in _SIGN_PRESERVING:
            return False
        expr = expr.args[0]
    return False


def kbit_fake_quant_source(expr, var2val):
    """The input x of a k-bit fake-quant ``(clip(round(x · inv), lo, hi)) · s`` bound to
    ``expr`` (a Var), or None: the integer lowering quantizes x itself, to the same codes."""
    from tvm import relax

    def call(e, op):
        e = var2val.get(e, e) if isinstance(e, relax.Var) else e
        ok = isinstance(e, relax.Call) and hasattr(e.op, "name") and str(e.op.name) == op
        return e if ok else None

    node = expr
    for op in ("relax.multiply", "relax.clip", "relax.round", "relax.multiply"):
        node = call(node, op)
        if node is None:
            return None
        node = node.args[0]
    return node


def _kbit_fake_quant_expr(x, fq: KbitFakeQuant):
    """``quant_reference.fake_quantize_activation`` in Relax: the same IEEE steps as the integer
    lowering (a float32 reciprocal from float64; dynamic s = max(max|x| / hi, tiny))."""
    from tvm import relax

    op = relax.op
    if fq.scale is None:
        peak = op.max(op.abs(x))
        s = op.maximum(op.divide(peak, relax.const(np.float32(fq.hi), "float32")),
                       relax.const(np.finfo(np.float32).tiny, "float32"))
        inv = op.astype(op.divide(relax.const(1.0, "float64"), op.astype(s, "float64")), "float32")
    else:
        s = relax.const(np.float32(fq.scale), "float32")
        inv = relax.const(np.float32(1.0 / float(np.float32(fq.scale))), "float32")
    return op.multiply(op.clip(op.round(op.multiply(x, inv)), fq.lo, fq.hi), s)


def _fake_quant_expr(x, scale):
    if isinstance(scale, KbitFakeQuant):
        return _kbit_fake_quant_expr(x, scale)
    return _int8_fake_quant_expr(x, scale)


def _int8_fake_quant_expr(x, scale: float | None):
    """clip(round(x / s), -127, 127) * s; s = max(max|x| / 127, tiny) when scale is None (dynamic)."""
    from tvm import relax

    op = relax.op
    if scale is None:
        s = op.maximum(op.divide(op.max(op.abs(x)), relax.const(float(INT8_MAX), "float32")),
                       relax.const(float(np.finfo(np.float32).tiny), "float32"))
    else:
        s = relax.const(np.float32(scale), "float32")
    return op.multiply(op.clip(op.round(op.divide(x, s)), -INT8_MAX, INT8_MAX), s)


def _layer_inputs(tapped: Graph, owners: list[str], x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """|input| values of the tapped layers, per weight, over x: the weight-quantized fp32 graph
    (``main`` returning the layer inputs) compiled for the host like any model (scheduled
    kernels, not naive loops) and run batch by batch in a Relax VM."""
    import tvm
    from tvm import relax

    from lastbit.pipeline import build_vm, lower_and_schedule
    from lastbit.targets import get_target

    host = get_target("x86_64-linux-gnu")
    vm = relax.VirtualMachine(build_vm(lower_and_schedule(tapped, host), host), tvm.cpu())
    collected: dict[str, list[np.ndarray]] = {w: [] for w in owners}
    for start in range(0, len(x), batch):
        outputs = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[start:start + batch])))
        for weight, out in zip(owners, outputs):
            collected[weight].append(np.abs(out.numpy()).reshape(-1))
    rng = np.random.default_rng(0)
    result = {}
    for weight, chunks in collected.items():
        values = np.concatenate(chunks)
        if values.size > _CALIBRATION_ELEMENTS:  # keep the max: the 100th percentile stays exact
            keep = rng.choice(values.size, _CALIBRATION_ELEMENTS, replace=False)
            values = np.append(values[keep], values.max())
        result[weight] = values
    return result
