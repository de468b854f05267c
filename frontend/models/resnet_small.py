"""ResNet-8: the smallest residual net of the zoo (1×28×28), for benchmarks that train many times.

Same structure as ResNet-20 (BasicBlocks with residual adds, BatchNorm, 1×1 conv-BN shortcuts,
global average pooling) with one block per stage instead of three: about a third of ResNet-20's
MACs, so the quantization accuracy table can fine-tune it with a real budget on a 2-core CPU.
"""

from __future__ import annotations

from .resnet import CifarResNet


class ResNet8(CifarResNet):
    """ResNet-8: stem conv + 3 stages × 1 BasicBlock (16/32/64 channels) + fc; 28 → 14 → 7."""

    depth = 8


def resnet8(num_classes: int = 10) -> ResNet8:
    """ResNet-8 for 1×28×28 inputs."""
    return ResNet8(num_classes=num_classes)
