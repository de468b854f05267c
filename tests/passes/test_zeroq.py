"""ZeroQ distilled data: its BatchNorm statistics match the model's running ones far better
than the random noise it starts from."""

import pytest
import torch
from dfq_models import tiny_net
from torch import nn

from lastbit.passes.pow2_projection import QuantizationError
from lastbit.passes.zeroq import DistillConfig, bn_statistics_loss, distill_data, label_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distilled_data_matches_bn_statistics():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = DistillConfig(count=24, steps=60, batch_size=12, seed=3)
    x = distill_data(net, (3, 8, 8), config)
    assert x.shape == (24, 3, 8, 8) and torch.isfinite(x).all()
    noise = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        distilled_loss, noise_loss = bn_statistics_loss(net, x[:12]), bn_statistics_loss(net, noise[:12])
    assert distilled_loss < 0.3 * noise_loss
    # the model is left as it was: eval mode, same weights and statistics, trainable parameters
    assert not net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # deterministic for a seed; the size option changes the spatial side
    again = distill_data(net, (3, 8, 8), DistillConfig(count=4, steps=3, batch_size=4, seed=3))
    assert torch.equal(again, distill_data(net, (3, 8, 8), DistillConfig(count=4, steps=3, batch_size=4, seed=3)))
    assert distill_data(net, (3, 8, 8), DistillConfig(count=2, steps=1, size=6)).shape == (2, 3, 6, 6)


def test_model_without_batchnorm_is_refused():
    with pytest.raises(QuantizationError, match="no BatchNorm"):
        distill_data(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (3, 8, 8), DistillConfig(count=2, steps=1))


def small_classifier(seed: int = 0) -> nn.Module:
    """conv+BN+ReLU → pool → 4 logits, BN statistics from a few batches of noise."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(10):
            net(torch.randn(32, 3, 8, 8, generator=gen))
    return net.eval()


def test_labelled_distillation_is_classified_as_its_targets():
    """DeepInversion's cross-entropy term: the images land in their seeded target classes, which
    BatchNorm statistics alone do not do; jitter, flip and the input range keep it deterministic."""
    net = small_classifier()
    plain = DistillConfig(count=20, steps=120, batch_size=10, seed=5, lr=0.1)
    config = DistillConfig(count=20, steps=120, batch_size=10, seed=5, lr=0.1, labels=10.0, jitter=1, flip=True,
                           input_range=(-4.0, 4.0), betas=(0.5, 0.9))
    x = distill_data(net, (3, 8, 8), config)
    targets = label_targets(config, 4)
    assert targets.shape == (20,) and set(targets.tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        hits = float((net(x).argmax(1) == targets).float().mean())
        plain_hits = float((net(distill_data(net, (3, 8, 8), plain)).argmax(1) == targets).float().mean())
    assert hits >= 0.9 and plain_hits < 0.5, (hits, plain_hits)
    assert x.min() >= -4.0 and x.max() <= 4.0 and (x.abs() == 4.0).any()  # clamped, and the clamp was needed
    assert torch.equal(x, distill_data(net, (3, 8, 8), config))


def test_labels_need_a_classifier():
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.body(x)

    with pytest.raises(QuantizationError, match=r"outputs \(1, 4, 6, 6\)"):
        distill_data(Features().eval(), (3, 8, 8), DistillConfig(count=2, steps=1, labels=0.5))


@pytest.mark.parametrize("field, value", [("count", 0), ("steps", -1), ("batch_size", True), ("size", 0), ("lr", 0.0),
                                          ("lr", float("nan")), ("labels", -0.1), ("jitter", -1), ("jitter", 1.5),
                                          ("input_range", (1.0, -1.0)), ("input_range", (0.0,)), ("betas", (0.9, 1.0))])
def test_bad_config_is_refused(field, value):
    with pytest.raises(QuantizationError, match=f"DistillConfig.{field}"):
        DistillConfig(**{field: value})


def test_jitter_and_flip_need_image_inputs():
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with pytest.raises(QuantizationError, match=r"images \(C, H, W\).*\(8,\)"):
        distill_data(net, (8,), DistillConfig(count=2, steps=1, flip=True))
    x = distill_data(net, (8,), DistillConfig(count=4, steps=2, labels=1.0))  # the class pull alone works on vectors
    assert x.shape == (4, 8)
