"""The model zoo: every entry builds, runs, is reproducible, and exports with torch.export."""

import functools

import pytest
import torch

from lastbit.errors import LastbitError
from lastbit.frontend import training
from lastbit.frontend.models import ZOO, calibrate_batchnorm, example_input, get_model

OUTPUT_SHAPES = {
    "lenet5": (1, 10),
    "resnet20": (1, 10),
    "resnet8": (1, 10),
    "mlp": (1, 10),
    "resnet18": (1, 1000),
    "mobilenetv2": (1, 1000),
    "vgg11": (1, 1000),
    "ffn": (1, 64, 512),
    "efficientnet-lite0": (1, 1000),
}
PARAM_COUNTS = {  # the published sizes: a wrong layer shows up here first
    "lenet5": 61_706,
    "resnet18": 11_689_512,
    "mobilenetv2": 3_504_872,
    "vgg11": 132_868_840,
    "efficientnet-lite0": 4_652_008,
}
SMALL = ["lenet5", "resnet20", "mlp", "ffn"]
LARGE = ["resnet18", "mobilenetv2", "vgg11", "efficientnet-lite0"]


@functools.cache
def _zoo_model(name):
    """One seeded build per model for the tests that only read it (vgg11 takes seconds)."""
    return get_model(name, pretrained=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(training.CACHE_ENV, str(tmp_path / "cache"))


def test_zoo_names():
    assert set(ZOO) == set(OUTPUT_SHAPES)
    for name, entry in ZOO.items():
        assert entry.name == name and entry.description
        assert entry.input_shape[0] == 1
        assert (entry.dataset is not None) <= entry.pretrained


@pytest.mark.parametrize("name", list(OUTPUT_SHAPES))
def test_builds_runs_and_is_deterministic(name):
    state = torch.random.get_rng_state()
    model, x = _zoo_model(name)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not consume the global RNG"
    assert not model.training
    assert tuple(x.shape) == ZOO[name].input_shape
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == OUTPUT_SHAPES[name]
    assert torch.isfinite(y).all() and y.std() > 1e-3, "random model output collapsed"
    if name in PARAM_COUNTS:
        assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]

    again, x2 = get_model(name, pretrained=False)
    assert torch.equal(x, x2)
    reference = model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in again.state_dict().items())


@pytest.mark.parametrize("name", list(OUTPUT_SHAPES))
def test_torch_export(name):
    model, x = _zoo_model(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("name", SMALL + [pytest.param(n, marks=pytest.mark.slow) for n in LARGE])
def test_imports_into_tvm(name):
    from lastbit.frontend.torch_import import from_torch

    model, x = _zoo_model(name)
    graph = from_torch(model, (x,), name=name)
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.inputs[0].shape == tuple(x.shape)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(LastbitError, match="unknown model 'resnet1000'.*lenet5"):
        get_model("resnet1000")
    with pytest.raises(LastbitError, match="unknown model"):
        example_input("nope")


def test_pretrained_small_model_loads_cached_weights(monkeypatch):
    entry = ZOO["lenet5"]
    trained = entry.build()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    path = training.cached_weights_path("lenet5", trained, entry.dataset, entry.train_epochs,
                                        lr=1e-3, batch_size=128, seed=0, optimizer="adam")
    training._save_atomic(trained.state_dict(), path)

    def no_training(*args, **kwargs):
        raise AssertionError("must load from the cache, not train")

    monkeypatch.setattr(training, "train_classifier", no_training)
    model, x = get_model("lenet5", pretrained=True)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_train_epochs_loads_that_recipe_and_refuses_what_it_cannot_train(monkeypatch):
    """train_epochs asks the cache for the entry's recipe at that many epochs (its own file), and
    is one error naming the model where the entry is not trained here or the count is not positive."""
    asked = []
    monkeypatch.setattr(training, "cached_trained", lambda name, build, dataset, epochs, **kw: asked.append(
        (name, dataset, epochs, kw["seed"])) or build())
    get_model("lenet5", train_epochs=7)
    get_model("lenet5")
    assert asked == [("lenet5", "fashion-mnist", 7, 0), ("lenet5", "fashion-mnist", ZOO["lenet5"].train_epochs, 0)]
    with pytest.raises(LastbitError, match="train_epochs=3: 'resnet18' is not trained here"):
        get_model("resnet18", train_epochs=3)
    with pytest.raises(LastbitError, match="train_epochs=0: 'lenet5' needs at least one epoch"):
        get_model("lenet5", train_epochs=0)


def test_pretrained_false_never_trains(monkeypatch):
    monkeypatch.setattr(training, "cached_trained", lambda *a, **k: pytest.fail("trained"))
    get_model("mlp", pretrained=False)


def test_calibrate_batchnorm_normalises_activations():
    model = ZOO["resnet20"].build()
    stem = model.bn1
    assert stem.running_var.min() > 0 and not torch.allclose(stem.running_var, torch.ones_like(stem.running_var))
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}, "calibration must restore the momentum"
    plain = torch.nn.Linear(3, 3)
    assert calibrate_batchnorm(plain, (2, 3)) is plain


def test_efficientnet_pretrained_classifies_sample_photos():
    from lastbit.frontend.models.efficientnet import EXPECTED_CLASSES, sample_images, top_k

    model, x = get_model("efficientnet-lite0", pretrained=True)
    images = sample_images(["chelsea", "coffee"])
    assert torch.equal(images["chelsea"], x)
    with torch.no_grad():
        for name, image in images.items():
            assert image.shape == (1, 3, 224, 224)
            (best, prob), *_ = top_k(model(image))
            assert best == EXPECTED_CLASSES[name], f"{name}: {best} ({prob:.2f})"


def test_augmented_samples_are_seeded():
    from lastbit.frontend.models.efficientnet import augmented_samples

    a = augmented_samples(6, seed=3)
    assert a.shape == (6, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, augmented_samples(6, seed=3))
    assert not torch.equal(a, augmented_samples(6, seed=4))


def test_held_out_samples_load_and_are_not_the_fidelity_photos():
    """The held-out photos come from three packages, are RGB, and none is one the fidelity crops use."""
    from lastbit.frontend.models import efficientnet as E

    assert not set(E.HELD_OUT_SAMPLES) & set(E.COLOR_SAMPLES + E.GRAY_SAMPLES)
    for name in E.HELD_OUT_SAMPLES:
        image = E._load_sample(name)
        assert image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 224, name
    x = E.augmented_samples(3, seed=0, names=E.HELD_OUT_SAMPLES)
    assert x.shape == (3, 3, 224, 224) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="'pillow:x'"):
        E._load_sample("pillow:x")
