"""Built-in model zoo, defined in torch (torchvision does not import beside torch 2.13).

``get_model("resnet20")`` returns ``(module, example_input)``.  Randomly initialised models
are seeded, so two builds have identical weights.  The 28×28 models (lenet5, resnet20, mlp)
are "pretrained" by training them on Fashion-MNIST once and caching the weights (see
``lastbit.frontend.training.cached_trained``); EfficientNet-Lite0 ships ImageNet weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

ZOO_SEED = 0  # the seed of every randomly initialised zoo model and example input
CALIBRATION_BATCH = 4


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: how to build it, what it takes, and where trained weights come from.

    ``build()`` returns a seeded, randomly initialised model in eval mode (BatchNorm
    statistics calibrated, see ``calibrate_batchnorm``).  ``pretrained``
    says whether trained weights exist: shipped (``dataset`` None) or trained on demand on
    ``dataset`` for ``train_epochs`` and cached. ``input_range`` (low, high): the range the
    model's real inputs span after its preprocessing (None: unknown, e.g. random-init models),
    which data-free calibration clamps its synthetic images to.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    dataset: str | None = None
    pretrained: bool = False
    train_epochs: int = 0
    input_range: tuple[float, float] | None = None


def _seeded(factory: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            torch.manual_seed(ZOO_SEED)
            model = factory()
            calibrate_batchnorm(model, (CALIBRATION_BATCH, *input_shape[1:]))
            return model.eval()

    build.__name__ = build.__qualname__ = f"build_{getattr(factory, '__name__', 'model')}"
    build.__doc__ = factory.__doc__
    return build


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch_shape: tuple[int, ...], seed: int = ZOO_SEED + 1) -> nn.Module:
    """Set every BatchNorm's running statistics from one forward pass of seeded uniform inputs.

    Freshly initialised BN layers hold mean 0 / variance 1, so in eval mode they pass
    activations through unnormalised and a random deep net's output drifts to ~1e-9
    (MobileNetV2) or blows up; with calibrated statistics every layer sees roughly unit-scale
    activations, as in a trained network, which keeps random-weight fidelity tests meaningful.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    try:
        model(torch.rand(batch_shape, generator=torch.Generator().manual_seed(seed)))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model


def _lenet5() -> nn.Module:
    from .lenet import lenet5

    return lenet5()


def _resnet20() -> nn.Module:
    from .resnet import resnet20

    return resnet20()


def _resnet8() -> nn.Module:
    from .resnet_small import resnet8

    return resnet8()


def _resnet18() -> nn.Module:
    from .resnet import resnet18

    return resnet18()


def _mobilenetv2() -> nn.Module:
    from .mobilenet import mobilenetv2

    return mobilenetv2()


def _vgg11() -> nn.Module:
    from .vgg import vgg11_bn

    return vgg11_bn()


def _mlp() -> nn.Module:
    from .mlp import mlp_classifier

    return mlp_classifier()


def _ffn() -> nn.Module:
    from .mlp import transformer_ffn

    return transformer_ffn()


def _efficientnet_lite0_random() -> nn.Module:
    from .efficientnet import efficientnet_lite0

    return efficientnet_lite0(pretrained=False)


def _entry(name: str, factory: Callable[[], nn.Module], input_shape: tuple[int, ...], description: str,
           dataset: str | None = None, pretrained: bool = False, train_epochs: int = 0,
           input_range: tuple[float, float] | None = None) -> ZooEntry:
    if dataset is not None and input_range is None:
        input_range = (0.0, 1.0)  # the built-in datasets' pixels, scaled by 1/255
    return ZooEntry(name, _seeded(factory, input_shape), input_shape, description, dataset, pretrained, train_epochs,
                    input_range)


def _efficientnet_range() -> tuple[float, float]:
    from .efficientnet import TF_MEAN_RGB, TF_STD_RGB

    return ((0.0 - TF_MEAN_RGB[0]) / TF_STD_RGB[0], (1.0 - TF_MEAN_RGB[0]) / TF_STD_RGB[0])


# Training on first use (Fashion-MNIST, 2 shared cores): lenet5 ~1 min (5 × ~12 s),
# mlp ~15 s, resnet20 ~8 min (2 × ~4 min), resnet8 ~1.5 min (estimated: a third of resnet20's
# MACs, not yet timed on a quiet machine); later calls load the cached weights.
_ENTRIES = (
    _entry("lenet5", _lenet5, (1, 1, 28, 28), "LeNet-5 (conv-pool-conv-pool-fc×3), 61.7k params",
           dataset="fashion-mnist", pretrained=True, train_epochs=5),
    _entry("resnet20", _resnet20, (1, 1, 28, 28),
           "ResNet-20 (CIFAR-style, 16/32/64 channels, BN, 1×1 shortcuts), 0.27M params",
           dataset="fashion-mnist", pretrained=True, train_epochs=2),
    _entry("resnet8", _resnet8, (1, 1, 28, 28),
           "ResNet-8 (ResNet-20's blocks, one per stage, 16/32/64 channels), 78k params",
           dataset="fashion-mnist", pretrained=True, train_epochs=1),
    _entry("mlp", _mlp, (1, 1, 28, 28), "MLP classifier 784-512-256-10, 0.54M params",
           dataset="fashion-mnist", pretrained=True, train_epochs=5),
    _entry("resnet18", _resnet18, (1, 3, 224, 224), "ResNet-18 (ImageNet layout), 11.7M params, random init"),
    _entry("mobilenetv2", _mobilenetv2, (1, 3, 224, 224),
           "MobileNetV2 width 1.0 (depthwise convs, ReLU6), 3.5M params, random init"),
    _entry("vgg11", _vgg11, (1, 3, 224, 224),
           "VGG-11 with BatchNorm, 132.9M params (93% in the fc layers), random init"),
    _entry("ffn", _ffn, (1, 64, 512),
           "2 pre-norm transformer FFN blocks (LayerNorm, 512→2048→512, GELU, residual), 4.2M params"),
    _entry("efficientnet-lite0", _efficientnet_lite0_random, (1, 3, 224, 224),
           "EfficientNet-Lite0 (ReLU6, no SE), 4.65M params, ImageNet-pretrained", pretrained=True,
           input_range=_efficientnet_range()),
)

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in _ENTRIES}


def get_model(name: str, pretrained: bool = True, progress: bool = True,
              train_epochs: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model in eval mode and an example input of its ``input_shape``.

    ``pretrained=True`` loads trained weights where the entry has them (training and
    caching the 28×28 models on first use: up to minutes, see ``_ENTRIES``); otherwise, and for the
    entries without weights, the seeded random initialisation. ``train_epochs`` trains (or loads)
    a dataset entry for that many epochs of its recipe instead of the entry's.  The example input is a
    seeded uniform [0, 1) tensor (standard normal for ``ffn``), or for EfficientNet-Lite0
    the preprocessed scikit-image cat photo.
    """
    entry = ZOO.get(name)
    if entry is None:
        raise LastbitError(f"unknown model '{name}'; known: {', '.join(ZOO)}")
    if train_epochs is not None and (entry.dataset is None or train_epochs < 1):
        raise LastbitError(f"train_epochs={train_epochs!r}: '{name}' "
                           + ("is not trained here" if entry.dataset is None else "needs at least one epoch"))
    if pretrained and entry.pretrained:
        model = _load_trained(entry, progress, train_epochs)
    else:
        if pretrained:
            log.debug("%s has no trained weights; using the seeded random initialisation", name)
        model = entry.build()
    return model.eval(), example_input(name)


def example_input(name: str) -> torch.Tensor:
    """The example input ``get_model`` returns for zoo model ``name``."""
    entry = ZOO.get(name)
    if entry is None:
        raise LastbitError(f"unknown model '{name}'; known: {', '.join(ZOO)}")
    if name == "efficientnet-lite0":
        from .efficientnet import sample_images

        return sample_images(["chelsea"])["chelsea"]
    gen = torch.Generator().manual_seed(ZOO_SEED)
    if name == "ffn":
        return torch.randn(entry.input_shape, generator=gen)
    return torch.rand(entry.input_shape, generator=gen)


def _load_trained(entry: ZooEntry, progress: bool, epochs: int | None = None) -> nn.Module:
    if entry.dataset is None:
        from .efficientnet import efficientnet_lite0

        return efficientnet_lite0(pretrained=True)
    from lastbit.frontend.training import cached_trained

    return cached_trained(entry.name, entry.build, entry.dataset, epochs=epochs or entry.train_epochs,
                          seed=ZOO_SEED, progress=progress)


__all__ = ["ZOO", "ZooEntry", "get_model", "example_input"]
