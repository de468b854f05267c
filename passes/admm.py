"""Fine-tune a torch model so its conv/linear weights land exactly on α·{power-of-two codes}.

`admm_finetune` is the scaled ADMM of Leng et al. (AAAI 2018), its G-step projecting in each
layer's output metric on BatchNorm networks (ADMM_G_METRIC); `ste_finetune` is the
straight-through (BinaryConnect/TWN-style) baseline and `project_module` the data-free
projection. All three return an AdmmResult the graph pass turns into packed codes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lastbit.passes.dfq import gptq_codes, layer_rows
from lastbit.passes.pow2_projection import (
    CodeSet,
    QuantizationError,
    code_set,
    project_pow2,
)

__all__ = [
    "AdmmResult",
    "EpochStats",
    "admm_finetune",
    "evaluate",
    "project_module",
    "quantizable_layers",
    "recalibrate_bn",
    "refine_projection",
    "round_to_magnitudes",
    "ste_finetune",
]

logger = logging.getLogger(__name__)

# Layers whose weight becomes α·codes; everything else (bias, BN, embeddings) stays float.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# (X, y) arrays — numpy or torch, batched here — or any re-iterable of (x, y) batches (a DataLoader).
TrainingData = tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
SkipSpec = str | Sequence[str] | None
LayerCodes = dict[str, "str | CodeSet | None"]  # module name -> code set; None / "fp32": float32
LR_SCHEDULES = ("constant", "cosine")
# The skipped (first/last) layers are stored as symmetric int8, as the paper and its peers keep them at 8 bit.
SKIP_CODES_DEFAULT = "int8"


@dataclass
class EpochStats:
    """One epoch of fine-tuning."""

    epoch: int
    loss: float  # mean training objective over the epoch (task loss, with distillation if on)
    accuracy: float  # training accuracy over the epoch of the weights being stepped
    residual: float  # ‖W − G‖ / ‖W‖ over all quantized layers after the epoch's last G-step
    rho: float  # ρ used during the epoch (ADMM only; 0 for STE)
    eval_accuracy: float | None = None  # accuracy on eval_data of the model with W = G
    # share of the quantized weights whose code differs from the previous epoch's end (the first
    # epoch: from the input weights' projection): how much the quantized network still moves
    code_changes: float | None = None


@dataclass
class AdmmResult:
    """A quantized copy of the model: every weight named in `alphas` equals alphas[n] * codes[n] exactly."""

    module: nn.Module
    code_set: CodeSet
    alphas: dict[str, np.ndarray]  # parameter name ("fc1.weight") -> float32, shape () or (C, 1, …)
    codes: dict[str, np.ndarray]  # parameter name -> int8 level values, the weight's shape
    skipped: list[str]  # quantizable layers (module names) left in full precision
    method: str  # "admm", "ste" or "projection"
    history: list[EpochStats] = field(default_factory=list)
    # The skipped layers' storage when skip_codes was given (int8 by default): their weights
    # equal skip_alphas[n] * skip_codes[n] exactly; None / empty when they stay float32.
    skip_code_set: CodeSet | None = None
    skip_alphas: dict[str, np.ndarray] = field(default_factory=dict)
    skip_codes: dict[str, np.ndarray] = field(default_factory=dict)
    # The code set of each quantized weight (all ``code_set`` unless layer_codes mixed them).
    layer_code_sets: dict[str, CodeSet] = field(default_factory=dict)

    @property
    def quantized(self) -> list[str]:
        return list(self.alphas)


def quantizable_layers(module: nn.Module, skip: SkipSpec = ("first", "last")) -> tuple[list[str], list[str]]:
    """(quantized, skipped) module names of the conv/linear layers, in registration order.

    skip holds module names ("features.0" or "features.0.weight") and/or "first"/"last", the first and
    last quantizable layer in registration order (the forward order for Sequential-style models).
    """
    names = [name for name, m in module.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]
    if skip is None:
        skip = ()
    elif isinstance(skip, str):
        skip = (skip,)
    skipped: set[str] = set()
    for item in skip:
        key = item.removesuffix(".weight")
        if key == "first":
            skipped.update(names[:1])
        elif key == "last":
            skipped.update(names[-1:])
        elif key in names:
            skipped.add(key)
        else:
            raise QuantizationError(f"skip names {item!r}, which is not a conv/linear layer; layers: {names}")
    quantized = [n for n in names if n not in skipped]
    if not quantized:
        logger.warning("no layer left to quantize (layers %s, skip=%s); the model stays float", names, list(skip))
    return quantized, [n for n in names if n in skipped]


# --- data -----------------------------------------------------------------------------------


def _is_array(x: object) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _epoch_source(data: TrainingData, batch_size: int, shuffle: bool, seed: int) -> Callable[[int], Iterator]:
    """A function epoch -> batches, from a (X, y) pair of arrays, a DataLoader or any iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_array(data[0]) and _is_array(data[1]):
        x_all, y_all = torch.as_tensor(data[0]), torch.as_tensor(data[1])
        if x_all.shape[0] != y_all.shape[0] or x_all.shape[0] == 0:
            raise QuantizationError(f"data arrays disagree or are empty: X {tuple(x_all.shape)}, y {tuple(y_all.shape)}")
        x_all = x_all.float() if x_all.dtype == torch.float64 else x_all
        y_all = y_all.long() if not y_all.is_floating_point() else y_all

        def arrays(epoch: int) -> Iterator:
            order = np.random.default_rng([seed, epoch]).permutation(len(x_all)) if shuffle else np.arange(len(x_all))
            for start in range(0, len(order), batch_size):
                idx = torch.from_numpy(order[start : start + batch_size])
                yield x_all[idx], y_all[idx]

        return arrays
    if not isinstance(data, Iterable):
        raise QuantizationError(f"data must be (X, y) arrays or an iterable of (x, y) batches, got {type(data).__name__}")
    if iter(data) is data:  # a one-shot iterator (generator): keep it for every epoch
        data = list(data)
    return lambda epoch: iter(data)


def _num_batches(data: TrainingData, batch_size: int) -> int | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and _is_array(data[0]) and _is_array(data[1]):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _to_device(batch: object, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = batch  # type: ignore[misc]
    except (TypeError, ValueError):
        raise QuantizationError(f"a batch must be an (x, y) pair, got {type(batch).__name__}") from None
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dtype == torch.float64:
        x = x.float()
    return x.to(device), y.to(device)


# --- shared pieces --------------------------------------------------------------------------


class _Objective:
    """Task loss, optionally distilled: (1−β)·CE + β·T²·KL(softmax(teacher/T) ‖ softmax(student/T))."""

    def __init__(self, teacher: nn.Module | None, temperature: float, weight: float):
        if teacher is not None and not 0.0 <= weight <= 1.0:
            raise QuantizationError(f"distill_weight must be in [0, 1], got {weight}")
        if temperature <= 0:
            raise QuantizationError(f"temperature must be positive, got {temperature}")
        self.teacher, self.t, self.beta = teacher, temperature, weight
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, teacher logits) of the last batch

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        if self.teacher is None:
            return loss
        if self._cached is None or self._cached[0] is not x:  # extragradient asks twice per batch
            with torch.no_grad():
                self._cached = (x, self.teacher(x))
        teacher_logits = self._cached[1]
        kl = F.kl_div(
            F.log_softmax(logits / self.t, dim=1),
            F.log_softmax(teacher_logits / self.t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        return (1.0 - self.beta) * loss + self.beta * self.t**2 * kl


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == y).sum()) if y.dim() == 1 else 0


def _lr_at(lr: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of batch `step` of `total`: constant, or cosine-annealed from lr to 0
    (as the zoo's fp32 training does), so the last batches take small steps onto the codes."""
    if schedule == "constant" or total <= 1:
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / total))


def _check_choice(option: str, value: object, known: Sequence[str]) -> None:
    """One error naming the option, the value and the choices when ``value`` is not one of them."""
    if value not in known:
        raise QuantizationError(f"unknown {option} {value!r}; known: {', '.join(known)}")


def round_to_magnitudes(x: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """Nearest of ±mags for every element (torch twin of pow2_projection.round_to_set for a
    symmetric set given by its ascending magnitudes): ties go to the smaller magnitude, and 0
    rounds to +mags[0] in a set without 0 (binary), as there."""
    mids = (mags[:-1] + mags[1:]) / 2
    level = mags[torch.searchsorted(mids, x.abs().contiguous(), right=False)]
    return torch.where(x < 0, -level, level)


def refine_projection(
    v: torch.Tensor, mags: torch.Tensor, alpha: torch.Tensor, per_channel: bool, max_iter: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·q, α): the alternation q = round(v/α), α = ⟨v,q⟩/⟨q,q⟩ from a given α (shape () or
    per output channel along axis 0), until q stops changing. Each round cannot raise
    ‖v − α·q‖², so from the last batch's α it tracks the exact projection cheaply."""
    dims = tuple(range(1, v.dim())) if per_channel else tuple(range(v.dim()))
    alpha = alpha.to(v.dtype)
    q = round_to_magnitudes(v / alpha.clamp_min(torch.finfo(v.dtype).tiny), mags)
    for _ in range(max_iter):
        qq = (q * q).sum(dims, keepdim=per_channel)
        new_alpha = torch.where(qq > 0, (v * q).sum(dims, keepdim=per_channel) / qq.clamp_min(1), alpha)
        new_alpha = torch.where(new_alpha > 0, new_alpha, alpha)
        new_q = round_to_magnitudes(v / new_alpha.clamp_min(torch.finfo(v.dtype).tiny), mags)
        alpha, done, q = new_alpha, torch.equal(new_q, q), new_q
        if done:
            break
    if not per_channel:
        alpha = alpha.reshape(())
    return alpha * q, alpha


class _Quantizer:
    """The quantized weights of one model and their projections G = α·q."""

    def __init__(self, model: nn.Module, codes: CodeSet, per_channel: bool, skip: SkipSpec,
                 skip_codes: str | CodeSet | None = None, layer_codes: LayerCodes | None = None):
        self.codes = codes
        # {weight name: Σ x xᵀ of its layer's input}: where set, `project` picks the codes in that
        # metric (the layer's output error) instead of the weights' (see ADMM_G_METRIC)
        self.metric: dict[str, torch.Tensor] = {}
        names, self.skipped = quantizable_layers(model, skip)
        # Per-layer code sets (mixed precision) override the global set and the skip list;
        # a layer given None / "fp32" stays float32 and is stored as such (not on skip_codes).
        layer_codes = {k.removesuffix(".weight"): v for k, v in (layer_codes or {}).items()}
        every = set(names) | set(self.skipped)
        unknown = sorted(set(layer_codes) - every)
        if unknown:
            raise QuantizationError(f"layer_codes names {unknown[0]!r}, which is not a conv/linear layer; "
                                    f"layers: {sorted(every)}")
        floats = {n for n, c in layer_codes.items() if c is None or c == "fp32"}
        ordered = [n for n, _ in model.named_modules() if n in every]
        names = [n for n in ordered if n not in floats and (n in layer_codes or n in names)]
        self.skipped = [n for n in self.skipped if n not in layer_codes]
        self.code_sets = {f"{n}.weight": code_set(layer_codes[n]) if n in layer_codes else codes for n in names}
        modules = dict(model.named_modules())
        self.weights = {f"{n}.weight": modules[n].weight for n in names}
        self.axis = 0 if per_channel else None
        # Skipped (first/last) layers: trained as float, stored on their own code set at the end.
        self.skip_codes = None if skip_codes is None else code_set(skip_codes)
        self.skipped_weights = {f"{n}.weight": modules[n].weight for n in self.skipped}
        self._mags = {n: torch.from_numpy(cs.magnitudes.astype(np.float32)) for n, cs in self.code_sets.items()}
        self._alpha: dict[str, torch.Tensor] = {}

    def project(self, v: torch.Tensor, name: str | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Π(v) onto the code set of weight ``name`` (the global set when None): α and the codes by
        the paper's alternation; with a metric for ``name``, the codes for that α then re-chosen by
        GPTQ's error feedback, min ‖(v − α·q) x‖ over the layer's inputs x. A point already on the
        codes maps to itself either way (zero error)."""
        cs = self.code_sets.get(name, self.codes) if name is not None else self.codes
        q, alpha = project_pow2(v.detach().cpu().numpy(), cs, axis=self.axis)
        hessian = self.metric.get(name) if name is not None else None
        if hessian is not None:
            rows = v.detach().cpu().reshape(v.shape[0], -1)
            picked = gptq_codes(rows, hessian, torch.from_numpy(np.asarray(alpha, dtype=np.float64)).reshape(-1),
                                torch.from_numpy(cs.levels.astype(np.float64))).numpy().astype(q.dtype)
            # an input that was always 0 leaves its weights free: keep their nearest codes there
            # (gptq_codes zeroes them), so the output error is the same and Π stays idempotent
            dead = (torch.diag(hessian) == 0).numpy()
            picked[:, dead] = q.reshape(q.shape[0], -1)[:, dead]
            q = picked.reshape(q.shape)
        # float32 α times float32 codes: bit-identical to the numpy product the graph pass will see.
        g = torch.from_numpy(alpha).to(v.device) * torch.from_numpy(q.astype(np.float32)).to(v.device)
        return g, q, alpha

    def fast_project(self, name: str, v: torch.Tensor) -> torch.Tensor:
        """Π(v) for a per-batch projection (STE): the exact projection the first time, then the
        paper's alternation warm-started from this weight's last α, in torch. The weights move
        little between batches, so one or two O(n) rounds land where the exact search would,
        at a fraction of its cost (it sorts every tensor). The final codes still come from
        `project` (exact)."""
        alpha = self._alpha.get(name)
        if alpha is None:
            g, _, a = self.project(v, name)
            self._alpha[name] = torch.from_numpy(a).to(v.device)
            return g
        g, self._alpha[name] = refine_projection(v.detach(), self._mags[name].to(v.device), alpha, self.axis is not None)
        return g

    def code_indices(self, values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The exact projection's codes of each quantized weight's ``values`` (for code_changes)."""
        return {n: self.project(v, n)[1] for n, v in values.items()}

    @staticmethod
    def changed_share(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
        """Share of weights whose code differs between two ``code_indices`` results."""
        changed = sum(int(np.count_nonzero(before[n] != after[n])) for n in after)
        return changed / max(sum(q.size for q in after.values()), 1)

    def finish(self, model: nn.Module, targets: dict[str, torch.Tensor], method: str, history: list[EpochStats]) -> AdmmResult:
        """Set every quantized weight to Π(targets[name]) exactly and package the result."""
        alphas, codes = {}, {}
        skip_alphas, skip_codes = {}, {}
        with torch.no_grad():
            for name, w in self.weights.items():
                g, codes[name], alphas[name] = self.project(targets[name], name)
                w.copy_(g)
            if self.skip_codes is not None:
                for name, w in self.skipped_weights.items():
                    # per output channel always: these layers are few and sensitive
                    q, alpha = project_pow2(w.detach().cpu().numpy(), self.skip_codes, axis=0)
                    w.copy_(torch.from_numpy(alpha).to(w.device) * torch.from_numpy(q.astype(np.float32)).to(w.device))
                    skip_alphas[name], skip_codes[name] = alpha, q
        return AdmmResult(model, self.codes, alphas, codes, self.skipped, method, history,
                          skip_code_set=self.skip_codes, skip_alphas=skip_alphas, skip_codes=skip_codes,
                          layer_code_sets=dict(self.code_sets))


def _prepare(module: nn.Module, device: str | torch.device | None) -> tuple[nn.Module, torch.device]:
    """A deep copy on device (None: where the module's parameters already are)."""
    if not isinstance(module, nn.Module):
        raise QuantizationError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    dev = torch.device(device) if device is not None else next((p.device for p in module.parameters()), torch.device("cpu"))
    return copy.deepcopy(module).to(dev), dev


def _teacher(distill_from: nn.Module | str | None, module: nn.Module, device: torch.device) -> nn.Module | None:
    if distill_from is None:
        return None
    if isinstance(distill_from, str):
        if distill_from != "self":
            raise QuantizationError(f"distill_from must be a module or 'self', got {distill_from!r}")
        distill_from = module
    teacher = copy.deepcopy(distill_from).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def evaluate(
    module: nn.Module, data: TrainingData, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of module on data, in eval mode."""
    dev = torch.device(device)
    was_training = module.training
    module.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in _epoch_source(data, batch_size, shuffle=False, seed=0)(0):
        x, y = _to_device(batch, dev)
        logits = module(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += _correct(logits, y)
        seen += len(y)
    module.train(was_training)
    if seen == 0:
        raise QuantizationError("evaluation data is empty")
    return total_loss / seen, correct / seen


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _train_mode(module: nn.Module, freeze_bn: bool) -> None:
    """module.train(), with every BatchNorm back in eval mode when freeze_bn: it then normalizes with
    its running statistics (frozen) while γ, β still train, so conv + BN is the fixed per-channel
    affine map the deployed model folds, and what training sees is what inference runs."""
    module.train()
    if freeze_bn:
        for m in _batch_norms(module):
            m.eval()


@torch.no_grad()
def recalibrate_bn(
    module: nn.Module,
    data: TrainingData,
    num_batches: int = 8,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Re-estimate BatchNorm running statistics of module (in place) from num_batches batches.

    Quantizing the weights shifts every activation's mean and variance, so statistics gathered
    on the float weights no longer match.
    """
    norms = _batch_norms(module)
    if not norms or num_batches <= 0:
        return module
    batches = _epoch_source(data, batch_size, shuffle=True, seed=0)(0)
    return _recalibrate(module, norms, batches, num_batches, torch.device(device))


@torch.no_grad()
def _recalibrate(module: nn.Module, norms: list[nn.Module], batches: Iterable, num_batches: int, dev: torch.device) -> nn.Module:
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = module.training
    module.train()
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        module(_to_device(batch, dev)[0])
    for m, momentum in saved:
        m.momentum = momentum
    module.train(was_training)
    return module


@torch.no_grad()
def _input_moments(model: nn.Module, names: Iterable[str], batches: Iterable, samples: int,
                   dev: torch.device) -> dict[str, torch.Tensor]:
    """{weight name: Σ x xᵀ} of each named layer's input rows (im2col for a k×k conv) over the first
    ``samples`` examples of ``batches``, the model in eval mode. Layers `layer_rows` cannot unroll
    (grouped convs, 1-d/3-d convs) or wider than METRIC_MAX_INPUTS get none and keep the plain
    projection."""
    names, modules = list(names), dict(model.named_modules())
    moments: dict[str, torch.Tensor] = {}
    wide = [n for n in names if modules[n.removesuffix(".weight")].weight[0].numel() > METRIC_MAX_INPUTS]
    if wide:
        logger.info("ADMM: %d layer(s) wider than %d inputs keep the nearest-code projection: %s",
                    len(wide), METRIC_MAX_INPUTS, ", ".join(wide))

    def hook(name: str):
        def accumulate(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().cpu()
            for start in range(0, len(x), 8):  # im2col of a few examples at a time
                rows = layer_rows(layer, x[start:start + 8])
                if rows is None:
                    return
                rows = rows.double()
                moments[name] = moments.get(name, 0) + rows.T @ rows
        return accumulate

    handles = [modules[n.removesuffix(".weight")].register_forward_hook(hook(n)) for n in names if n not in wide]
    was_training, seen = model.training, 0
    model.eval()
    try:
        for batch in batches:
            if seen >= samples:
                break
            x = _to_device(batch, dev)[0][:samples - seen]
            model(x)
            seen += len(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments


def project_module(
    module: nn.Module,
    codes: str | int | CodeSet = "pow2-4",
    per_channel: bool = False,
    skip: SkipSpec = ("first", "last"),
    skip_codes: str | CodeSet | None = SKIP_CODES_DEFAULT,
) -> AdmmResult:
    """Data-free "one-click" quantization: project each weight onto α·codes, no training. The input is untouched.

    The skipped layers are projected onto skip_codes per output channel (int8 by default; None keeps them float32)."""
    cs = code_set(codes)
    model, _ = _prepare(module, None)
    quant = _Quantizer(model, cs, per_channel, skip, skip_codes)
    return quant.finish(model, {n: w.detach() for n, w in quant.weights.items()}, "projection", [])


# --- ADMM -----------------------------------------------------------------------------------


# Defaults from benchmarks/admm_sweep.py on ResNet-8/20 (BatchNorm), Fashion-MNIST, at the accuracy
# table's budgets; the rows (an H200 run, cut short by its time limit) are bench/admm_sweep_gpu.json
# and `admm_sweep.py --summarize bench/admm_sweep_gpu.json` re-derives these winners:
# - W-step: proximal SGD scored at least what extragradient did (mean over 8 cells 81.8 vs 80.5
#   per tensor, 81.5 vs 81.5 per channel) at half the cost: ADMM now costs what STE does per batch.
# - α per output channel: no better on average (81.5 vs 81.8); per tensor stays.
# - BatchNorm frozen (eval mode) during fine-tuning diverged at lr 0.01 in every cell; batch
#   statistics stay, with the fixed phase and the final re-estimation handling their drift.
# - Schedule (grid ρ0 {1, 5, 20} × growth {1.15, 1.3, 1.6} × G-steps {9, 20} × fixed {0.1, 0.25}):
#   ρ0 = 1 growing ×1.3 over 20 G-steps with a final tenth fixed; ResNet-8 binary 76.9 → 79.6,
#   ternary 80.5 → 81.7 against the LeNet-5-tuned ρ0 = 5, ×1.3, 9 G-steps, fixed fifth (the
#   grid's ResNet-20 cells were cut by the time limit).
# - Distillation T = 4, β = 0.3 (grid T {1, 2, 4} × β {0.3, 0.6, 0.9}).
# - ρ0 × growth again under the constant penalty (`admm_sweep.py --rho-sweep`, ResNet-8 binary and
#   ternary, bench/admm_rho_sweep.json): ρ0 = 1 ×1.3 still best with ∇f at W; with ∇f at Π(W)
#   only a negligible pull (ρ0 ≤ 0.01, constant) ties STE, being STE.
ADMM_RHO_GROWTH, ADMM_G_STEPS, ADMM_FIXED = 1.3, 20, 0.1
# ρ0 per G-step metric (admm_finetune(rho=None) resolves it by the metric "auto" picks). "weights":
# the sweeps above, all run with the nearest-code G-step. "outputs": `admm_sweep.py --metric-sweep`
# (CPU, bench/admm_metric_sweep.json) swept ρ0 {0.3, 1, 3, 10} × growth {1.15, 1.3} and ρ0 = 30 ×1.3
# again under the output metric, ResNet-8/20 at all four code sets: ρ0 = 10 ×1.3 has the best mean of the 8
# cells (85.24, STE 85.18; ρ0 = 1: 84.88) and is ≥ STE in all four ResNet-20 cells.
ADMM_RHO_BY_METRIC = {"weights": 1.0, "outputs": 10.0}
W_STEPS = ("extragradient", "sgd")
ADMM_W_STEP = "sgd"
# Where the W-step evaluates ∇f: at the float W ("float", the paper's), or at its projection Π(W)
# ("projected", the straight-through point: the network being trained is the quantized one, so
# BatchNorm's batch statistics and γ, β see the weights the deployed model has).
FORWARDS = ("float", "projected")
ADMM_FORWARD = "float"
# What the last fixed_fraction of the batches does: "fixed" keeps the quantized weights at
# Π(W + λ) and trains the rest; "ste" keeps training them straight-through from W + λ.
TAILS = ("fixed", "ste")
ADMM_TAIL = "fixed"
# The proximal pull per batch is ηρ: with η on the cosine schedule it fades to nothing over the
# last third of a one-epoch run, so W never reaches the codes and the final projection is a jump
# the BatchNorm network cannot absorb (ResNet-20 binary: 65.8 %). "constant" takes ηρ with the
# base lr (the loss gradient keeps the schedule): W lands on the codes (78.6 %). From
# `admm_sweep.py --bn-sweep`, bench/admm_bn_sweep_gpu.json: mean over the 8 ResNet cells 81.4 → 83.3.
PENALTY_LRS = ("schedule", "constant")
ADMM_PENALTY_LR = "constant"
ADMM_PER_CHANNEL = False
ADMM_FREEZE_BN = False
# The metric of the G-step's projection Π: "weights" is the paper's, the nearest codes to W + λ
# (‖·‖ on the weights); "outputs" keeps the paper's α but picks the codes that keep the layer's
# *output* closest, min ‖(W + λ − α·q) x‖ over the inputs x the starting model sees on
# ADMM_METRIC_SAMPLES training examples (GPTQ's column-by-column error feedback,
# dfq.gptq_codes). ADMM's pull keeps W near the codes its first projection picks, so which codes
# that projection picks is most of the final accuracy. "auto" (the default, `g_metric_for`):
# "outputs" on a network with BatchNorm, "weights" without. quant_accuracy.py's table, same
# budgets, each metric at its own ρ0 (ADMM_RHO_BY_METRIC), against the nearest-code rows run
# beside it: "outputs" lifts ADMM on ResNet-20 by 1.1–5.4 points (binary 79.5 → 84.9) and on
# ResNet-8 by 0.2–0.9, and costs LeNet-5 (no BatchNorm) 0.1–0.9 in every cell.
G_METRICS = ("auto", "weights", "outputs")
ADMM_G_METRIC = "auto"
ADMM_METRIC_SAMPLES = 512
# A layer with more inputs per output than this (ResNet-18's 3×3×512 convs are at the limit) keeps the
# nearest-code projection: its Σ x xᵀ alone would take 8·n² bytes (VGG-11's first fc: 5 GB).
METRIC_MAX_INPUTS = 4608
ADMM_KD_TEMPERATURE, ADMM_KD_WEIGHT = 4.0, 0.3


def g_metric_for(module: nn.Module, g_metric: str = ADMM_G_METRIC) -> str:
    """The G-step metric ``g_metric`` means for ``module``: "auto" is "outputs" when it has a
    BatchNorm layer, "weights" otherwise (see ADMM_G_METRIC); the others mean themselves."""
    _check_choice("g_metric", g_metric, G_METRICS)
    if g_metric != "auto":
        return g_metric
    return "outputs" if _batch_norms(module) else "weights"


def default_rho(g_metric: str) -> float:
    """ρ0 when admm_finetune(rho=None): per resolved G-step metric (see ADMM_RHO_BY_METRIC)."""
    _check_choice("g_metric", g_metric, tuple(ADMM_RHO_BY_METRIC))
    return ADMM_RHO_BY_METRIC[g_metric]


def auto_update_every(total_batches: int, fixed_fraction: float = ADMM_FIXED, g_steps: int = ADMM_G_STEPS) -> int:
    """Batches between G-steps so that ``g_steps`` of them fall in the ADMM (non-fixed) phase."""
    admm_batches = max(1, int(total_batches * (1 - fixed_fraction)))
    return max(1, admm_batches // g_steps)


def admm_finetune(
    module: nn.Module,
    data: TrainingData,
    codes: str | int | CodeSet = "pow2-4",
    *,
    epochs: int = 20,
    rho: float | None = None,
    rho_growth: float = ADMM_RHO_GROWTH,
    lr: float = 0.01,
    lr_schedule: str = "cosine",
    per_channel: bool = ADMM_PER_CHANNEL,
    skip: SkipSpec = ("first", "last"),
    skip_codes: str | CodeSet | None = SKIP_CODES_DEFAULT,
    distill_from: nn.Module | str | None = None,
    temperature: float = ADMM_KD_TEMPERATURE,
    distill_weight: float = ADMM_KD_WEIGHT,
    update_every: int | str = "auto",
    fixed_fraction: float = ADMM_FIXED,
    w_step: str = ADMM_W_STEP,
    freeze_bn: bool = ADMM_FREEZE_BN,
    batch_size: int = 64,
    eval_data: TrainingData | None = None,
    bn_batches: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    momentum: float = 0.9,
    layer_codes: LayerCodes | None = None,
    forward: str = ADMM_FORWARD,
    tail: str = ADMM_TAIL,
    penalty_lr: str = ADMM_PENALTY_LR,
    g_metric: str = ADMM_G_METRIC,
    metric_samples: int = ADMM_METRIC_SAMPLES,
) -> AdmmResult:
    """Scaled ADMM fine-tuning onto W ∈ α·codes; returns a copy whose quantized weights are exactly α·codes.

    layer_codes ({module name: code set}, None / "fp32" for float32) gives named layers their
    own code set (mixed precision), over ``codes`` and ``skip``.

    W-step, per mini-batch, on f(W) + ρ/2·‖W − G + λ‖² over all parameters (only the quantized
    weights carry the penalty): extragradient with heavy-ball momentum on f — predictor
    W̃ = prox(W − η(μv + ∇f(W))), corrector v = μv + ∇f(W̃), W ← prox(W − ηv) — where prox takes
    the quadratic penalty exactly, (X + ηρ(G − λ)) / (1 + ηρ), so a growing ρ never makes the step
    unstable (an explicit gradient step on it diverges once ηρ > 2). momentum=0 is the paper's
    plain extragradient. η follows lr_schedule ("constant", or "cosine" from lr to 0).
    w_step="sgd" takes one gradient per batch instead of two: v = μv + ∇f(W), W ← prox(W − ηv)
    (proximal heavy-ball SGD), half the cost of extragradient, so the same number of batches
    costs what STE does. freeze_bn keeps every BatchNorm in eval mode (running statistics fixed,
    γ and β still train): conv + BN is then the per-channel affine map the deployed model folds,
    and the statistics are not re-estimated at the end (bn_batches is ignored). Without batch
    statistics a BatchNorm network loses its scale invariance and needs a lower lr: the sweep's
    lr 0.01 diverged in every cell (see ADMM_FREEZE_BN's note).
    G-step and dual every `update_every` batches ("auto", the default: ADMM_G_STEPS of them
    spread evenly over the ADMM phase, see :func:`auto_update_every`; or "epoch"): G = Π(W + λ),
    λ += W − G, then ρ ← ρ·rho_growth with λ rescaled by ρ_old/ρ_new so ρ·λ is kept. The W-step
    needs roughly 1/(ηρ) batches between G-steps to settle; updating much more often lets the
    dual run away. Warm start: G = Π(W), λ = 0. rho=None starts from ρ0 = default_rho(metric),
    the value the sweeps picked for the G-step metric in use (ADMM_RHO_BY_METRIC: 1 with the
    nearest codes, 10 with the output metric).
    fixed_fraction > 0 ends with that fraction of the batches (same data, same η schedule) with
    the quantized weights fixed at Π(W + λ) while every other parameter (BatchNorm, biases, the
    skipped layers) keeps training: ADMM's last G-step is a jump, and this lets the rest of the
    network absorb it. At the end W = Π(W + λ) exactly, the skipped layers are stored on
    skip_codes (per output channel; None keeps them float32) and BatchNorm statistics are
    re-estimated on bn_batches batches. The model comes back in eval mode.

    data: (X, y) arrays (batched by batch_size, reshuffled each epoch), a DataLoader, or any
    iterable of (x, y) batches. distill_from: a teacher module, or "self" for the float input;
    loss = (1−β)·CE + β·T²·KL(teacher ‖ student) with β = distill_weight and T = temperature.
    The history's loss is f alone (no penalty); its accuracy is that of the float W being stepped,
    eval_accuracy (with eval_data) that of W = G.

    penalty_lr="constant" (the default) takes the prox's ηρ with the base lr rather than the
    scheduled η, so the pull onto the codes does not fade with the cosine decay (see
    ADMM_PENALTY_LR); "schedule" is the plain proximal step. forward="projected" evaluates ∇f at
    Π(W) (straight through) instead of W, and the codes kept (the fixed phase's and the final
    ones) are then Π(W), the ones trained, not Π(W + λ); tail="ste" trains the quantized weights straight
    through during the last fixed_fraction (from W + λ) instead of fixing them. Both were
    measured on ResNet-8/20 (`admm_sweep.py --bn-sweep`) and lost to the defaults.

    g_metric="outputs" makes every projection Π (G-steps, the fixed phase's and the final codes)
    choose the codes for the paper's α by the layer's output error on the inputs the starting
    model sees on the first metric_samples training examples; "weights" is the paper's
    nearest-code projection; "auto" (the default) the first on BatchNorm networks, the second
    elsewhere (see ADMM_G_METRIC).
    """
    cs = code_set(codes)
    g_metric = g_metric_for(module, g_metric)
    if rho is None:
        rho = default_rho(g_metric)
    if epochs < 1 or lr <= 0 or rho < 0 or rho_growth <= 0:
        raise QuantizationError(f"need epochs ≥ 1, lr > 0, rho ≥ 0, rho_growth > 0; got {epochs}, {lr}, {rho}, {rho_growth}")
    if not (update_every in ("epoch", "auto") or (isinstance(update_every, int) and update_every >= 1)):
        raise QuantizationError(f"update_every must be 'auto', 'epoch' or a positive number of batches, got {update_every!r}")
    if not 0.0 <= fixed_fraction < 1.0:
        raise QuantizationError(f"fixed_fraction must be in [0, 1), got {fixed_fraction!r}")
    for option, value, known in (("lr_schedule", lr_schedule, LR_SCHEDULES), ("w_step", w_step, W_STEPS),
                                 ("forward", forward, FORWARDS), ("tail", tail, TAILS),
                                 ("penalty_lr", penalty_lr, PENALTY_LRS)):
        _check_choice(option, value, known)
    if isinstance(metric_samples, bool) or not isinstance(metric_samples, int) or metric_samples < 1:
        raise QuantizationError(f"metric_samples must be a positive number of examples, got {metric_samples!r}")
    per_epoch = _num_batches(data, batch_size)
    total = per_epoch * epochs if per_epoch else None
    if total is None and (fixed_fraction > 0 or lr_schedule != "constant"):
        # A one-shot iterable: its length is known only after the first pass, too late for a
        # schedule over the whole run. Fall back to the plain paper schedule rather than fail.
        logger.warning("ADMM: training data of unknown length; using a constant lr, no fixed phase, "
                       "a G-step per epoch (pass (X, y) arrays or a sized loader for the full recipe)")
        fixed_fraction, lr_schedule = 0.0, "constant"
    if update_every == "auto":
        update_every = auto_update_every(total, fixed_fraction) if total else "epoch"
    admm_steps = total - int(round(fixed_fraction * total)) if total else None
    model, dev = _prepare(module, device)
    quant = _Quantizer(model, cs, per_channel, skip, skip_codes, layer_codes)
    objective = _Objective(_teacher(distill_from, module, dev), temperature, distill_weight)
    batches = _epoch_source(data, batch_size, shuffle=True, seed=seed)
    if g_metric == "outputs":
        quant.metric = _input_moments(model, quant.weights, batches(0), metric_samples, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    velocity = [torch.zeros_like(p) for p in params]
    weights = quant.weights
    quantized_ids = {id(w) for w in weights.values()}

    with torch.no_grad():
        g = {n: quant.project(w, n)[0] for n, w in weights.items()}
        lam = {n: torch.zeros_like(w) for n, w in weights.items()}
        last_codes = quant.code_indices(weights)
    state = {"rho": rho, "eta": lr, "frozen": False}

    def gradient(x: torch.Tensor, y: torch.Tensor, projected: bool = False) -> tuple[float, int]:
        """f and ∇f on a batch, at W or (projected) at Π(W) with W restored afterwards (straight through)."""
        for p in params:
            p.grad = None
        with _weights_set_to(weights, quant.fast_project) if projected else contextlib.nullcontext():
            logits = model(x)
            loss = objective(logits, x, y)
            loss.backward()
        return float(loss.detach()), _correct(logits, y)

    def step_from(start: list[torch.Tensor], direction: list[torch.Tensor | None]) -> None:
        """W ← prox(W0 − η·d): the ρ/2‖W − (G − λ)‖² term is taken exactly, so no ρ makes the step unstable."""
        eta, r = state["eta"], state["rho"]
        if penalty_lr == "constant" and eta > 0:  # the pull ηρ with the base lr, off the cosine decay
            r = r * lr / eta
        for p, p0, d in zip(params, start, direction):
            p.copy_(p0)
            if d is not None:
                p.sub_(d, alpha=eta)
        for n, w in weights.items():
            w.add_(g[n] - lam[n], alpha=eta * r).mul_(1.0 / (1.0 + eta * r))

    def g_step() -> float:
        """G = Π(W + λ), λ += W − G, then ρ grows (λ rescaled); returns ‖W − G‖/‖W‖."""
        with torch.no_grad():
            sq_res, sq_w = 0.0, 0.0
            for n, w in weights.items():
                if not bool(torch.isfinite(w).all()):  # blown up between two loss checks
                    raise QuantizationError(f"ADMM diverged: {n} is not finite at a G-step; lower lr (or rho)")
                g[n] = quant.project(w + lam[n], n)[0]
                lam[n].add_(w - g[n])
                sq_res += float(torch.sum((w - g[n]) ** 2))
                sq_w += float(torch.sum(w * w))
            rho_new = state["rho"] * rho_growth
            if rho_new > 0:
                for n in lam:
                    lam[n].mul_(state["rho"] / rho_new)
            state["rho"] = rho_new
        return math.sqrt(sq_res / sq_w) if sq_w > 0 else 0.0

    def distance_to_codes() -> float:
        """‖W − G‖/‖W‖ against the current G, for an epoch that had no G-step of its own."""
        with torch.no_grad():
            sq_res = sum(float(torch.sum((w - g[n]) ** 2)) for n, w in weights.items())
            sq_w = sum(float(torch.sum(w * w)) for w in weights.values())
        return math.sqrt(sq_res / sq_w) if sq_w > 0 else 0.0

    def trained_point(n: str, w: torch.Tensor) -> torch.Tensor:
        """Where the final codes come from: Π(W + λ), ADMM's consensus point; with a projected
        forward the network was trained on Π(W), so those codes are the ones to keep."""
        return w if forward == "projected" else w + lam[n]

    def freeze() -> None:
        """W = Π(P) for good ("fixed": from here on only the other parameters train), or W = P
        trained straight through ("ste"), with P = trained_point(W)."""
        with torch.no_grad():
            for n, w in weights.items():
                point = trained_point(n, w)
                g[n] = quant.project(point, n)[0]
                w.copy_(g[n] if tail == "fixed" else point)
                lam[n].zero_()
        state["frozen"] = True

    history: list[EpochStats] = []
    residual = float("nan")
    with torch.random.fork_rng(devices=[]), tqdm(
        total=total, disable=not progress, desc=f"ADMM {cs.name}", leave=False
    ) as bar:
        torch.manual_seed(seed)
        _train_mode(model, freeze_bn)
        step = 0
        for epoch in range(epochs):
            loss_sum, correct, seen, n_batches = 0.0, 0, 0, 0
            rho_epoch = state["rho"]
            residual = float("nan")  # set by this epoch's G-steps (or measured at its end)
            for batch in batches(epoch):
                x, y = _to_device(batch, dev)
                if admm_steps is not None and step >= admm_steps and not state["frozen"]:
                    freeze()
                    residual = 0.0 if tail == "fixed" else float("nan")
                state["eta"] = _lr_at(lr, lr_schedule, step, total or 0)
                if state["frozen"]:
                    loss, right = gradient(x, y, projected=tail == "ste")
                    _check_finite(loss, "ADMM", epoch, n_batches)
                    with torch.no_grad():  # momentum SGD on everything but the fixed quantized weights
                        for p, v in zip(params, velocity):
                            if p.grad is not None and (tail == "ste" or id(p) not in quantized_ids):
                                v.mul_(momentum).add_(p.grad)
                                p.sub_(v, alpha=state["eta"])
                else:
                    extragradient = w_step != "sgd"
                    # plain SGD: step_from copies each p onto itself first, so views are enough
                    start = [p.detach().clone() if extragradient else p.detach() for p in params]
                    loss, right = gradient(x, y, projected=forward == "projected")
                    _check_finite(loss, "ADMM", epoch, n_batches)
                    if extragradient:
                        with torch.no_grad():  # predictor: W̃ = prox(W − η(μv + ∇f(W)))
                            step_from(start, [None if p.grad is None else p.grad + momentum * v
                                              for p, v in zip(params, velocity)])
                        gradient(x, y, projected=forward == "projected")
                    # v = μv + ∇f (at W̃ after a predictor), W ← prox(W − ηv) from the start point
                    with torch.no_grad():
                        for p, v in zip(params, velocity):
                            if p.grad is not None:
                                v.mul_(momentum).add_(p.grad)
                        step_from(start, velocity)
                    if update_every != "epoch" and (step + 1) % update_every == 0:
                        residual = g_step()
                step += 1
                loss_sum, correct, seen, n_batches = loss_sum + loss, correct + right, seen + len(y), n_batches + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}", acc=f"{correct / max(seen, 1):.3f}", res=f"{residual:.3f}")
            if n_batches == 0:
                raise QuantizationError("training data is empty")
            if update_every == "epoch" and not state["frozen"]:
                residual = g_step()
            elif math.isnan(residual):
                if state["frozen"] and tail == "ste":  # W moved straight through: its distance to Π(W)
                    with torch.no_grad():
                        g.update({n: quant.project(w, n)[0] for n, w in weights.items()})
                residual = 0.0 if state["frozen"] and tail == "fixed" else distance_to_codes()
            with torch.no_grad():  # the codes the model would take now
                codes_now = quant.code_indices({n: trained_point(n, w) for n, w in weights.items()})
            stats = EpochStats(epoch, loss_sum / n_batches, correct / seen, residual, rho_epoch,
                               code_changes=quant.changed_share(last_codes, codes_now))
            last_codes = codes_now
            if eval_data is not None:
                stats.eval_accuracy = _eval_at(model, weights, g, eval_data, dev, freeze_bn)
            history.append(stats)
            logger.info(
                "ADMM epoch %d: loss %.4f acc %.4f ‖W−G‖/‖W‖ %.4f ρ %.3g%s", epoch, stats.loss, stats.accuracy, residual,
                rho_epoch, " (quantized weights fixed)" if state["frozen"] else "",
            )
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.3f}", res=f"{residual:.3f}")

    with torch.no_grad():
        targets = {n: trained_point(n, w) for n, w in weights.items()}
    result = quant.finish(model, targets, "admm", history)
    if bn_batches > 0 and _batch_norms(model) and not freeze_bn:  # frozen: training already saw these statistics
        _recalibrate(model, _batch_norms(model), batches(epochs), bn_batches, dev)
    model.eval()
    return result


def _check_finite(loss: float, method: str, epoch: int, batch: int) -> None:
    if not math.isfinite(loss):
        raise QuantizationError(f"{method} diverged: loss {loss} at epoch {epoch}, batch {batch}; lower lr (or rho)")


@torch.no_grad()
def _eval_at(
    model: nn.Module, weights: dict[str, torch.Tensor], g: dict[str, torch.Tensor], data: TrainingData, dev: torch.device,
    freeze_bn: bool = False,
) -> float:
    """Accuracy with every quantized weight temporarily set to G."""
    with _weights_set_to(weights, g):
        _, acc = evaluate(model, data, device=dev)
    _train_mode(model, freeze_bn)
    return acc


@contextlib.contextmanager
def _weights_set_to(weights: dict[str, torch.Tensor], values: "dict[str, torch.Tensor] | Callable") -> Iterator[None]:
    """Run the block with every weight W set to ``values[name]`` (or ``values(name, W)``), and W
    restored afterwards, gradients kept: the straight-through point (∂L/∂Π(W) applied to W)."""
    with torch.no_grad():
        latent = {n: w.detach().clone() for n, w in weights.items()}
        for n, w in weights.items():
            w.copy_(values(n, w) if callable(values) else values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(latent[n])


# --- straight-through baseline --------------------------------------------------------------


def ste_finetune(
    module: nn.Module,
    data: TrainingData,
    codes: str | int | CodeSet = "pow2-4",
    *,
    epochs: int = 20,
    rho: float = 0.0,
    rho_growth: float = 1.0,
    lr: float = 0.01,
    lr_schedule: str = "constant",
    per_channel: bool = False,
    skip: SkipSpec = ("first", "last"),
    skip_codes: str | CodeSet | None = SKIP_CODES_DEFAULT,
    distill_from: nn.Module | str | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.5,
    update_every: int | str = 1,
    freeze_bn: bool = False,
    batch_size: int = 64,
    eval_data: TrainingData | None = None,
    bn_batches: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    momentum: float = 0.9,
    layer_codes: LayerCodes | None = None,
) -> AdmmResult:
    """Straight-through-estimator QAT (BinaryConnect / TWN style), the peer baseline for ADMM.

    Each batch runs forward and backward with the projected weights Π(W); the gradient is applied
    to the latent float W by SGD (with momentum; η follows lr_schedule as in admm_finetune). The
    skipped layers end on skip_codes as there. rho/rho_growth are accepted for a signature
    shared with admm_finetune and ignored; update_every is how many batches α and the codes are
    reused before W is projected again (1: every batch, as the originals do). freeze_bn and
    layer_codes (per-layer code sets) as in admm_finetune.
    """
    cs = code_set(codes)
    if epochs < 1 or lr <= 0:
        raise QuantizationError(f"need epochs ≥ 1 and lr > 0; got {epochs}, {lr}")
    if not (update_every == "epoch" or (isinstance(update_every, int) and update_every >= 1)):
        raise QuantizationError(f"update_every must be 'epoch' or a positive number of batches, got {update_every!r}")
    _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
    per_epoch = _num_batches(data, batch_size)
    if per_epoch is None and lr_schedule != "constant":
        raise QuantizationError("lr_schedule needs data of known length ((X, y) arrays or a sized loader)")
    total = per_epoch * epochs if per_epoch else 0
    model, dev = _prepare(module, device)
    quant = _Quantizer(model, cs, per_channel, skip, skip_codes, layer_codes)
    objective = _Objective(_teacher(distill_from, module, dev), temperature, distill_weight)
    batches = _epoch_source(data, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    weights = quant.weights

    history: list[EpochStats] = []
    g: dict[str, torch.Tensor] = {}
    last_codes = quant.code_indices(weights)
    with torch.random.fork_rng(devices=[]), tqdm(
        total=per_epoch * epochs if per_epoch else None, disable=not progress, desc=f"STE {cs.name}", leave=False
    ) as bar:
        torch.manual_seed(seed)
        _train_mode(model, freeze_bn)
        step = 0
        for epoch in range(epochs):
            loss_sum, correct, seen, n_batches = 0.0, 0, 0, 0
            for batch in batches(epoch):
                x, y = _to_device(batch, dev)
                if not g or (update_every != "epoch" and step % update_every == 0):
                    with torch.no_grad():
                        g = {n: quant.fast_project(n, w) for n, w in weights.items()}
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(lr, lr_schedule, step, total)
                optimizer.zero_grad(set_to_none=True)
                with _weights_set_to(weights, g):  # the straight-through step: ∂L/∂Π(W) applied to W
                    logits = model(x)
                    loss = objective(logits, x, y)
                    _check_finite(float(loss.detach()), "STE", epoch, n_batches)
                    loss.backward()
                optimizer.step()
                step += 1
                loss_sum, correct = loss_sum + float(loss.detach()), correct + _correct(logits, y)
                seen, n_batches = seen + len(y), n_batches + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}", acc=f"{correct / max(seen, 1):.3f}")
            if n_batches == 0:
                raise QuantizationError("training data is empty")
            with torch.no_grad():
                projected = {n: quant.project(w, n) for n, w in weights.items()}
                g = {n: p[0] for n, p in projected.items()}
                sq_res = sum(float(torch.sum((w - g[n]) ** 2)) for n, w in weights.items())
                sq_w = sum(float(torch.sum(w * w)) for w in weights.values())
            residual = math.sqrt(sq_res / sq_w) if sq_w > 0 else 0.0
            codes_now = {n: p[1] for n, p in projected.items()}
            stats = EpochStats(epoch, loss_sum / n_batches, correct / seen, residual, 0.0,
                               code_changes=quant.changed_share(last_codes, codes_now))
            last_codes = codes_now
            if eval_data is not None:
                stats.eval_accuracy = _eval_at(model, weights, g, eval_data, dev, freeze_bn)
            history.append(stats)
            logger.info(
                "STE epoch %d: loss %.4f acc %.4f ‖W−Π(W)‖/‖W‖ %.4f", epoch, stats.loss, stats.accuracy, residual
            )
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.3f}", res=f"{residual:.3f}")

    result = quant.finish(model, {n: w.detach().clone() for n, w in weights.items()}, "ste", history)
    if bn_batches > 0 and _batch_norms(model) and not freeze_bn:  # frozen: training already saw these statistics
        _recalibrate(model, _batch_norms(model), batches(epochs), bn_batches, dev)
    model.eval()
    return result
