"""Sparsity: exact zero counts, the storage encodings' byte arithmetic, and the round trip."""

import math

import numpy as np
import pytest
import torch

from lastbit.frontend import from_torch
from lastbit.passes.quantize_pow2 import QuantizePow2
from lastbit.passes.sparsity import (
    Encoding,
    Sparsify,
    SparsityError,
    best_encoding,
    decode_rle,
    encode_rle,
    magnitude_mask,
    rle_entries,
    storage_table,
)
from lastbit.squeeze import Squeeze


def test_magnitude_mask_zeroes_exactly_the_smallest():
    w = np.array([0.5, -0.1, 2.0, 0.05, -3.0, 0.2], np.float32)
    keep = magnitude_mask(w, 0.5)
    assert keep.tolist() == [True, False, True, False, True, False]
    # a small weight with a large gradient survives once the gradient counts
    g = np.array([0.0, 100.0, 0.0, 0.0, 0.0, 0.0])
    assert magnitude_mask(w, 0.5, g)[1]
    with pytest.raises(SparsityError, match="1.0"):
        magnitude_mask(w, 1.0)


def test_rle_entry_count_by_hand():
    # nonzeros at 0, 3 and 20 with k=2 (gaps up to 3 per entry): gaps 0, 2, 16 -> 1 + 1 + (1 + 16 // 4)
    pattern = np.zeros(25, bool)
    pattern[[0, 3, 20]] = True
    assert rle_entries(pattern, 2) == 1 + 1 + 5
    assert rle_entries(np.zeros(7, bool), 3) == 0


@pytest.mark.parametrize("seed", range(4))
def test_rle_round_trip_and_size(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    value_bits, index_bits = int(rng.integers(1, 5)), int(rng.integers(1, 9))
    symbols = rng.integers(1, 1 << value_bits, n) * (rng.random(n) < rng.uniform(0.02, 0.6))
    data = encode_rle(symbols, value_bits, index_bits)
    assert len(data) == math.ceil(rle_entries(symbols != 0, index_bits) * (index_bits + value_bits) / 8)
    np.testing.assert_array_equal(decode_rle(data, n, value_bits, index_bits), symbols)


def test_best_encoding_picks_the_cheapest():
    dense = np.arange(1, 101)
    assert best_encoding(dense, 3) == Encoding("dense", 300)
    sparse = np.zeros(1000, int)
    sparse[::10] = 1  # 90% sparse, regular gaps of 9
    enc = best_encoding(sparse, 3)
    # k=4 holds a gap of 9 in one entry: 100 entries of 7 bits beat the bitmap's 1000 + 300 bits
    assert enc == Encoding("rle", 100 * 7, 4)
    assert enc.size_bytes == 88


def test_sparsity_and_pow2_codes_compress_together(small_cnn):
    model, x = small_cnn
    graph = from_torch(model, (x,))
    sparse = Sparsify(0.9)(graph)
    w = sparse.params["p_conv2_weight"]
    assert (w == 0).sum() == math.floor(0.9 * w.size)
    quantized = QuantizePow2(Squeeze(bits=3, keep_first_last=False))(sparse)
    codes = quantized.params["p_conv2_weight.codes"]
    assert (codes[w == 0] == 0).all()  # zero stays code 0
    table = {t.param: t for t in storage_table(quantized)}
    conv2 = table["p_conv2_weight.codes"]
    assert conv2.value_bits == 3 and conv2.nonzero <= codes.size - math.floor(0.9 * codes.size)
    assert conv2.size_bytes == best_encoding(codes, 3).size_bytes + quantized.params["p_conv2_weight.alpha"].nbytes
    assert conv2.size_bytes < math.ceil(codes.size * 3 / 8)  # beats the dense 3-bit packing
    assert table["p_conv1_bias"].value_bits == 32


def test_gradient_boost_uses_the_torch_module(small_mlp, one_thread):
    model, x = small_mlp
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((128, 32)).astype(np.float32), rng.integers(0, 10, 128))
    graph = from_torch(model, (x,))
    plain = Sparsify(0.5)(graph)
    boosted = Sparsify(0.5, torch_module=model, data=data)(graph)
    for name in ("p_fc1_weight", "p_fc2_weight"):
        assert (boosted.params[name] == 0).sum() == (plain.params[name] == 0).sum()
    assert not np.array_equal(plain.params["p_fc1_weight"] == 0, boosted.params["p_fc1_weight"] == 0)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    torch.testing.assert_close(model.fc1.weight, torch.from_numpy(graph.params["p_fc1_weight"]))
