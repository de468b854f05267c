"""Synthetic calibration images from BatchNorm statistics (ZeroQ "distilled data", Cai et al.,
CVPR 2020): random inputs optimised so that every BatchNorm layer's batch statistics match
its running mean and variance. They stand in for real data wherever the data-free mode needs
activations: bias correction, int8 activation scales.

With ``DistillConfig(labels=w)`` the images are also pulled, with weight ``w``, towards being
classified as seeded random classes, and each step sees a randomly shifted (``jitter``) and
flipped copy (``flip``): DeepInversion's recipe (Yin et al., CVPR 2020), which spreads the images
over the classes instead of the few that BatchNorm statistics alone drift to. ``input_range``
clamps them to the range real inputs have. Measured against plain ZeroQ in
benchmarks/datafree_accuracy.py.

Plain torch; the model must still have its BatchNorm layers (distil before folding them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lastbit.passes.pow2_projection import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "bn_statistics_loss", "class_count", "distill_data", "distill_shape", "label_targets",
           "number_pair"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class DistillConfig:
    """How many images, at what size, how long to optimise them.

    Defaults fit a 2-core CPU: 32 EfficientNet-Lite0 images at 224² × 200 Adam steps take a few
    minutes (measured in benchmarks/datafree_accuracy.py). ZeroQ itself used 500 steps at lr 0.5."""

    count: int = 32
    size: int | None = None  # input side (None: the example input's)
    steps: int = 200
    lr: float = 0.2
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"  # where to optimise ("cuda" when there is one; the images come back on the CPU)
    labels: float = 0.0  # weight of the cross-entropy to label_targets() (0: ZeroQ's BN loss alone)
    jitter: int = 0  # each step shifts the batch circularly by up to ± this many pixels
    flip: bool = False  # each step flips the batch horizontally with probability 1/2
    input_range: tuple[float, float] | None = None  # clamp the images to [low, high] after each step
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (DeepInversion used 0.5, 0.9)

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> QuantizationError:
            return QuantizationError(f"DistillConfig.{field} must be {want}, got {getattr(self, field)!r}")

        for field in ("count", "steps", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(field, "a positive int")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise bad("size", "a positive int or None")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if not (isinstance(self.labels, (int, float)) and math.isfinite(self.labels) and self.labels >= 0):
            raise bad("labels", "a finite number ≥ 0")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise bad("jitter", "an int ≥ 0")
        if self.input_range is not None and not _ordered(number_pair(self.input_range)):
            raise bad("input_range", "None or (low, high) with low < high")
        betas = number_pair(self.betas)
        if betas is None or not all(0 <= b < 1 for b in betas):
            raise bad("betas", "two numbers in [0, 1)")


def _ordered(pair: tuple[float, float] | None) -> bool:
    return pair is not None and pair[0] < pair[1]


def number_pair(value: object) -> tuple[float, float] | None:
    """``value`` as two finite floats, or None when it is not exactly that (config checks)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (a, b) if math.isfinite(a) and math.isfinite(b) else None


def label_targets(config: DistillConfig, classes: int) -> torch.Tensor:
    """The class each distilled image is pulled towards when ``config.labels > 0``: uniform over
    ``classes``, seeded by ``config.seed`` (its own stream, so the starting images do not change)."""
    return torch.randint(0, classes, (config.count,), generator=torch.Generator().manual_seed(config.seed + 2))


class _BnTaps:
    """Forward hooks that keep each BatchNorm's input batch mean and variance."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.running_mean is not None]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.norms]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        self.stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's objective: Σ over BatchNorm layers of ‖μ_batch − μ_running‖₂ + ‖σ_batch − σ_running‖₂
    (σ the standard deviation), each divided by √channels so wide layers do not dominate."""
    return _bn_loss_and_output(model, x)[0]


def _bn_loss_and_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    taps = _BnTaps(model)
    if not taps.norms:
        taps.remove()
        raise QuantizationError(f"{type(model).__name__} has no BatchNorm layer with running statistics to distil data "
                                "from; give real calibration inputs instead (Squeeze(data=X), CLI --data)")
    try:
        output = model(x)
    finally:
        taps.remove()
    loss = x.new_zeros(())
    for bn, (mean, var) in zip(taps.norms, taps.stats):
        scale = float(mean.numel()) ** 0.5
        loss = loss + torch.linalg.vector_norm(mean - bn.running_mean) / scale
        loss = loss + torch.linalg.vector_norm(var.clamp_min(0).sqrt() - (bn.running_var + bn.eps).sqrt()) / scale
    return loss, output


def distill_shape(input_shape: Sequence[int], size: int | None) -> list[int]:
    """One synthetic input's shape: ``input_shape`` (no batch axis) with its spatial side set to ``size``."""
    shape = list(input_shape)
    if size is not None and len(shape) >= 2:
        shape[-2:] = [size, size]
    return shape


def distill_data(
    model: nn.Module,
    input_shape: Sequence[int],
    config: DistillConfig = DistillConfig(),
    progress: bool = False,
) -> torch.Tensor:
    """``config.count`` synthetic inputs of shape ``input_shape`` (without the batch axis; the
    spatial side replaced by ``config.size`` when given) whose BatchNorm batch statistics match
    ``model``'s running statistics (and, with ``config.labels``, that ``model`` classifies as
    ``label_targets``). The model is used in eval mode and left unchanged."""
    shape = distill_shape(input_shape, config.size)
    if (config.jitter or config.flip) and len(shape) != 3:
        raise QuantizationError(f"DistillConfig jitter/flip shift and mirror images (C, H, W); the model's input "
                                f"is {tuple(shape)}")
    if torch.device(config.device) != next(model.parameters()).device:
        import copy

        model = copy.deepcopy(model).to(config.device)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():  # also when called under no_grad / inference_mode
            return _optimise(model, shape, config, progress)
    finally:
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)


def _optimise(model: nn.Module, shape: list[int], config: DistillConfig, progress: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(config.seed)
    augment = torch.Generator().manual_seed(config.seed + 1)
    targets = _targets(model, shape, config) if config.labels else None
    out = []
    for start in range(0, config.count, config.batch_size):
        n = min(config.batch_size, config.count - start)
        x = torch.randn(n, *shape, generator=generator).to(config.device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=config.lr, betas=tuple(config.betas))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
        steps = tqdm(range(config.steps), desc="zeroq", disable=not progress, leave=False)
        for _ in steps:
            opt.zero_grad(set_to_none=True)
            loss, output = _bn_loss_and_output(model, _augmented(x, config, augment))
            if targets is not None:
                loss = loss + config.labels * F.cross_entropy(output, targets[start:start + n])
            loss.backward()
            opt.step()
            sched.step()
            if config.input_range is not None:
                with torch.no_grad():
                    x.clamp_(*config.input_range)
            steps.set_postfix(loss=f"{float(loss.detach()):.3f}")
        log.info("distilled %d inputs, objective %.4f", n, float(loss.detach()))
        out.append(x.detach().cpu())
    return torch.cat(out)


def class_count(model: nn.Module, input_shape: Sequence[int], device: str = "cpu") -> int | None:
    """How many class logits ``model`` outputs for one input of ``input_shape`` (no batch axis),
    or None when its output is not (N, classes): what ``DistillConfig.labels`` needs. Runs in
    eval mode (no BatchNorm statistics move) and leaves the model's mode as it was."""
    return _classes(_probe(model, input_shape, device))


def _probe(model: nn.Module, input_shape: Sequence[int], device: str) -> object:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)


def _classes(output: object) -> int | None:
    if isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] >= 2:
        return int(output.shape[1])
    return None


def _targets(model: nn.Module, shape: list[int], config: DistillConfig) -> torch.Tensor:
    """label_targets() for the number of classes ``model`` outputs (refused unless it outputs (N, classes))."""
    output = _probe(model, shape, config.device)
    classes = _classes(output)
    if classes is None:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise QuantizationError(f"DistillConfig(labels={config.labels}) needs a classifier that outputs (N, classes) "
                                f"logits; {type(model).__name__} outputs {got}")
    return label_targets(config, classes).to(config.device)


def _augmented(x: torch.Tensor, config: DistillConfig, generator: torch.Generator) -> torch.Tensor:
    """DeepInversion's per-step view of the image batch: a random circular shift and a random flip."""
    if config.jitter:
        dy, dx = torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if config.flip and float(torch.rand((), generator=generator)) < 0.5:
        x = x.flip(-1)
    return x
