"""Training helper and weight cache, on sklearn's 8×8 digits (seconds)."""

import numpy as np
import pytest
import torch
from torch import nn

from lastbit.frontend import datasets, training


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "weights"
    monkeypatch.setenv(training.CACHE_ENV, str(path))
    return path


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_model_learns_digits():
    model = training.train_classifier(tiny_net(), datasets.digits("train"), epochs=10, lr=3e-3,
                                      batch_size=32, seed=0, progress=False)
    assert not model.training
    assert training.evaluate(model, datasets.digits("test")) > 0.85


def test_training_is_reproducible_and_sgd_works():
    data = datasets.digits("train")
    a = training.train_classifier(tiny_net(), data, epochs=1, seed=1, progress=False)
    b = training.train_classifier(tiny_net(), data, epochs=1, seed=1, progress=False)
    assert _same_weights(a, b)
    c = training.train_classifier(tiny_net(), data, epochs=1, seed=2, progress=False)
    assert not _same_weights(a, c)
    sgd = training.train_classifier(tiny_net(), data, epochs=3, lr=0.05, seed=0, optimizer="sgd", progress=False)
    assert training.evaluate(sgd, data) > 0.5
    with pytest.raises(ValueError, match="optimizer"):
        training.train_classifier(tiny_net(), data, optimizer="lbfgs")


def test_evaluate_restores_mode():
    model = tiny_net().train()
    x = np.zeros((3, 1, 8, 8), np.float32)
    acc = training.evaluate(model, (x, np.array([0, 1, 2])), batch_size=2)
    assert model.training and 0.0 <= acc <= 1.0


def test_cache_round_trip_without_retraining(cache, monkeypatch):
    first = training.cached_trained("tiny", tiny_net, "digits", epochs=2, progress=False)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("tiny-digits-e2-") and files[0].endswith(".pt")

    monkeypatch.setattr(training, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    second = training.cached_trained("tiny", tiny_net, "digits", epochs=2, progress=False)
    assert _same_weights(first, second) and not second.training
    assert not _same_weights(second, tiny_net())


def test_cache_key_tracks_architecture_and_recipe():
    wide = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 65), nn.ReLU(), nn.Linear(65, 10))  # noqa: E731
    base = training.cached_weights_path("m", tiny_net(), "digits", 1)
    assert training.cached_weights_path("m", wide(), "digits", 1) != base
    assert training.cached_weights_path("m", tiny_net(), "digits", 2) != base
    assert training.cached_weights_path("m", tiny_net(), "mnist5k", 1) != base
    assert training.cached_weights_path("m", tiny_net(), "digits", 1, lr=0.1) != base
    assert base.parent == training.cache_dir()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(training.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert training.cache_dir() == tmp_path / ".cache" / "lastbit" / "weights"


def test_failed_write_leaves_no_files(cache, monkeypatch):
    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        training._save_atomic({"w": torch.zeros(2)}, cache / "x.pt")
    assert list(cache.iterdir()) == []


def test_corrupt_cache_file_is_retrained_over(cache, caplog):
    model = tiny_net()
    path = training.cached_weights_path("tiny", model, "digits", 1, lr=1e-3, batch_size=128, seed=0, optimizer="adam")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    trained = training.cached_trained("tiny", tiny_net, "digits", epochs=1, progress=False)
    assert "unreadable cached weights" in caplog.text
    assert _same_weights(trained, training.cached_trained("tiny", tiny_net, "digits", epochs=1, progress=False))
    assert [p.name for p in cache.iterdir()] == [path.name]
