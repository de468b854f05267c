"""Synthetic calibration images from BatchNorm statistics (ZeroQ "distilled data", Cai et al.,
CVPR 2020): random inputs optimised so that every BatchNorm layer's batch statistics match
its running mean and variance. They stand in for real data wherever the data-free mode needs
activations: bias correction, int8 activation scales.

Plain torch; the model must still have its BatchNorm layers (distil before folding them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lastbit.passes.pow2_projection import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "bn_statistics_loss", "distill_data"]

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
    taps = _BnTaps(model)
    if not taps.norms:
        taps.remove()
        raise QuantizationError(f"{type(model).__name__} has no BatchNorm layer with running statistics to distil data from")
    try:
        model(x)
    finally:
        taps.remove()
    loss = x.new_zeros(())
    for bn, (mean, var) in zip(taps.norms, taps.stats):
        scale = float(mean.numel()) ** 0.5
        loss = loss + torch.linalg.vector_norm(mean - bn.running_mean) / scale
        loss = loss + torch.linalg.vector_norm(var.clamp_min(0).sqrt() - (bn.running_var + bn.eps).sqrt()) / scale
    return loss


def distill_data(
    model: nn.Module,
    input_shape: Sequence[int],
    config: DistillConfig = DistillConfig(),
    progress: bool = False,
) -> torch.Tensor:
    """``config.count`` synthetic inputs of shape ``input_shape`` (without the batch axis; the
    spatial side replaced by ``config.size`` when given) whose BatchNorm batch statistics match
    ``model``'s running statistics. The model is used in eval mode and left unchanged."""
    shape = list(input_shape)
    if config.size is not None and len(shape) >= 2:
        shape[-2:] = [config.size, config.size]
    generator = torch.Generator().manual_seed(config.seed)
    if torch.device(config.device) != next(model.parameters()).device:
        import copy

        model = copy.deepcopy(model).to(config.device)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    try:
        for start in range(0, config.count, config.batch_size):
            n = min(config.batch_size, config.count - start)
            x = torch.randn(n, *shape, generator=generator).to(config.device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=config.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
            steps = tqdm(range(config.steps), desc="zeroq", disable=not progress, leave=False)
            for _ in steps:
                opt.zero_grad(set_to_none=True)
                loss = bn_statistics_loss(model, x)
                loss.backward()
                opt.step()
                sched.step()
                steps.set_postfix(loss=f"{float(loss.detach()):.3f}")
            log.info("distilled %d inputs, BN statistics loss %.4f", n, float(loss.detach()))
            out.append(x.detach().cpu())
    finally:
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out)
