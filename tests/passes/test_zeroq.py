"""ZeroQ distilled data: its BatchNorm statistics match the model's running ones far better
than the random noise it starts from."""

import pytest
import torch
from dfq_models import tiny_net
from torch import nn

from lastbit.passes.pow2_projection import QuantizationError
from lastbit.passes.zeroq import DistillConfig, bn_statistics_loss, distill_data

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
