"""The data-free squeeze step (``Squeeze(datafree=DataFree(...))``): DFQ and ZeroQ on the
source torch module before the power-of-two rewrite, the graph re-imported from the result.

On a torch.fx trace of the module it folds BatchNorm, equalizes consecutive conv pairs
(``passes/dfq.py``), projects every weight (depthwise layers that would lose most go to int8),
and corrects biases and per-channel α on calibration inputs: the user's unlabelled ``data`` or,
without any, ZeroQ images distilled from the BatchNorm statistics (``passes/zeroq.py``). The
weights are then exactly α·codes, so the ``QuantizePow2`` pass that follows recovers them
without rounding; it reads the per-layer code sets and the calibration inputs from the
shared :class:`DataFreeState`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np

from lastbit.graph import Graph
from lastbit.passes.pow2_projection import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["DataFree", "DataFreeQuantize", "DataFreeState"]


@dataclass(frozen=True)
class DataFree:
    """Which data-free techniques to apply (each measured in benchmarks/datafree_accuracy.py).

    equalize
        Cross-layer equalization of consecutive conv pairs, BN folded first (DFQ).
    bias_correction
        Empirical bias correction, layer by layer, on the calibration inputs (DFQ).
    rescale
        With bias correction, also match each output channel's spread by rescaling its α
        (the folded-BN counterpart of re-estimating BatchNorm statistics).
    synthetic
        ZeroQ images to distil from BatchNorm statistics when ``Squeeze.data`` is None (0: none;
        then bias correction needs ``data``). ``synthetic_steps`` / ``synthetic_size``: their
        optimisation steps and side (None: the model input's); ``synthetic_batch`` images share
        one BatchNorm-statistics loss, Adam at ``synthetic_lr``. The defaults are the settings of
        benchmarks/datafree_accuracy.py's DeepInversion rows (16 a batch, lr 0.25, 150 steps);
        compiled with the former ones (one batch of 32, lr 0.2, 200 steps) EfficientNet-Lite0
        agreed 17.2 % with fp32 there.
    synthetic_labels
        DeepInversion on top of ZeroQ (``DistillConfig.labels``): the weight of a cross-entropy pull
        of each synthetic image towards a seeded random class of the model's output; with it each
        step sees image inputs shifted by up to 1/20 of their side and flipped at random (0: plain
        ZeroQ; also what a model without class logits gets, with a warning). Measured in
        benchmarks/datafree_accuracy.py: ternary ResNet-8 72.6 → 81.6 % over plain ZeroQ,
        EfficientNet-Lite0 {−4..4} KL 1.66 → 1.20.
    synthetic_range
        (low, high): the range real inputs have after the model's normalization (e.g. (−1, 1)
        for pixels scaled by 127.5); synthetic images are clamped to it (None: unclamped). Give it
        when you know it: with it DeepInversion's EfficientNet-Lite0 agreement rises 23 → 43 %.
    depthwise_int8
        Relative projection error ‖W − α·q‖²/‖W‖² above which a depthwise conv is stored int8
        (None: never, 0: always).
    requantize
        With bias correction, re-pick each dense layer's codes from its calibration inputs
        (GPTQ-style error feedback, α kept; ``dfq.gptq_codes``): True or "asymmetric" aims at the
        fp32 network's output of the layer (so the codes also absorb upstream error), "symmetric"
        at the layer's own weights on the inputs it now sees, False keeps the projection's codes.
        Measured in benchmarks/datafree_accuracy.py.
    """

    equalize: bool = True
    bias_correction: bool = True
    rescale: bool = True
    synthetic: int = 32
    synthetic_steps: int = 150
    synthetic_size: int | None = None
    synthetic_batch: int = 16
    synthetic_lr: float = 0.25
    synthetic_labels: float = 0.1
    synthetic_range: tuple[float, float] | None = None
    depthwise_int8: float | None = 0.02

    requantize: bool | str = True

    def __post_init__(self) -> None:
        if isinstance(self.synthetic, bool) or not isinstance(self.synthetic, int) or self.synthetic < 0:
            raise QuantizationError(f"DataFree.synthetic must be an int ≥ 0, got {self.synthetic!r}")
        for name in ("synthetic_steps", "synthetic_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QuantizationError(f"DataFree.{name} must be a positive int, got {value!r}")
        lr = self.synthetic_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise QuantizationError(f"DataFree.synthetic_lr must be a finite number > 0, got {lr!r}")
        from lastbit.passes.dfq import REQUANTIZE_MODES
        from lastbit.passes.zeroq import number_pair

        labels = self.synthetic_labels
        if isinstance(labels, bool) or not isinstance(labels, (int, float)) or not 0 <= labels < float("inf"):
            raise QuantizationError(f"DataFree.synthetic_labels must be a finite number ≥ 0, got {labels!r}")
        pair = None if self.synthetic_range is None else number_pair(self.synthetic_range)
        if self.synthetic_range is not None and (pair is None or not pair[0] < pair[1]):
            raise QuantizationError(f"DataFree.synthetic_range must be None or (low, high) with low < high, "
                                    f"got {self.synthetic_range!r}")
        if self.requantize not in REQUANTIZE_MODES:
            raise QuantizationError(f"DataFree.requantize must be one of {REQUANTIZE_MODES}, got {self.requantize!r}")
        if self.depthwise_int8 is not None and not 0 <= self.depthwise_int8 <= 1:
            raise QuantizationError(f"DataFree.depthwise_int8 must be in [0, 1] or None, got {self.depthwise_int8!r}")


@dataclass
class DataFreeState:
    """What the data-free step hands the power-of-two rewrite: code set per torch weight name
    (the layers it moved to int8) and the calibration inputs for the int8 activation scales."""

    layer_codes: dict[str, str] = field(default_factory=dict)
    calibration: np.ndarray | None = None
    report: object = None  # the dfq.DataFreeProjection


class DataFreeQuantize:
    """Graph -> Graph: the data-free techniques of ``squeeze.datafree`` applied to the torch
    module the graph was imported from; the graph is re-imported from the quantized trace."""

    def __init__(self, squeeze, torch_module, state: DataFreeState | None = None):
        self.squeeze = squeeze
        self.torch_module = torch_module
        self.state = state if state is not None else DataFreeState()

    def __call__(self, graph: Graph) -> Graph:
        import torch

        from lastbit.frontend import from_torch
        from lastbit.passes import dfq
        from lastbit.passes.quantize_pow2 import calibration_inputs
        from lastbit.passes.zeroq import DistillConfig, class_count, distill_data, distill_shape

        sq, opts = self.squeeze, self.squeeze.datafree
        if graph.source != "torch" or self.torch_module is None:
            raise QuantizationError(f"the data-free DFQ/ZeroQ step needs the torch module; '{graph.name}' came from {graph.source}")
        if len(graph.inputs) != 1:
            raise QuantizationError(f"the data-free DFQ/ZeroQ step supports single-input models; '{graph.name}' has {len(graph.inputs)}")
        spec = graph.inputs[0]
        x = calibration_inputs(sq.data, sq.calibration_samples)
        calib = None if x is None else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        kind = None  # what synthetic images were distilled, for the report
        if calib is None and opts.synthetic and (opts.bias_correction or sq.integer_kernels):
            shape = distill_shape(spec.shape[1:], opts.synthetic_size)
            labels = opts.synthetic_labels
            if labels and class_count(self.torch_module, shape) is None:
                log.warning("DataFree(synthetic_labels=%g): %s does not output (N, classes) logits; distilling plain "
                            "ZeroQ images instead", labels, graph.name)
                labels = 0
            # DeepInversion: the pull to classes with its Adam betas; shifts and flips for images only
            images = dict(jitter=shape[-1] // 20, flip=True) if len(shape) == 3 else {}
            deepinv = dict(labels=float(labels), betas=(0.5, 0.9), **images) if labels else {}
            config = DistillConfig(count=opts.synthetic, steps=opts.synthetic_steps, size=opts.synthetic_size,
                                   batch_size=min(opts.synthetic_batch, opts.synthetic), lr=float(opts.synthetic_lr),
                                   input_range=opts.synthetic_range, **deepinv)
            kind = "DeepInversion" if config.labels else "ZeroQ"
            log.info("distilling %d %s inputs from %s's BatchNorm statistics", config.count, kind, graph.name)
            calib = distill_data(self.torch_module, spec.shape[1:], config)
        reference = dfq.trace_layers(self.torch_module)
        folded = dfq.fold_batch_norms(reference)
        pairs = dfq.cross_layer_equalize(reference) if opts.equalize else 0
        quantized = copy.deepcopy(reference)
        kept_float = sq.keep_first_last and sq.first_last_codes is None
        report = dfq.project_traced(quantized, sq.code_set, per_channel=sq.per_channel,
                                    keep_first_last=sq.first_last_codes if sq.keep_first_last else None,
                                    depthwise_int8_error=opts.depthwise_int8, keep_float=kept_float)
        if opts.bias_correction:
            if calib is None:
                raise QuantizationError("DataFree(bias_correction=True) needs calibration inputs: Squeeze(data=X) "
                                        "or DataFree(synthetic=N > 0)")
            dfq.bias_correct(reference, quantized, calib, rescale=opts.rescale, projection=report,
                             requantize=opts.requantize)
        log.info("data-free: %d BN folded, %d pairs equalized, depthwise int8: %s", folded, pairs, report.depthwise_int8)
        self.state.layer_codes = {f"{name}.weight": codes for name, codes in report.codes.items()}
        self.state.calibration = None if calib is None else calib.numpy()
        self.state.report = report
        examples = tuple(torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in graph.inputs)
        rebuilt = from_torch(quantized, examples, name=graph.name)
        return rebuilt.replace(notes=[*graph.notes, _note(opts, calib, kind, folded, pairs, report)])


def _note(opts: DataFree, calib, kind: str | None, folded: int, pairs: int, report) -> str:
    """The report's line: what the data-free step did and what it calibrated on."""
    if calib is None:
        source = "no calibration inputs"
    elif kind is None:
        source = f"{len(calib)} given inputs"
    else:
        clamp = (f" clamped to [{opts.synthetic_range[0]:g}, {opts.synthetic_range[1]:g}]"
                 if opts.synthetic_range is not None else " (unclamped: no input range given)")
        source = f"{len(calib)} synthetic {kind} images{clamp}"
    steps = [f"{folded} BN folded", f"{pairs} conv pair(s) equalized"]
    if opts.bias_correction and calib is not None:
        steps.append("bias correction" + (" + GPTQ codes" if opts.requantize else ""))
    steps.append(f"{len(report.depthwise_int8)} depthwise layer(s) int8")
    return f"data-free calibration on {source}: {', '.join(steps)}"
