"""``Squeeze``: the one configuration object that says how lastbit shrinks a model.

    lastbit.compile(model, target, (x,), squeeze=Squeeze(bits=3))             # data-free
    lastbit.compile(model, target, (x,), squeeze=Squeeze(bits=3, data=(X, y)))  # ADMM fine-tune

Quantization is power-of-two weights, W ≈ α·q with q from a code set (see
``passes/pow2_projection.py``); ``bits`` picks the largest set of that width, ``codes`` names
one. With neither, nothing is quantized (a Squeeze may then carry only other squeezes).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lastbit.passes.pow2_projection import CodeSet, QuantizationError, code_set

log = logging.getLogger(__name__)

SCHEMES = ("pow2",)
MODES = ("auto", "data-free", "admm", "ste")
FINETUNE_MODES = ("admm", "ste")  # the modes that train the torch module on labelled data


@dataclass(frozen=True)
class Squeeze:
    """How to squeeze a model before compiling it.

    bits / codes
        Weight code width (1..4) or an explicit code set name ("ternary", "pow2-4", …);
        ``codes`` overrides ``bits``. Neither: no quantization.
    scheme
        Quantization scheme; only "pow2" (α·{0, ±1, ±2, …}) today.
    per_channel
        One α per output channel (True) or one per tensor.
    keep_first_last
        Keep the first and last weighted layers (in dataflow order) off the low-bit code set:
        they are the most sensitive layers and hold few of the weights, so the ADMM paper and
        its peers keep them at 8 bit. They are stored on ``first_last_codes``. When they hold
        more than a fifth of the weights (a one-layer model, a language-model head) a warning
        says so; ``keep_first_last=False`` (CLI ``--no-keep-first-last``) quantizes them too.
    first_last_codes
        Code set of the kept first/last layers: "int8" (default; symmetric, one α per output
        channel, 8 bits in the report, kernel "int8") or None to leave them float32.
    data
        (X, y) arrays, X alone, or an iterable of (x, y) batches. With labels and a torch
        module, mode "auto" fine-tunes with ADMM; in every mode X calibrates the int8
        activation scales, and with labels the report gives the compiled model's accuracy.
    mode
        "auto" (ADMM when data with labels and the torch module are available, else the
        data-free projection), "data-free", "admm", or "ste": straight-through-estimator
        training (``lastbit.passes.admm.ste_finetune``) on the same data, lr schedule and code
        sets. On ``benchmarks/quant_accuracy.py``'s table ADMM is the more accurate of the two
        at every code set on ResNet-20 and STE at three of four on the 1-epoch ResNet-8 and on
        LeNet-5 (README, "Quantization accuracy"); ADMM stays the "auto" choice.
    epochs, lr, rho, batch_size, admm_options
        Fine-tuning settings (defaults: 3 epochs, cosine lr from 0.01; ADMM's ρ schedule from
        benchmarks/admm_sweep.py: ρ0 growing ×1.3 over 20 G-steps, the last tenth with the codes
        fixed, with rho=None ρ0 = 10 under the output-metric G-step (BatchNorm networks) and 1
        under the nearest codes; STE ignores rho); ``admm_options`` holds any other keyword of the
        fine-tuning function, ``admm_finetune`` or ``ste_finetune`` (rho_growth, distill_from,
        …); a keyword the chosen one does not take is refused by name.
    integer_kernels
        Run each quantized layer as int8 activations × an integer kernel the target picks
        (``codegen/quant_lowering.py``; the report says which). False keeps the float
        reference decode ``astype(codes)·α`` + fp32 kernels: float activations, exact
        against torch with the projected weights, no integer speed-up.
    fake_quant_activations
        Insert int8 quantize→dequantize on every quantized layer's input in the reference
        graph (off by default: the reference keeps float activations).
    act_bits
        Activation bit width of the low-bit layers, 1..8 (default 8: int8 activations). Below 8,
        a layer whose input is a ReLU output gets unsigned codes 0..2^k−1, any other layer
        symmetric ±(2^(k−1)−1) (±1 at k = 1); the scales are calibrated for that grid, the
        float reference fake-quantizes to it, and kernels that gain from narrow activations
        (``bitserial``: k bit-planes) get the layer cheaper. The first/last layers kept on
        ``first_last_codes`` stay at 8 bits.
    activation_percentile, calibration_samples
        The activation scale is the given percentile of |input| over at most that many
        calibration samples, divided by 127.
    prune, prune_criterion, prune_epochs
        Structured channel pruning (``passes/prune_channels.py``), run first: a ratio of every
        channel group (0.5), a ratio per layer ({"layer1.0.conv1": 0.5}) or a FLOP target
        ("flops:0.5" keeps about half). Criterion "l1", "bn" (BN-γ) or "taylor" (|w·∂L/∂w|,
        needs labelled data and the torch module). ``prune_epochs`` > 0 fine-tunes the pruned
        torch module that long (at ``lr``, ``batch_size``) and compiles its weights.
    rank
        Low-rank splitting of dense and k×k conv layers (``passes/lowrank.py``), after
        pruning: "auto" (energy 0.9), an energy in (0, 1], "flops:F" or a fixed int rank.
    layers
        Per-layer choices (``lastbit/layer_config.py``): {layer: LayerChoice(codes, keep, rank)},
        a LayerConfig or a JSON file path. A named layer gets its own code set ("fp32": left
        float), prunes its channel group to ``keep`` and splits at ``rank``; the others get
        the global setting above. Pruning and ranks go either here or in prune/rank.
    sparsity
        Unstructured sparsity (``passes/sparsity.py``), before quantization: the share of
        each conv/dense weight set to zero; the report stores the codes run-length encoded.
    With any of these three, "auto" quantization is data-free (ADMM fine-tunes the unpruned
    torch module, whose weights no longer fit the graph).
    datafree
        ``lastbit.passes.datafree.DataFree(...)``: in the data-free mode, BN folding, cross-layer
        equalization, bias correction on ZeroQ synthetic (or the given unlabelled) inputs and
        depthwise layers on int8 where they would lose most (needs the torch module; implies
        the data-free mode under "auto"). None: plain projection.
    """

    bits: int | None = None
    codes: str | None = None
    scheme: str = "pow2"
    per_channel: bool = True
    keep_first_last: bool = True
    first_last_codes: str | None = "int8"
    data: Any = field(default=None, compare=False, hash=False, repr=False)
    mode: str = "auto"
    epochs: int = 3
    lr: float = 0.01
    rho: float | None = None
    batch_size: int = 64
    admm_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    integer_kernels: bool = True
    fake_quant_activations: bool = False
    act_bits: int = 8
    activation_percentile: float = 99.99
    calibration_samples: int = 256
    prune: Any = field(default=None, hash=False)
    prune_criterion: str = "l1"
    prune_epochs: int = 0
    rank: Any = None
    sparsity: float | None = None
    layers: Any = field(default=None, hash=False)
    datafree: Any = None

    def __post_init__(self) -> None:
        if self.data is not None and not hasattr(self.data, "shape") and iter_once(self.data):
            object.__setattr__(self, "data", list(self.data))  # a generator: keep it for every pass over it
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")
        if self.bits is not None:
            if isinstance(self.bits, bool) or not isinstance(self.bits, int):
                raise QuantizationError(f"bits must be an int, got {self.bits!r}")
            code_set(self.bits)  # raises, naming the value, outside 1..4
        if self.codes is not None:
            chosen = code_set(self.codes)  # raises, naming the value, for an unknown set
            if self.bits is not None and chosen.bits != self.bits:
                log.warning("codes=%r (%d bits) overrides bits=%d", self.codes, chosen.bits, self.bits)
        if self.first_last_codes is not None:
            code_set(self.first_last_codes)  # raises, naming the value, for an unknown set
        if self.mode not in MODES:
            raise QuantizationError(f"unknown squeeze mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode in FINETUNE_MODES and self.data is None:
            raise QuantizationError(f"mode={self.mode!r} needs training data: Squeeze(..., data=(X, y))")
        if self.admm_options:
            self._check_finetune_options()
        if not isinstance(self.epochs, int) or self.epochs < 1 or self.batch_size < 1:
            raise QuantizationError(f"epochs and batch_size must be positive ints, got {self.epochs!r}, {self.batch_size!r}")
        if not (self.lr > 0 and (self.rho is None or self.rho >= 0)):
            raise QuantizationError(f"need lr > 0 and rho ≥ 0, got lr={self.lr!r}, rho={self.rho!r}")
        if not 0 < self.activation_percentile <= 100 or not math.isfinite(self.activation_percentile):
            raise QuantizationError(f"activation_percentile must be in (0, 100], got {self.activation_percentile!r}")
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 1 <= self.act_bits <= 8:
            raise QuantizationError(f"act_bits must be an int in 1..8, got {self.act_bits!r}")
        if self.calibration_samples < 1:
            raise QuantizationError(f"calibration_samples must be ≥ 1, got {self.calibration_samples!r}")
        if self.layers is not None:
            from lastbit.layer_config import parse_layers

            object.__setattr__(self, "layers", parse_layers(self.layers))
        self._check_structural()
        if self.datafree is not None:
            from lastbit.passes.datafree import DataFree

            if not isinstance(self.datafree, DataFree):
                raise QuantizationError(f"datafree must be a lastbit.passes.datafree.DataFree, got {self.datafree!r}")
            if self.mode in FINETUNE_MODES or self.restructures:
                raise QuantizationError("datafree (DFQ/ZeroQ) works on the unpruned torch module in the data-free mode; "
                                        "it cannot be combined with mode='admm' or 'ste', prune, rank or sparsity")

    def _check_structural(self) -> None:
        """Validate prune / rank / sparsity (each parser raises naming the bad value)."""
        from lastbit.passes.lowrank import parse_rank
        from lastbit.passes.prune_channels import (
            CRITERIA,
            PruneError,
            parse_prune_target,
        )
        from lastbit.passes.sparsity import SparsityError

        if self.prune is not None:
            parse_prune_target(self.prune)
        if self.prune_criterion not in CRITERIA:
            raise PruneError(f"unknown prune_criterion {self.prune_criterion!r}; known: {', '.join(CRITERIA)}")
        if self.prune is not None and self.prune_criterion == "taylor" and not self.has_labels:
            raise PruneError("prune_criterion='taylor' needs labelled data: Squeeze(..., data=(X, y))")
        if isinstance(self.prune_epochs, bool) or not isinstance(self.prune_epochs, int) or self.prune_epochs < 0:
            raise PruneError(f"prune_epochs must be an int ≥ 0, got {self.prune_epochs!r}")
        if self.prune_epochs and not self.has_labels:
            raise PruneError("prune_epochs (fine-tuning after pruning) needs labelled data: Squeeze(..., data=(X, y))")
        if self.rank is not None:
            parse_rank(self.rank)
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or
                                          not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1):
            raise SparsityError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.layers is not None and self.layers.prune_ratios and self.prune is not None:
            raise PruneError("give pruning either per layer (layers=..., keep) or globally (prune=...), not both")
        if self.layers is not None and self.layers.ranks and self.rank is not None:
            raise QuantizationError("give low-rank ranks either per layer (layers=..., rank) or globally (rank=...), not both")
        if self.mode in FINETUNE_MODES and self.restructures:
            raise QuantizationError(f"mode={self.mode!r} fine-tunes the unpruned torch module; it cannot be combined "
                                    "with prune, rank or sparsity (use mode='data-free')")

    @property
    def restructures(self) -> bool:
        """Whether pruning, low-rank splitting or sparsity changes the weights before quantization."""
        return self.prune_target is not None or self.rank_target is not None or bool(self.sparsity)

    @property
    def prune_target(self) -> Any:
        """What the pruning pass gets: ``prune``, or the per-layer ratios of ``layers`` (None: no pruning)."""
        if self.prune is not None:
            return self.prune
        return (self.layers.prune_ratios or None) if self.layers is not None else None

    @property
    def rank_target(self) -> Any:
        """What the low-rank pass gets: ``rank``, or a LowRank with the per-layer ranks of ``layers``."""
        if self.rank is not None or self.layers is None or not self.layers.ranks:
            return self.rank
        from lastbit.passes.lowrank import LowRank

        return LowRank(ranks=self.layers.ranks)

    @property
    def quantizes(self) -> bool:
        """Whether this Squeeze quantizes weights at all."""
        return self.bits is not None or self.codes is not None or (self.layers is not None and self.layers.quantizes)

    @property
    def global_quantizes(self) -> bool:
        """Whether layers the per-layer configuration does not name are quantized (bits/codes given)."""
        return self.bits is not None or self.codes is not None

    @property
    def code_set(self) -> CodeSet:
        if not self.global_quantizes:
            raise QuantizationError("this Squeeze quantizes nothing (give bits= or codes=)")
        return code_set(self.codes if self.codes is not None else self.bits)

    @property
    def has_labels(self) -> bool:
        """Whether ``data`` carries labels (so it can train and score, not only calibrate)."""
        return data_has_labels(self.data)

    def resolved_mode(self, torch_module_available: bool) -> str:
        """"admm", "ste" or "data-free": what "auto" means given the data and the source module."""
        if self.mode in FINETUNE_MODES:
            if not self.has_labels:
                raise QuantizationError(f"mode={self.mode!r} needs labelled data: Squeeze(data=(X, y))")
            if not torch_module_available:
                raise QuantizationError(f"mode={self.mode!r} fine-tunes the torch module; compile a torch.nn.Module, "
                                        "not a file")
            return self.mode
        if (self.mode == "auto" and self.has_labels and torch_module_available and not self.restructures
                and self.datafree is None):
            return "admm"
        return "data-free"

    @property
    def trainer(self) -> str:
        """"ste" or "admm": how the data-dependent path trains ("auto" fine-tunes with ADMM)."""
        return "ste" if self.mode == "ste" else "admm"

    def finetune_function(self):
        """``admm_finetune`` or ``ste_finetune``, as ``trainer`` says."""
        from lastbit.passes.admm import admm_finetune, ste_finetune

        return ste_finetune if self.trainer == "ste" else admm_finetune

    def _check_finetune_options(self) -> None:
        import inspect

        known = inspect.signature(self.finetune_function()).parameters
        unknown = sorted(k for k in self.admm_options if k not in known)
        if unknown:
            raise QuantizationError(f"admm_options key {unknown[0]!r} is not an option of mode={self.mode!r} "
                                    f"({self.finetune_function().__name__})")

    def admm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``finetune_function()`` (codes, per-channel and skip are added by
        the pass); STE gets ADMM's cosine lr schedule, so the two differ only in how they train."""
        kwargs = dict(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, progress=False)
        if self.rho is not None:  # None: the fine-tuning function's own default (ADMM's depends on its G-step metric)
            kwargs["rho"] = self.rho
        if self.trainer == "ste":
            kwargs["lr_schedule"] = "cosine"
        kwargs.update(self.admm_options)
        return kwargs

    @classmethod
    def from_cli(cls, spec: str, **overrides: Any) -> "Squeeze":
        """Parse ``SCHEME:BITS`` or ``SCHEME:CODESET`` ("pow2:3", "pow2:ternary", "pow2:pow2-4")."""
        scheme, sep, width = spec.strip().partition(":")
        if not sep or not scheme or not width:
            raise QuantizationError(f"quantization spec {spec!r}: expected SCHEME:BITS, e.g. pow2:3")
        width = width.strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", width):
            raise QuantizationError(f"quantization spec {spec!r} is malformed: expected SCHEME:BITS or "
                                    f"SCHEME:CODESET with one colon, e.g. pow2:3 or pow2:ternary")
        if width.isdigit():
            return cls(scheme=scheme.strip().lower(), bits=int(width), **overrides)
        return cls(scheme=scheme.strip().lower(), codes=width, **overrides)


def data_has_labels(data: Any) -> bool:
    """(X, y) arrays or an iterable of (x, y) batches carry labels; X alone does not."""
    if data is None:
        return False
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        return True
    if hasattr(data, "shape"):
        return False
    try:
        first = next(iter(data))
    except (TypeError, StopIteration):
        return False
    return isinstance(first, (tuple, list)) and len(first) == 2


def iter_once(data: Any) -> bool:
    """A one-shot iterator (a generator): iterating it consumes it."""
    try:
        return iter(data) is data
    except TypeError:
        return False
