"""The offline dataset loaders: shapes, dtypes, value and label ranges, fixed splits, clear errors."""

import gzip

import numpy as np
import pytest

from lastbit.errors import LastbitError
from lastbit.frontend import datasets

fashion_installed = pytest.mark.skipif(
    not (datasets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


def _check(arrays, n, shape, num_classes=10):
    images, labels = arrays
    assert images.shape == (n, *shape) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert labels.min() == 0 and labels.max() == num_classes - 1


@fashion_installed
def test_fashion_mnist_test_split():
    arrays = datasets.fashion_mnist("test")
    _check(arrays, 10_000, (1, 28, 28))
    assert np.bincount(arrays.labels).tolist() == [1000] * 10
    assert len(datasets.FASHION_MNIST_CLASSES) == 10


@fashion_installed
def test_fashion_mnist_train_split():
    _check(datasets.load("fashion-mnist", "train"), 60_000, (1, 28, 28))


def test_fashion_mnist_missing_file_names_path_and_package(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(LastbitError, match=r"nowhere/train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        datasets.fashion_mnist("train")


def test_fashion_mnist_reads_idx_headers(tmp_path, monkeypatch):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    label_header = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)

    x, y = datasets.fashion_mnist("test")
    np.testing.assert_array_equal(y, [7, 0, 9])
    np.testing.assert_allclose(x[:, 0] * 255, images.astype(np.float32), atol=1e-4)

    # a label file where an image file should be: wrong magic number
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))
    with pytest.raises(LastbitError, match="magic 2049, expected 2051"):
        datasets.fashion_mnist("test")


def test_mnist5k_split_is_fixed_and_disjoint():
    train, test = datasets.mnist5k("train"), datasets.mnist5k("test")
    _check(train, 4000, (1, 28, 28))
    _check(test, 1000, (1, 28, 28))
    assert np.array_equal(datasets.mnist5k("test").labels, test.labels)
    # the source rows are sorted by label; a shuffled test split has every class
    assert np.bincount(test.labels).min() > 50
    flat_train = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in flat_train for row in test.images)


def test_digits():
    train, test = datasets.digits("train"), datasets.digits("test")
    _check(train, 1438, (1, 8, 8))
    _check(test, 359, (1, 8, 8))
    assert np.array_equal(datasets.load("digits", "test").images, test.images)


def test_bad_names():
    with pytest.raises(LastbitError, match="unknown dataset 'cifar'.*fashion-mnist"):
        datasets.load("cifar")
    with pytest.raises(LastbitError, match="unknown split 'val'"):
        datasets.digits("val")
