"""The integer path in the compiled graph: quantized layers run as int8 activations × an
integer kernel + the single-multiply epilogue, bit-exact against a numpy re-implementation
of ``codegen/quant_reference.py``; the float reference path still matches torch."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lastbit
from lastbit.codegen import quant_reference as qr
from lastbit.codegen.quant_lowering import (
    FALLBACK_KERNELS,
    KernelChoice,
    LayerEpilogue,
    fold_epilogue,
    kernel_candidates,
)
from lastbit.squeeze import Squeeze
from lastbit.targets import get_target
from tests.conftest import assert_close

HOST = "x86_64-linux-gnu"


# --- numpy folding math (no TVM) -----------------------------------------------------------------


def test_batch_norm_and_bias_fold_into_alpha_and_bias():
    epi = LayerEpilogue(alpha=np.array([0.5, 0.25]))
    epi.add_bias(np.array([1.0, -1.0]))
    epi.batch_norm(gamma=[2.0, -1.0], beta=[0.5, 0.0], mean=[1.0, 2.0], var=[3.0, 0.0], eps=1.0)
    k = np.array([1.0, -1.0])  # gamma / sqrt(var + eps)
    np.testing.assert_allclose(epi.alpha, [0.5, -0.25])
    np.testing.assert_allclose(epi.bias, np.array([1.0, -1.0]) * k + np.array([0.5, 0.0]) - np.array([1.0, 2.0]) * k)
    assert epi.ops == ["bias", "batch_norm"]


def test_negative_channel_scales_flip_the_codes_so_relu_stays_integer():
    codes = np.array([[1, -2], [4, 0], [-1, 1]], np.int8)
    folded, alpha = fold_epilogue(codes, LayerEpilogue(alpha=np.array([0.5, -2.0, 1.0])))
    np.testing.assert_array_equal(folded, [[1, -2], [-4, 0], [-1, 1]])
    np.testing.assert_array_equal(alpha, [0.5, 2.0, 1.0])
    # the float layer α·codes is unchanged per channel
    np.testing.assert_array_equal(folded * alpha[:, None], codes * np.array([0.5, -2.0, 1.0])[:, None])


def test_zero_batch_norm_scale_cannot_fold():
    with pytest.raises(ValueError, match="channel 1"):
        fold_epilogue(np.ones((2, 3), np.int8), LayerEpilogue(alpha=np.array([1.0, 0.0])))


def test_kernel_candidates_follow_the_target_then_the_fallbacks():
    import dataclasses

    aarch64 = get_target("aarch64-linux-gnu")
    for op in ("dense", "conv2d"):
        order = kernel_candidates(aarch64, None, op)
        assert order[: len(aarch64.kernels[op])] == list(aarch64.kernels[op])
        assert all(k in order for k in FALLBACK_KERNELS) and len(order) == len(set(order))
    bare = dataclasses.replace(aarch64, kernels={})
    assert kernel_candidates(bare, None, "dense") == list(FALLBACK_KERNELS) == ["int8", "reference-int"]
    assert kernel_candidates(aarch64, ("reference-int",), "dense") == ["reference-int"]  # override: no fallback


# --- the reference integer kernel, bit-exact on random shapes ------------------------------------


def _run_kernel(layer, x_q, codes):
    import tvm
    from tvm import s_tir

    from lastbit.codegen.kernels import get_kernel

    kernel = get_kernel("reference-int")
    sch = s_tir.Schedule(kernel.prim_func(layer))
    kernel.schedule(sch, layer, frozenset())
    lib = tvm.tirx.build(sch.mod, target="llvm")
    if layer.op == "dense":
        out_shape = (layer.data_shape[0], layer.weight_shape[0])
    else:
        from lastbit.codegen.kernels.reference_int import conv2d_output_hw

        out_shape = (layer.data_shape[0], layer.weight_shape[0], *conv2d_output_hw(layer))
    args = [tvm.runtime.tensor(a) for a in (x_q, *kernel.pack(layer, codes), np.zeros(out_shape, np.int32))]
    lib(*args)
    return args[-1].numpy()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 4), k=st.integers(1, 70), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_reference_int_dense_is_bit_exact(m, k, n, seed):
    from lastbit.codegen.kernels import IntLayer

    rng = np.random.default_rng(seed)
    x_q = rng.integers(-127, 128, (m, k)).astype(np.int8)
    codes = rng.integers(-127, 128, (n, k)).astype(np.int8)
    layer = IntLayer("dense", "int8", 8, (m, k), (n, k))
    np.testing.assert_array_equal(_run_kernel(layer, x_q, codes), qr.int_dense(x_q, codes))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=st.integers(1, 6), o=st.integers(1, 6), hw=st.integers(3, 9), kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2), pad=st.integers(0, 2), dilation=st.integers(1, 2), grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_int_conv2d_is_bit_exact(c, o, hw, kernel, stride, pad, dilation, grouped, seed):
    from lastbit.codegen.kernels import IntLayer

    groups = c if grouped else 1
    o = o * groups if grouped else o
    if hw + 2 * pad < dilation * (kernel - 1) + 1:
        return
    rng = np.random.default_rng(seed)
    x_q = rng.integers(-127, 128, (1, c, hw, hw + 1)).astype(np.int8)
    codes = rng.choice(np.array([-4, -2, -1, 0, 1, 2, 4], np.int8), (o, c // groups, kernel, kernel))
    layer = IntLayer("conv2d", "pow2-4", 3, x_q.shape, codes.shape, (stride, stride), (pad,) * 4,
                     (dilation, dilation), groups)
    expected = qr.int_conv2d(x_q, codes, stride, pad, dilation, groups)
    np.testing.assert_array_equal(_run_kernel(layer, x_q, codes), expected)


# --- whole graphs against a numpy re-implementation of the integer path --------------------------


def _int_layer(x, info, params, op, bias=None, bn=None, relu=False, **conv):
    """One quantized layer as quant_reference defines it (bias and BN folded per channel)."""
    s = qr.activation_scale(x, info.activation_scale)
    x_q = qr.quantize_activation(x, s)
    codes = params[info.codes_param].astype(np.int8)
    alpha = np.broadcast_to(params[info.alpha_param], codes.shape).reshape(codes.shape[0], -1)[:, 0].astype(np.float64)
    b = None if bias is None else np.asarray(bias, np.float64)
    if bn is not None:
        gamma, beta, mean, var, eps = (np.asarray(t, np.float64) for t in bn)
        k = gamma / np.sqrt(var + eps)
        alpha, b = alpha * k, (0.0 if b is None else b) * k + beta - mean * k
    sign = np.where(alpha < 0, -1, 1)
    codes = (codes * sign.reshape(-1, *[1] * (codes.ndim - 1))).astype(np.int8)
    alpha = np.abs(alpha)
    acc = qr.int_conv2d(x_q, codes, **conv) if op == "conv2d" else qr.int_dense(x_q, codes)
    scale = qr.output_scale(alpha, s)
    return qr.epilogue(acc, qr.integer_bias(b, scale, codes.shape[0]), scale, relu)


def _integer_kernel_names() -> set[str]:
    from lastbit.codegen.kernels import list_kernels

    return {k.name for k in list_kernels()}


def _numpy_small_cnn(model, graph, x):
    infos = {i.source_name.removesuffix(".weight"): i for i in graph.quant.values()}
    p = graph.params

    def t(v):
        return v.detach().numpy()

    bn = model.bn1
    bn_terms = (t(bn.weight), t(bn.bias), t(bn.running_mean), t(bn.running_var), bn.eps)
    y1 = _int_layer(x, infos["conv1"], p, "conv2d", bias=t(model.conv1.bias), bn=bn_terms, relu=True, padding=1)
    y2 = _int_layer(y1, infos["conv2"], p, "conv2d", padding=1)
    y = np.maximum(y1 + y2, np.float32(0))
    pooled = y.reshape(1, 8, 4, 2, 4, 2).max(axis=(3, 5)).reshape(1, -1)
    return _int_layer(pooled, infos["fc"], p, "dense", bias=t(model.fc.bias))


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "dynamic"])
def test_small_cnn_integer_path_is_bit_exact_against_numpy(small_cnn, calibrated):
    model, x = small_cnn
    calib = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype("float32") if calibrated else None
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3, data=calib))
    assert {layer.name for layer in art.report().layers} == {"conv1", "conv2", "fc"}
    assert {layer.kernel for layer in art.report().layers} <= _integer_kernel_names()  # whichever the target picks
    assert all((i.activation_scale is not None) == calibrated for i in art.graph.quant.values())
    expected = _numpy_small_cnn(model, art.graph, x.numpy())
    np.testing.assert_array_equal(art.run(x), expected)
    with torch.no_grad():
        assert_close(expected, model(x).numpy(), rtol=0.2)  # 3-bit weights, int8 activations: close, not equal


def _dense_3d_graph():
    """relu(x[2, 3, 12] @ wᵀ + b): a rank-3 matmul, as the ONNX importer emits for MatMul."""
    from tvm import relax

    from lastbit.graph import Graph, TensorSpec

    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((16, 12)).astype("float32"), "b": rng.standard_normal(16).astype("float32")}
    x = relax.Var("x", relax.TensorType((2, 3, 12), "float32"))
    w = relax.Var("w", relax.TensorType((16, 12), "float32"))
    b = relax.Var("b", relax.TensorType((16,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0]))))
            out = bb.emit_output(relax.op.nn.relu(bb.emit(relax.op.add(y, b))))
        bb.emit_func_output(out)
    return Graph(bb.get(), params, [TensorSpec("x", (2, 3, 12))], name="dense3d"), params


def test_rank3_dense_input_is_flattened_around_the_kernel():
    graph, params = _dense_3d_graph()
    calib = np.random.default_rng(4).standard_normal((4, 3, 12)).astype("float32")
    art = lastbit.compile(graph, HOST, squeeze=Squeeze(bits=2, keep_first_last=False, data=calib))
    (info,) = art.graph.quant.values()
    x = np.random.default_rng(5).standard_normal((2, 3, 12)).astype("float32")
    expected = _int_layer(x.reshape(6, 12), info, art.graph.params, "dense", bias=params["b"], relu=True)
    np.testing.assert_array_equal(art.run(x), expected.reshape(2, 3, 16))
    (choice,) = art._compiled.kernels.values()
    assert choice.kernel in _integer_kernel_names() and choice.epilogue == ("bias", "relu")


def test_epilogue_stays_its_own_function_so_no_fma_can_change_it(small_cnn):
    model, x = small_cnn
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3))
    script = art.mod["main"].script(show_meta=False)
    # the epilogue is its own function, or inside a fused kernel (int8-vnni-conv on VNNI hosts)
    assert script.count("int_epilogue") + script.count("_fused_conv2d") >= 3
    kernels = [f for f in art.mod.functions.values() if f.attrs is not None and "lastbit.int_kernel" in f.attrs]
    assert kernels and all(bool(f.attrs["tirx.is_scheduled"]) for f in kernels)  # the kernel's own schedule
    epilogues = [f for gv, f in art.mod.functions_items() if gv.name_hint.startswith("int_epilogue")]
    assert all(int(f.attrs["op_pattern"]) == 8 for f in epilogues + kernels)  # never fused with a neighbour


@pytest.mark.parametrize("calibrated", [False, True])
def test_kernels_doing_their_own_quantize_and_epilogue_give_the_same_bits(small_cnn, calibrated):
    """The fused int8-vnni-conv layer (quantize, accumulate, epilogue in one PrimFunc) against
    the three-function path, on a whole model: dynamic scales (the in-graph max|x|) and
    calibrated ones (with the ReLU before a layer folded into its quantize)."""
    from lastbit.codegen.kernels.conv_vnni import NAME
    from lastbit.codegen.quant_lowering import FUSED_IO_ATTR, LowerQuantizedLayers
    import tvm
    from tvm import relax

    from lastbit.pipeline import build_vm, lower_and_schedule

    model, x = small_cnn
    target = get_target(HOST)
    if {"avx512bw", "avx512vnni"} - target.feature_set():
        pytest.skip("host CPU lacks AVX-512 VNNI")
    squeeze = Squeeze(bits=3, data=x.numpy()) if calibrated else Squeeze(bits=3)
    art = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    fused = [f for f in art.mod.functions.values() if f.attrs is not None and FUSED_IO_ATTR in f.attrs]
    assert fused and all(str(f.attrs["lastbit.int_kernel"]) == NAME for f in fused)
    unfused = lower_and_schedule(art.graph, target, integer=LowerQuantizedLayers(target, fuse_io=False))
    assert not any(f.attrs is not None and FUSED_IO_ATTR in f.attrs for f in unfused.functions.values())
    vm = relax.VirtualMachine(build_vm(unfused, target), tvm.cpu())
    result = vm["main"](tvm.runtime.tensor(x.numpy()))
    expected = (result if hasattr(result, "numpy") else result[0]).numpy()
    got = art.run(x)
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))


# --- the float reference path and fallbacks ----------------------------------------------------


def test_integer_kernels_off_keeps_the_float_reference_path(small_cnn):
    model, x = small_cnn
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3, integer_kernels=False, first_last_codes=None))
    assert {layer.kernel for layer in art.report().layers} == {"fp32", "pow2-4 (ref)"}
    assert "reference_int" not in art.mod["main"].script(show_meta=False)
    q = {i.source_name: i for i in art.graph.quant.values()}["conv2.weight"]
    with torch.no_grad():
        w = art.graph.params[q.codes_param].astype(np.float32) * art.graph.params[q.alpha_param]
        saved = model.conv2.weight.clone()
        model.conv2.weight.copy_(torch.from_numpy(w))
        expected = model(x).numpy()
        model.conv2.weight.copy_(saved)
    assert_close(art.run(x), expected)


def test_a_layer_no_kernel_serves_falls_back_with_its_reason(small_mlp):
    from lastbit.codegen.quant_lowering import LowerQuantizedLayers
    from lastbit.passes.quantize_pow2 import QuantizePow2
    from lastbit.pipeline import import_model

    model, x = small_mlp
    graph = QuantizePow2(Squeeze(bits=3, keep_first_last=False))(import_model(model, (x,)))
    lowering = LowerQuantizedLayers(HOST, kernels=("no-such-kernel",))
    assert lowering(graph) is graph or len(lowering.choices) == 2
    choices = list(lowering.choices.values())
    assert all(c.kernel == "reference" and c.reason == "no integer kernel serves it" for c in choices)
    off = LowerQuantizedLayers(HOST, kernels="reference")
    off(graph)
    assert {c.reason for c in off.choices.values()} == {"integer kernels switched off"}
    assert KernelChoice("v", "w", "reference", reason="why").describe() == "reference (why)"


# --- k-bit activations (Squeeze.act_bits) end to end ----------------------------------------------


def _act_bits_mlp(bias: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64, bias=bias), torch.nn.ReLU(), torch.nn.Linear(64, 48, bias=bias),
                                torch.nn.ReLU(), torch.nn.Linear(48, 10, bias=bias)).eval()
    return model, torch.randn(2, 40)


def _numpy_act_bits_mlp(model, graph, x: np.ndarray) -> np.ndarray:
    """quant_reference layer by layer on each layer's k-bit grid (scale calibrated or dynamic)."""
    infos = {i.source_name.removesuffix(".weight"): i for i in graph.quant.values()}
    h = x
    for name, relu in (("0", True), ("2", True), ("4", False)):
        info = infos[name]
        s = qr.activation_scale(h, info.activation_scale, info.act_bits, info.act_unsigned)
        x_q = qr.quantize_activation(h, s, info.act_bits, info.act_unsigned)
        codes = graph.params[info.codes_param]
        alpha = np.asarray(graph.params[info.alpha_param], np.float64).reshape(-1)
        scale = qr.output_scale(alpha, s)
        bias = getattr(model, name).bias
        bias = None if bias is None else bias.detach().numpy()
        h = qr.epilogue(qr.int_dense(x_q, codes), qr.integer_bias(bias, scale, codes.shape[0]), scale, relu)
    return h


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "dynamic"])
def test_act_bits_end_to_end_is_bit_exact_through_bitserial(calibrated):
    import dataclasses

    model, x = _act_bits_mlp()
    calib = np.random.default_rng(0).standard_normal((16, 40)).astype("float32") if calibrated else None
    target = dataclasses.replace(get_target(HOST), kernels={"dense": ("bitserial",)})
    squeeze = Squeeze(codes="ternary", act_bits=2, keep_first_last=False, data=calib)
    art = lastbit.compile(model, target, (x,), squeeze=squeeze)
    layers = art.report().layers
    assert [layer.kernel for layer in layers] == ["bitserial"] * 3
    assert [layer.act for layer in layers] == ["2s", "2u", "2u"]  # the input is signed, ReLU outputs are not
    assert "int8: fallback only" in layers[1].kernel_note  # a strategy's own kernels come first
    expected = _numpy_act_bits_mlp(model, art.graph, x.numpy())
    np.testing.assert_array_equal(art.run(x), expected)


def test_act_bits_float_reference_sees_the_same_grids():
    """The float reference path fake-quantizes each layer input to the k-bit grid of the integer
    path: without biases (whose rounding to accumulator units is the one other difference) the
    two agree up to fp32 summation order."""
    import dataclasses

    model, x = _act_bits_mlp(bias=False)
    calib = np.random.default_rng(0).standard_normal((16, 40)).astype("float32")
    squeeze = Squeeze(codes="ternary", act_bits=2, keep_first_last=False, data=calib, integer_kernels=False)
    ref = lastbit.compile(model, HOST, (x,), squeeze=squeeze)
    assert [layer.act for layer in ref.report().layers] == ["2s", "2u", "2u"]
    assert {layer.kernel for layer in ref.report().layers} == {"ternary (ref)"}
    expected = _numpy_act_bits_mlp(model, ref.graph, x.numpy())
    assert_close(ref.run(x), expected, rtol=1e-5)
    integer = lastbit.compile(model, HOST, (x,), squeeze=dataclasses.replace(squeeze, integer_kernels=True))
    np.testing.assert_array_equal(integer.run(x), expected)


def test_act_bits_keeps_first_and_last_layers_at_8_bits():
    model, x = _act_bits_mlp()
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(codes="ternary", act_bits=3))
    assert [layer.act for layer in art.report().layers] == ["int8", "3u", "int8"]


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True, "2"])
def test_bad_act_bits_is_one_clear_error(bad):
    from lastbit.passes.pow2_projection import QuantizationError

    with pytest.raises(QuantizationError, match=r"act_bits must be an int in 1\.\.8, got"):
        Squeeze(bits=2, act_bits=bad)


def test_activation_grids_of_the_reference():
    assert qr.activation_range(8) == (-127, 127)
    assert qr.activation_range(2, unsigned=True) == (0, 3)
    assert qr.activation_range(3) == (-3, 3)
    assert qr.activation_range(1) == (-1, 1) and qr.activation_code_bits(1) == 2
    assert qr.activation_range(1, unsigned=True) == (0, 1) and qr.activation_code_bits(1, True) == 1
    x = np.array([-1.0, 0.24, 0.26, 0.75, 5.0], np.float32)
    np.testing.assert_array_equal(qr.quantize_activation(x, 0.5, 2, unsigned=True), [0, 0, 1, 2, 3])  # rint(0.5) = 0
    np.testing.assert_array_equal(qr.fake_quantize_activation(x, 0.5, 2, True), [0.0, 0.0, 0.5, 1.0, 1.5])


@pytest.mark.qemu
def test_act_bits_end_to_end_is_bit_exact_under_qemu():
    triple = "aarch64-linux-gnu"
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    model, x = _act_bits_mlp()
    calib = np.random.default_rng(0).standard_normal((16, 40)).astype("float32")
    art = lastbit.compile(model, triple, (x,), squeeze=Squeeze(codes="ternary", act_bits=2, keep_first_last=False,
                                                               data=calib))
    assert "bitserial" in {layer.kernel for layer in art.report().layers}  # the cost table's pick on aarch64
    np.testing.assert_array_equal(art.run(x), _numpy_act_bits_mlp(model, art.graph, x.numpy()))


@pytest.mark.qemu
@pytest.mark.parametrize("triple", ["aarch64-i8mm-linux-gnu", "aarch64-dotprod-linux-gnu", "armv7a-linux-gnueabihf"])
def test_small_cnn_integer_path_is_bit_exact_under_qemu(small_cnn, triple):
    """Quantize, NEON kernel and epilogue together (armv7 rounds by hand: quant_prims.py)."""
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")
    model, x = small_cnn
    calib = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype("float32")
    art = lastbit.compile(model, triple, (x,), squeeze=Squeeze(bits=3, data=calib))
    assert {layer.kernel for layer in art.report().layers} <= _integer_kernel_names()
    fused = _fused_as_declared(art.mod)
    if triple == "aarch64-dotprod-linux-gnu":  # conv2 (8 channels, rows of 8); conv1's 3 channels are declined
        assert fused == ["int8-sdot"]
    np.testing.assert_array_equal(art.run(x), _numpy_small_cnn(model, art.graph, x.numpy()))


def _fused_as_declared(mod) -> list[str]:
    """Checks that every integer kernel function is fused exactly when its kernel offers a
    fused form that ``fuses`` the layer (conv2d); returns the fused ones' kernel names."""
    from lastbit.codegen.kernels import get_kernel
    from lastbit.codegen.quant_lowering import FUSED_IO_ATTR, INT_LAYER_ATTR, KERNEL_ATTR, int_layer_from_json

    fused = []
    for func in mod.functions.values():
        if func.attrs is None or KERNEL_ATTR not in func.attrs:
            continue
        kernel = get_kernel(str(func.attrs[KERNEL_ATTR]))
        layer, _ = int_layer_from_json(str(func.attrs[INT_LAYER_ATTR]))
        declared = (kernel.fused_prim_func is not None and layer.op == "conv2d"
                    and (kernel.fuses is None or kernel.fuses(layer)))
        assert (FUSED_IO_ATTR in func.attrs) == declared, (kernel.name, layer)
        fused += [kernel.name] * declared
    return fused


def test_relu_before_a_layer_folds_into_its_quantize():
    """ReLU → conv (calibrated): one pass quantizes max(x, 0), the ReLU binding is gone, and
    the result is still quant_reference's, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(1, 4, 7, 7)
    calib = np.random.default_rng(1).standard_normal((8, 4, 7, 7)).astype("float32")
    art = lastbit.compile(model, HOST, (x,), squeeze=Squeeze(bits=3, keep_first_last=False, data=calib))
    from lastbit.codegen.quant_lowering import FUSED_IO_ATTR, fused_io_from_json

    names = [gv.name_hint for gv in art.mod.get_global_vars()]
    fused = [fused_io_from_json(str(f.attrs[FUSED_IO_ATTR])) for f in art.mod.functions.values()
             if f.attrs is not None and FUSED_IO_ATTR in f.attrs]  # a kernel quantizing its own input
    assert "int_relu_quantize" in names or [io.input_relu for io in fused] == [True], names
    assert not any("relu" in n and "quantize" not in n and "epilogue" not in n for n in names), names
    (info,) = art.graph.quant.values()
    expected = _int_layer(np.maximum(x.numpy(), 0), info, art.graph.params, "conv2d",
                          bias=model[1].bias.detach().numpy(), padding=1)
    np.testing.assert_array_equal(art.run(x), expected)
