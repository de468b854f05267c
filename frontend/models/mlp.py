"""Dense-only models: a transformer FFN stack (matmul-bound) and an MLP classifier for 28×28 images."""

from __future__ import annotations

import torch
from torch import nn


class FFNBlock(nn.Module):
    """Pre-norm transformer feed-forward block: x + W2·GELU(W1·LayerNorm(x))."""

    def __init__(self, d_model: int = 512, expansion: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, expansion * d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(expansion * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TransformerFFN(nn.Module):
    """``depth`` FFN blocks on (batch, tokens, d_model) activations; default input (1, 64, 512)."""

    def __init__(self, d_model: int = 512, depth: int = 2, expansion: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*[FFNBlock(d_model, expansion) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MLPClassifier(nn.Module):
    """784 → 512 → 256 → 10 with ReLU; takes N×1×28×28 images (flattened inside) or N×784."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (512, 256), num_classes: int = 10):
        super().__init__()
        sizes = (in_features, *hidden)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def transformer_ffn(d_model: int = 512, depth: int = 2) -> TransformerFFN:
    """Two pre-norm FFN blocks, d_model 512, hidden 2048."""
    return TransformerFFN(d_model=d_model, depth=depth)


def mlp_classifier(num_classes: int = 10) -> MLPClassifier:
    """The 784-512-256-10 MLP for Fashion-MNIST / MNIST."""
    return MLPClassifier(num_classes=num_classes)
