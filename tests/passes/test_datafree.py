"""The data-free squeeze step end to end: Squeeze(datafree=DataFree(...)) through lastbit.compile."""

import numpy as np
import pytest
import torch
from dfq_models import tiny_net

import lastbit
from lastbit.passes.datafree import DataFree
from lastbit.passes.pow2_projection import QuantizationError

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = "x86_64-linux-gnu"


def test_datafree_compiles_exactly_and_beats_plain_projection():
    net = tiny_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    held_out = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = net(held_out).numpy()
    options = DataFree(synthetic=16, synthetic_steps=30, depthwise_int8=0.0)
    squeezed = lastbit.compile(net, TARGET, (x,), squeeze=lastbit.Squeeze(codes="ternary", datafree=options,
                                                                           integer_kernels=False))
    plain = lastbit.compile(net, TARGET, (x,), squeeze=lastbit.Squeeze(codes="ternary", integer_kernels=False))
    quant = {info.source_name: info for info in squeezed.graph.quant.values()}
    assert quant["dw.weight"].code_set == "int8"  # threshold 0: every depthwise conv on int8
    assert quant["expand.weight"].code_set == "ternary" and quant["project.weight"].code_set == "ternary"
    assert all(info.exact for info in quant.values())  # the rewrite recovered the corrected codes as they were
    assert not any("bn" in name for name in squeezed.graph.source_names.values())  # BatchNorm folded
    assert squeezed.report().notes == ["data-free calibration on 16 synthetic DeepInversion images (unclamped: no "
                                       "input range given): 4 BN folded, 2 conv pair(s) equalized, bias correction "
                                       "+ GPTQ codes, 1 depthwise layer(s) int8"]
    assert plain.report().notes == []

    def run(artifact):
        return np.concatenate([artifact.run(held_out[i:i + 4].numpy()) for i in range(0, len(held_out), 4)])

    err_datafree = float(np.mean((run(squeezed) - ref) ** 2))
    err_plain = float(np.mean((run(plain) - ref) ** 2))
    assert err_datafree < 0.5 * err_plain


def test_datafree_options_are_checked():
    with pytest.raises(QuantizationError, match="synthetic"):
        DataFree(synthetic=-1)
    with pytest.raises(QuantizationError, match="depthwise_int8"):
        DataFree(depthwise_int8=2.0)
    with pytest.raises(QuantizationError, match="synthetic_labels"):
        DataFree(synthetic_labels=-0.5)
    with pytest.raises(QuantizationError, match="synthetic_range"):
        DataFree(synthetic_range=(1.0, 1.0))
    with pytest.raises(QuantizationError, match="synthetic_batch"):
        DataFree(synthetic_batch=0)
    with pytest.raises(QuantizationError, match="synthetic_lr"):
        DataFree(synthetic_lr=float("nan"))
    with pytest.raises(QuantizationError, match="requantize"):
        DataFree(requantize="asym")
    with pytest.raises(QuantizationError, match="DataFree"):
        lastbit.Squeeze(bits=3, datafree={"equalize": True})
    with pytest.raises(QuantizationError, match="prune"):
        lastbit.Squeeze(bits=3, datafree=DataFree(), prune=0.5)
    # labelled data would mean ADMM under "auto"; with datafree it stays data-free
    data = (np.zeros((8, 3, 8, 8), "float32"), np.zeros(8, "int64"))
    assert lastbit.Squeeze(bits=3, data=data, datafree=DataFree()).resolved_mode(True) == "data-free"


def test_deepinversion_calibration_reaches_the_pass():
    """synthetic_labels / synthetic_range reach the distillation: the calibration images stay in
    range and the model spreads them over classes as the seeded targets ask."""
    from lastbit.frontend import from_torch
    from lastbit.passes.datafree import DataFreeQuantize, DataFreeState
    from lastbit.passes.zeroq import DistillConfig, label_targets

    net = tiny_net()
    x = torch.zeros(1, 3, 8, 8)
    options = DataFree(synthetic=12, synthetic_steps=40, synthetic_labels=20.0, synthetic_range=(-2.0, 3.0))
    state = DataFreeState()
    squeeze = lastbit.Squeeze(codes="ternary", datafree=options, integer_kernels=False)
    DataFreeQuantize(squeeze, net, state)(from_torch(net, (x,), name="tiny"))
    calib = torch.from_numpy(state.calibration)
    assert calib.shape == (12, 3, 8, 8) and calib.min() >= -2.0 and calib.max() <= 3.0
    with torch.no_grad():
        predicted = net(calib).argmax(1)
    targets = label_targets(DistillConfig(count=12), 10)
    assert float((predicted == targets).float().mean()) >= 0.5 and len(set(predicted.tolist())) >= 4


def test_deepinversion_falls_back_to_zeroq_for_a_non_classifier(caplog):
    """The default synthetic_labels needs class logits; a feature extractor gets plain ZeroQ images
    and a warning naming the model, not an error."""
    from lastbit.frontend import from_torch
    from lastbit.passes.datafree import DataFreeQuantize, DataFreeState

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 1)).eval()
    state = DataFreeState()
    squeeze = lastbit.Squeeze(codes="ternary", datafree=DataFree(synthetic=4, synthetic_steps=3), integer_kernels=False)
    with caplog.at_level("WARNING", logger="lastbit.passes.datafree"):
        graph = DataFreeQuantize(squeeze, net, state)(from_torch(net, (torch.zeros(1, 3, 8, 8),), name="features"))
    assert state.calibration.shape == (4, 3, 8, 8)
    assert graph.notes[0].startswith("data-free calibration on 4 synthetic ZeroQ images")  # what it fell back to
    assert "features does not output (N, classes)" in caplog.text
    assert not net.training


def test_default_deepinversion_on_vector_inputs_skips_image_augmentation():
    """An MLP classifier gets the class pull but no image shifts or flips (which would scramble features)."""
    from lastbit.frontend import from_torch
    from lastbit.passes.datafree import DataFreeQuantize, DataFreeState

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 4)).eval()
    state = DataFreeState()
    squeeze = lastbit.Squeeze(codes="ternary", datafree=DataFree(synthetic=6, synthetic_steps=3), integer_kernels=False)
    DataFreeQuantize(squeeze, net, state)(from_torch(net, (torch.zeros(2, 8),), name="mlp"))
    assert state.calibration.shape == (6, 8)
