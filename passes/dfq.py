"""Data-free quantization math (Nagel et al., DFQ, ICCV 2019) on a torch.fx trace of a model:
BatchNorm folding, cross-layer equalization and bias correction, plus the power-of-two
projection of a traced model with a per-layer int8 fallback for depthwise convs.

Plain torch functions, no TVM: ``passes/datafree.py`` chains them into the data-free squeeze
step and ``benchmarks/datafree_accuracy.py`` measures each one.

ReLU6 and equalization. DFQ rescales output channel i of a conv by 1/s_i and the matching
input channel of the next conv by s_i, which leaves the function unchanged through ReLU
(positively homogeneous) but not through ReLU6: relu6(x/s) ≠ relu6(x)/s when x > 6. DFQ
replaces ReLU6 by ReLU (a small change of function). Here the activation becomes a
:class:`ChannelClamp`, min(relu(x), u_i) with u_i = 6/s_i per channel, which is the same
function exactly (min(max(x/s, 0), 6/s) = relu6(x)/s) and lowers to relu + minimum with a
constant; the equalized model equals the fp32 one up to float rounding.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from lastbit.passes.pow2_projection import CodeSet, QuantizationError, code_set, project_pow2

log = logging.getLogger(__name__)

__all__ = [
    "ChannelClamp",
    "DataFreeProjection",
    "bias_correct",
    "cross_layer_equalize",
    "equalization_pairs",
    "fold_batch_norms",
    "gptq_codes",
    "is_depthwise",
    "project_traced",
    "trace_layers",
]

WEIGHTED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class ChannelClamp(nn.Module):
    """min(relu(x), upper[c]) per channel c (axis 1): ReLU6 after cross-layer equalization."""

    def __init__(self, upper: torch.Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.minimum(torch.relu(x), self.upper.view(shape))


LEAF_TYPES = (*WEIGHTED_TYPES, *BN_TYPES, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, ChannelClamp)


class _LeafTracer(fx.Tracer):
    """Keeps convs (also subclasses such as "same"-padding convs), linears, BN and activations
    as call_module nodes, so the rewrites below see layers, not functional calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, qualname)


def trace_layers(model: nn.Module) -> fx.GraphModule:
    """A deep copy of ``model`` (eval mode) as an fx.GraphModule whose nodes are its layers."""
    model = copy.deepcopy(model).eval()
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # fx raises many types for data-dependent control flow
        raise QuantizationError(f"data-free DFQ needs a torch.fx-traceable model; tracing "
                                f"{type(model).__name__} failed: {err}") from err
    gm = fx.GraphModule(model, graph, type(model).__name__)
    return gm.eval()


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_depthwise(m: nn.Module) -> bool:
    """A grouped conv with one filter per input channel."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _unshare(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    """The node's module, copied under a fresh name if other nodes call it too (a shared ReLU6
    used twice per block must get two per-channel bounds)."""
    m = gm.get_submodule(node.target)
    callers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]
    if len(callers) > 1:
        new_name = f"{node.target.replace('.', '_')}_{node.name}"
        m = copy.deepcopy(m)
        gm.add_submodule(new_name, m)
        node.target = new_name
    return m


# --- BatchNorm folding ------------------------------------------------------------------------


@torch.no_grad()
def fold_batch_norms(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm that directly follows a conv/linear (its only user) into that
    layer's weight and bias, in place; returns how many were folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, BN_TYPES) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        layer = _module(gm, prev)
        if not isinstance(layer, WEIGHTED_TYPES) or len(prev.users) != 1 or bn.running_mean is None:
            continue
        layer = _unshare(gm, prev)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        w = layer.weight
        w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))
        old_bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.bias = nn.Parameter((old_bias - bn.running_mean) * scale + shift)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


# --- cross-layer equalization -----------------------------------------------------------------


@dataclass
class EqualizationPair:
    """conv1 → (activation) → conv2, where every output channel of conv1 feeds only conv2."""

    first: fx.Node
    activation: fx.Node | None
    second: fx.Node


def equalization_pairs(gm: fx.GraphModule) -> list[EqualizationPair]:
    """Consecutive conv pairs (BN already folded) that cross-layer equalization can rescale:
    conv1's output reaches only conv2, through nothing or one ReLU / ReLU6 / ChannelClamp;
    conv2 is dense (groups 1) or depthwise."""
    pairs = []
    for node in gm.graph.nodes:
        first = _module(gm, node)
        if not isinstance(first, (nn.Conv1d, nn.Conv2d)) or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        act = None
        if isinstance(_module(gm, nxt), (nn.ReLU, nn.ReLU6, ChannelClamp)):
            if len(nxt.users) != 1:
                continue
            act, nxt = nxt, next(iter(nxt.users))
        second = _module(gm, nxt)
        if not isinstance(second, (nn.Conv1d, nn.Conv2d)) or nxt.args[0] is not (act or node):
            continue
        if second.groups != 1 and not is_depthwise(second):
            continue
        if second.in_channels != first.out_channels:
            continue
        pairs.append(EqualizationPair(node, act, nxt))
    return pairs


def _in_channel_range(conv: nn.Module) -> torch.Tensor:
    w = conv.weight.detach()
    if is_depthwise(conv):
        return w.abs().flatten(1).amax(1)
    return w.abs().transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def cross_layer_equalize(gm: fx.GraphModule, iterations: int = 4, eps: float = 1e-8) -> int:
    """DFQ cross-layer equalization, in place, BN folded first (``fold_batch_norms``): for each
    pair, scale conv1's output channel i by 1/s_i and conv2's input channel i by s_i with
    s_i = sqrt(r1_i / r2_i) (r: that channel's max |w|), so both ranges become sqrt(r1·r2).
    ReLU6 between them becomes a ChannelClamp (see the module docstring); ``iterations``
    sweeps over all pairs let chains (1×1 → depthwise → 1×1) settle. Returns the number of pairs."""
    pairs = equalization_pairs(gm)
    for pair in pairs:
        if pair.activation is not None and isinstance(_module(gm, pair.activation), (nn.ReLU6, ChannelClamp)):
            old = _module(gm, pair.activation)
            channels = _module(gm, pair.first).out_channels
            upper = old.upper if isinstance(old, ChannelClamp) else torch.full((channels,), 6.0, device=_module(gm, pair.first).weight.device)
            name = f"{pair.activation.name}_clamp"  # node names are unique; the module may be shared
            gm.add_submodule(name, ChannelClamp(upper))
            pair.activation.target = name
    for _ in range(iterations):
        for pair in pairs:
            conv1, conv2 = _module(gm, pair.first), _module(gm, pair.second)
            r1 = conv1.weight.abs().flatten(1).amax(1)
            r2 = _in_channel_range(conv2)
            s = torch.where((r1 > eps) & (r2 > eps), torch.sqrt(r1 / r2.clamp_min(eps)), torch.ones_like(r1))
            conv1.weight.div_(s.view(-1, *([1] * (conv1.weight.dim() - 1))))
            if conv1.bias is not None:
                conv1.bias.div_(s)
            if is_depthwise(conv2):
                conv2.weight.mul_(s.view(-1, *([1] * (conv2.weight.dim() - 1))))
            else:
                conv2.weight.mul_(s.view(1, -1, *([1] * (conv2.weight.dim() - 2))))
            if pair.activation is not None:
                act = _module(gm, pair.activation)
                if isinstance(act, ChannelClamp):
                    act.upper.div_(s)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return len(pairs)


# --- projection of a traced model -------------------------------------------------------------


@dataclass
class DataFreeProjection:
    """Which code set each weighted layer got, and why a depthwise layer went to int8."""

    codes: dict[str, str] = field(default_factory=dict)  # module name -> code set name
    relative_error: dict[str, float] = field(default_factory=dict)  # ‖W − α·q‖² / ‖W‖² at the low-bit set
    depthwise_int8: list[str] = field(default_factory=list)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # name -> (q, α)
    reference: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # name -> W before projection

    @property
    def weights(self) -> list[str]:
        return list(self.codes)


def _weighted_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, nn.Module]]:
    return [(n, _module(gm, n)) for n in gm.graph.nodes if isinstance(_module(gm, n), WEIGHTED_TYPES)]


@torch.no_grad()
def project_traced(
    gm: fx.GraphModule,
    codes: str | int | CodeSet,
    per_channel: bool = True,
    keep_first_last: str | None = "int8",
    depthwise_int8_error: float | None = None,
    keep_float: bool = False,
) -> DataFreeProjection:
    """Set every conv/linear weight of ``gm`` (in place) to α·q on ``codes`` (one α per output
    channel when ``per_channel``). The first and last weighted layers in dataflow order go on
    ``keep_first_last`` ("int8"; None: on ``codes`` too). A depthwise conv whose relative
    projection error ‖W − α·q‖²/‖W‖² exceeds ``depthwise_int8_error`` goes on int8 instead
    (None: never; 0: always), the rule that keeps only the depthwise layers that would lose most.
    ``keep_float``: the first and last layers stay float32 instead (not in the report)."""
    cs = code_set(codes)
    layers = _weighted_nodes(gm)
    kept = {layers[0][0].target, layers[-1][0].target} if (keep_first_last or keep_float) and layers else set()
    report = DataFreeProjection()
    for node, layer in layers:
        if keep_float and node.target in kept:
            continue
        w = layer.weight.detach().cpu().numpy()
        if node.target in kept:
            target_cs, axis = code_set(keep_first_last), 0
        else:
            target_cs, axis = cs, (0 if per_channel else None)
        q, alpha = project_pow2(w, target_cs, axis=axis)
        err = float(np.sum((w.astype(np.float64) - alpha.astype(np.float64) * q) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30))
        if node.target not in kept:
            report.relative_error[node.target] = err
            if depthwise_int8_error is not None and is_depthwise(layer) and err > depthwise_int8_error:
                target_cs = code_set("int8")
                q, alpha = project_pow2(w, target_cs, axis=0)
                report.depthwise_int8.append(node.target)
        report.codes[node.target] = target_cs.name
        report.arrays[node.target] = (q, alpha)
        report.reference[node.target] = layer.weight.detach().clone()
        layer.weight.copy_(torch.from_numpy(alpha) * torch.from_numpy(q.astype(np.float32)))
    return report


# --- bias correction --------------------------------------------------------------------------


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values whose last reader it is (so they can be freed after it runs)."""
    seen: set[fx.Node] = set()
    frees: dict[fx.Node, list[fx.Node]] = {}
    for node in reversed(graph.nodes):
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frees.setdefault(node, []).append(arg)
    return frees


def _run_node(gm: fx.GraphModule, node: fx.Node, env: dict) -> object:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, node.target)(*rest, **kwargs)
    if node.op == "get_attr":
        return _attr(gm, node.target)
    raise QuantizationError(f"cannot run fx node {node.format_node()}")


def _attr(gm: nn.Module, target: str) -> object:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# bias_correct(requantize=...): off, True (= "asymmetric"), or the GPTQ target by name
REQUANTIZE_MODES = (False, True, "symmetric", "asymmetric")


@torch.no_grad()
def bias_correct(
    reference: fx.GraphModule,
    quantized: fx.GraphModule,
    x: torch.Tensor,
    batch_size: int = 32,
    rescale: bool | str = False,
    projection: DataFreeProjection | None = None,
    requantize: bool | str = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, float]:
    """Empirical DFQ bias correction, in place on ``quantized`` (the same trace as ``reference``
    with projected weights): layer by layer in dataflow order, each weighted layer's bias moves by
    the mean, per output channel, of reference output − quantized output, with the quantized
    layer fed by the already corrected quantized network (so errors upstream are corrected
    too). ``x`` is calibration input: ZeroQ synthetic images make it data-free.

    ``rescale`` (True or "std") also matches each output channel's standard deviation by scaling the layer's
    per-channel α (weights and bias of that channel; the codes stay) - the folded-BN analogue of
    re-estimating BatchNorm statistics; "ls" scales by the least-squares gain cov(y, ŷ)/var(ŷ)
    instead, which shrinks noisy channels rather than restoring their spread. With ``projection`` (from ``project_traced``) the new α
    is stored there and the weight set to exactly float32(α)·q, so the codes are recovered
    without rounding.

    ``requantize`` (needs ``projection``) first re-picks the codes of each low-bit dense layer
    (linear, conv with groups 1) from the inputs it sees, column by column with the rounding
    error of each column spread over the columns not yet rounded (GPTQ, Frantar et al. 2022,
    with the layer's α kept): the codes minimise ‖(W − α·q) x̂‖ over the calibration inputs
    rather than ‖W − α·q‖. ``requantize="asymmetric"`` (what True means) aims at the reference
    network instead, ‖W x − α·q x̂‖ with x the reference layer's input (GPTAQ, Li et al. 2025), so
    each layer's codes also absorb the error upstream layers left in x̂; "symmetric" is the
    former. Returns, per layer, the mean |shift| applied."""
    if requantize not in REQUANTIZE_MODES:
        raise QuantizationError(f"requantize must be one of {REQUANTIZE_MODES}, got {requantize!r}")
    nodes = list(reference.graph.nodes)
    q_nodes = {n.name: n for n in quantized.graph.nodes}
    frees = _last_uses(reference.graph)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise QuantizationError(f"bias correction supports single-input models, got {len(placeholders)} inputs")
    chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    env_f: dict = {}
    env_q: dict = {}
    iterator = progress(nodes) if progress else nodes
    shifts: dict[str, float] = {}
    # One node at a time over all chunks, so a layer's correction uses every calibration sample
    # and the next layer sees the corrected output.
    for node in iterator:
        if node.op == "output":
            break
        qn = q_nodes[node.name]
        outs_f, outs_q = [], []
        for c, chunk in enumerate(chunks):
            if node.op == "placeholder":
                outs_f.append(chunk)
                outs_q.append(chunk)
                continue
            if c == 0 and requantize and projection is not None:
                fp_inputs = None if requantize == "symmetric" else env_f[node.args[0]]
                _requantize(quantized, qn, env_q[node.args[0]], projection, fp_inputs)
            f_env = {n: env_f[n][c] for n in node.all_input_nodes}
            q_env = {q_nodes[n.name]: env_q[n][c] for n in node.all_input_nodes}
            outs_f.append(_run_node(reference, node, f_env))
            outs_q.append(_run_node(quantized, qn, q_env))
        layer = _module(quantized, qn)
        if isinstance(layer, WEIGHTED_TYPES) and isinstance(outs_q[0], torch.Tensor):
            axis = 1 if outs_q[0].dim() > 2 else -1
            yf = torch.cat([o.transpose(axis, -1).reshape(-1, o.shape[axis]) for o in outs_f])
            yq = torch.cat([o.transpose(axis, -1).reshape(-1, o.shape[axis]) for o in outs_q])
            mean_f, mean_q = yf.mean(0), yq.mean(0)
            gain = torch.ones_like(mean_f)
            if rescale == "ls":  # least squares: the gain that minimises the channel's error
                cov = ((yf - mean_f) * (yq - mean_q)).mean(0)
                var_q = (yq - mean_q).pow(2).mean(0)
                gain = torch.where(var_q > 1e-24, cov / var_q.clamp_min(1e-24), gain)
                gain = gain.clamp(0.5, 2.0)
            elif rescale:
                std_f, std_q = yf.std(0), yq.std(0)
                gain = torch.where(std_q > 1e-12, std_f / std_q.clamp_min(1e-12), gain)
                gain = gain.clamp(0.5, 2.0)  # a wild ratio means a dead channel, not a scale error
            if projection is not None and qn.target in projection.arrays:
                q, alpha = projection.arrays[qn.target]
                alpha = np.asarray(alpha, dtype=np.float32)
                gain_np = gain.numpy().astype(np.float64).reshape((-1,) + (1,) * (alpha.ndim - 1)) if alpha.ndim else None
                if gain_np is not None and alpha.shape[0] == gain_np.shape[0]:
                    alpha = (alpha.astype(np.float64) * gain_np).astype(np.float32)
                    projection.arrays[qn.target] = (q, alpha)
                    layer.weight.copy_(torch.from_numpy(alpha) * torch.from_numpy(q.astype(np.float32)))
                    gain = torch.from_numpy(gain_np.reshape(-1).astype(np.float32))  # what was applied
                else:  # one α for the tensor: a per-channel gain would leave the code grid
                    gain = torch.ones_like(gain)
            else:
                layer.weight.mul_(gain.view(-1, *([1] * (layer.weight.dim() - 1))))
            bias = layer.bias if layer.bias is not None else torch.zeros_like(mean_f)
            # new output = gain·(W x + b) + shift, with shift chosen to match the reference mean
            shift = mean_f - gain * mean_q
            layer.bias = nn.Parameter(gain * bias + shift)
            shape = [1] * outs_q[0].dim()
            shape[axis] = -1
            outs_q = [o * gain.view(shape) + shift.view(shape) for o in outs_q]
            shifts[qn.target] = float(shift.abs().mean())
        env_f[node], env_q[node] = outs_f, outs_q
        for dead in frees.get(node, ()):
            env_f.pop(dead, None)
            env_q.pop(dead, None)
    quantized.recompile()
    return shifts


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's input as rows matching weight.reshape(out, -1) (im2col for a k×k conv)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    pad = getattr(layer, "static_padding", None)  # "same"-padding convs pad in a submodule first
    if pad is not None:
        x = pad(x)
    cols = torch.nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                      stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _nearest_level(v: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(v[:, None] - levels[None, :]).abs().argmin(1)]


@torch.no_grad()
def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, alpha: torch.Tensor, levels: torch.Tensor,
               damp: float = 0.01) -> torch.Tensor:
    """Codes q (out × in, float) for w ≈ α·q that keep w·x close for inputs with second moment
    ``hessian`` = Σ x xᵀ: GPTQ's column-by-column rounding with error feedback through the
    Cholesky factor of the inverse Hessian (``damp`` · mean diagonal added for stability)."""
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # an input that is always 0: its weight is free, 0 needs no code
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    a = alpha.double().reshape(-1)
    lv = levels.double()
    q = torch.empty_like(w)
    for j in range(w.shape[1]):
        col = w[:, j]
        q[:, j] = _nearest_level(col / a, lv)
        err = (col - a * q[:, j]) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
    return q


def _requantize(gm: fx.GraphModule, node: fx.Node, inputs: list[torch.Tensor], projection: DataFreeProjection,
                fp_inputs: list[torch.Tensor] | None = None, damp: float = 0.01) -> None:
    layer = _module(gm, node)
    name = node.target
    if not isinstance(layer, WEIGHTED_TYPES) or name not in projection.arrays or projection.codes[name] == "int8":
        return
    q_old, alpha = projection.arrays[name]
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 0 or alpha.size != layer.weight.shape[0]:
        return  # one α for the tensor: keep the plain projection
    rows = [layer_rows(layer, x) for x in inputs]
    if any(r is None for r in rows):
        return
    hessian = sum(r.double().T @ r.double() for r in rows)
    target = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    # the reference weights: α·q is what the layer holds now, the projection's input was W
    w = projection.reference[name] if name in projection.reference else target
    w = w.reshape(w.shape[0], -1)
    if fp_inputs is not None:
        # asymmetric target: min ‖W x − α·q x̂‖ (x the reference network's input, x̂ the quantized
        # one's) is GPTQ on W̃ = W·(Σ x x̂ᵀ)(Σ x̂ x̂ᵀ)⁻¹, the weights that best undo upstream error;
        # the ridge pulls W̃ towards W (not 0) where the calibration inputs say little
        cross = sum(layer_rows(layer, xf).double().T @ r.double() for xf, r in zip(fp_inputs, rows))
        ridge = damp * torch.diag(hessian).mean()
        h = hessian + ridge * torch.eye(hessian.shape[0], dtype=hessian.dtype)
        w = torch.linalg.solve(h, (w.double() @ cross + ridge * w.double()).T).T
    levels = torch.from_numpy(code_set(projection.codes[name]).levels.astype(np.float64))
    q = gptq_codes(w, hessian, torch.from_numpy(alpha), levels, damp)
    q = q.reshape(q_old.shape).numpy().astype(np.int8)
    projection.arrays[name] = (q, alpha)
    layer.weight.copy_(torch.from_numpy(alpha) * torch.from_numpy(q.astype(np.float32)))
