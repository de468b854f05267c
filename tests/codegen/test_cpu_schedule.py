"""Default CPU schedules: scheduled code matches torch on small models of every op kind the
schedules handle (and on the generic fallback), every PrimFunc gets scheduled without
falling back, and the same modules compile for the ARM targets."""

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

tvm = pytest.importorskip("tvm")

from lastbit.codegen import cpu_schedule  # noqa: E402
from lastbit.codegen.lowering import lower_to_tir  # noqa: E402
from lastbit.frontend.torch_import import from_torch  # noqa: E402
from lastbit.targets import get_target  # noqa: E402

HOST = "x86_64-linux-gnu"
RTOL = 1e-4


class _Prepared:
    """A graph whose bound module went through ``prepare_for_cpu`` (what the pipeline does)."""

    def __init__(self, graph, target, prepare=True):
        self.graph, self.target, self.prepare = graph, target, prepare

    def bound_module(self):
        mod = self.graph.bound_module()
        return cpu_schedule.prepare_for_cpu(mod, self.target) if self.prepare else mod


def _scheduled(model, inputs, triple=HOST, prepare=True):
    target = get_target(triple).tvm()
    graph = from_torch(model.eval(), inputs)
    mod = lower_to_tir(_Prepared(graph, target, prepare))
    return cpu_schedule.schedule_for_cpu(mod, target), target


def _run(model, *inputs, prepare=True):
    mod, target = _scheduled(model, inputs, prepare=prepare)
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])[0].numpy()
    with torch.no_grad():
        ref = model(*inputs).numpy()
    return mod, out, ref


def _assert_close(out, ref):
    assert out.shape == ref.shape
    rel = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert rel < RTOL, f"relative error {rel:.2e}"


class Lambda(nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(modules)

    def forward(self, *xs):
        return self.fn(self.mods, *xs)


def _bn(channels):
    bn = nn.BatchNorm2d(channels)
    gen = torch.Generator().manual_seed(channels)
    bn.running_mean.copy_(torch.randn(channels, generator=gen) * 0.1)
    bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    bn.weight.data.copy_(torch.rand(channels, generator=gen) + 0.5)
    bn.bias.data.copy_(torch.randn(channels, generator=gen) * 0.1)
    return bn


class ResidualBlock(nn.Module):
    """conv-BN-ReLU, strided conv, 1×1 projection shortcut, residual add, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.down(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, depthwise 3×3, ReLU6, 1×1 project, residual."""

    def __init__(self, channels, expand, stride=1):
        super().__init__()
        hidden = channels * expand
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), _bn(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), _bn(channels),
        )
        self.residual = stride == 1

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def _seeded(build):
    torch.manual_seed(0)
    return build()


CASES = {
    "conv_padded_bias_relu": lambda: (nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), (1, 3, 17, 17)),
    "conv_strided_no_epilogue": lambda: (nn.Conv2d(8, 32, 3, stride=2, bias=False), (1, 8, 15, 15)),
    "conv_5x5_stride3_dilated": lambda: (
        nn.Sequential(nn.Conv2d(16, 16, 5, stride=3, padding=2), nn.Conv2d(16, 24, 3, padding=2, dilation=2)),
        (1, 16, 23, 23),
    ),
    "conv_odd_width_batch2": lambda: (nn.Conv2d(16, 32, 3, padding=1), (2, 16, 9, 37)),
    "grouped_conv": lambda: (nn.Conv2d(32, 64, 3, padding=1, groups=2), (1, 32, 10, 10)),
    "depthwise_relu6": lambda: (
        nn.Sequential(nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24), nn.ReLU6()), (1, 24, 15, 15)
    ),
    "residual_block": lambda: (ResidualBlock(16, 32, 2), (1, 16, 16, 16)),
    "inverted_residual": lambda: (InvertedResidual(16, 6), (1, 16, 12, 12)),
    "pooling": lambda: (
        Lambda(
            lambda m, x: F.adaptive_avg_pool2d(F.avg_pool2d(F.max_pool2d(m[0](x), 3, 2, 1), 2), 1).flatten(1),
            nn.Conv2d(3, 32, 3),
        ),
        (1, 3, 22, 22),
    ),
    "concat_fallback_layout": lambda: (
        Lambda(lambda m, x: torch.relu(torch.cat([m[0](x), m[1](x)], 1)), nn.Conv2d(8, 16, 3, padding=1),
               nn.Conv2d(8, 16, 1)),
        (1, 8, 12, 12),
    ),
    "tf_same_padding": lambda: (  # explicit asymmetric F.pad folded into the conv
        Lambda(lambda m, x: m[1](F.pad(torch.relu(m[0](x)), (0, 1, 0, 1))), nn.Conv2d(3, 16, 3, padding=1),
               nn.Conv2d(16, 16, 3, stride=2, groups=16)),
        (1, 3, 14, 14),
    ),
    "mlp_gemv": lambda: (nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)), (1, 784)),
    "dense_odd_features": lambda: (nn.Linear(33, 1001), (3, 33)),
    "transformer_ffn": lambda: (
        nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), (1, 16, 64)
    ),
    "attention_softmax": lambda: (
        Lambda(lambda m, x: torch.softmax(m[0](x) @ m[1](x).transpose(1, 2) / 8, -1) @ x, nn.Linear(32, 32),
               nn.Linear(32, 32)),
        (2, 16, 32),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scheduled_model_matches_torch(name, caplog):
    model, shape = _seeded(CASES[name])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger=cpu_schedule.__name__):
        mod, out, ref = _run(model, x)
    _assert_close(out, ref)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no schedule fell back
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert bool(func.attrs["tirx.is_scheduled"]), gv.name_hint


def test_packed_kernels_are_used():
    model, shape = _seeded(CASES["inverted_residual"])
    mod, _ = _scheduled(model, (torch.randn(*shape),))
    names = " ".join(gv.name_hint for gv in mod.functions)
    assert "conv2d_nchwc" in names and "depthwise_conv2d_nchwc" in names
    model, shape = _seeded(CASES["mlp_gemv"])
    mod, _ = _scheduled(model, (torch.randn(*shape),))
    assert "dense_packed" in " ".join(gv.name_hint for gv in mod.functions)


def test_generic_schedules_without_prepare():
    """Unprepared (NCHW, legalized) modules still schedule and stay correct."""
    model = _seeded(lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4),
                                          nn.Flatten(), nn.Linear(16 * 14 * 14, 10)))
    x = torch.randn(1, 3, 16, 16)
    mod, out, ref = _run(model, x, prepare=False)
    _assert_close(out, ref)


def test_failing_schedule_falls_back_and_logs(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setitem(cpu_schedule._KERNEL_SCHEDULES, cpu_schedule.CONV2D_NCHWC, broken)
    model = _seeded(lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()))
    x = torch.randn(1, 8, 10, 10)
    with caplog.at_level(logging.WARNING, logger=cpu_schedule.__name__):
        _, out, ref = _run(model, x)
    _assert_close(out, ref)
    assert any("fused_conv2d_nchwc" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("triple", ["aarch64-linux-gnu", "armv7a-linux-gnueabihf"])
def test_arm_targets_compile(triple, caplog):
    target = get_target(triple).tvm()
    assert cpu_schedule.cpu_info(target).lanes == 4
    for name in ("inverted_residual", "residual_block", "transformer_ffn"):
        model, shape = _seeded(CASES[name])
        with caplog.at_level(logging.WARNING, logger=cpu_schedule.__name__):
            mod, target = _scheduled(model, (torch.randn(*shape),), triple=triple)
            tvm.compile(mod, target)
        assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_vector_width_follows_target():
    info = cpu_schedule.cpu_info
    assert info(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})).lanes == 16
    assert info(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})).lanes == 8
    assert cpu_schedule.channel_block(24, 16) == 8 and cpu_schedule.channel_block(3, 16) == 1


def test_weight_packing_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8, 3, 3)).astype("float32")
    packed = cpu_schedule.pack_conv_weight(w, 4, 16)  # [O/16, I/4, KH, KW, 4, 16]
    assert packed[1, 1, 2, 0, 3, 5] == w[1 * 16 + 5, 1 * 4 + 3, 2, 0]
    dense = rng.standard_normal((20, 10)).astype("float32")  # [K, N]
    panels = cpu_schedule.pack_dense_weight(dense, 4)  # N padded to 12
    assert panels.shape == (3, 20, 4) and panels[2, 7, 1] == dense[7, 9] and panels[2, 7, 3] == 0


def _first_conv_task(target):
    model, shape = _seeded(CASES["residual_block"])
    graph = from_torch(model.eval(), (torch.randn(*shape),))
    lowered = lower_to_tir(_Prepared(graph, target))
    name = next(gv for gv in lowered.functions if gv.name_hint.startswith("fused_conv2d_nchwc"))
    return lowered[name]


def test_templates_sample_tiles():
    """``sample=True`` turns the default schedules into tuning templates (traced samples)."""
    target = get_target(HOST).tvm()
    func = _first_conv_task(target)
    sch = tvm.s_tir.Schedule(func, seed=7)
    kind = cpu_schedule.CONV2D_NCHWC
    cpu_schedule.schedule_conv2d_nchwc(sch, cpu_schedule._annotated_block(sch, kind), cpu_schedule.cpu_info(target),
                                       sample=True)
    assert "sample_perfect_tile" in str(sch.trace)


@pytest.mark.slow
def test_tuning_space_generates_design_space():
    from tvm.s_tir import meta_schedule as ms

    target = get_target(HOST).tvm()
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": _first_conv_task(target)}), target=target,
                         space_generator=cpu_schedule.tuning_space(target), task_name="conv", rand_state=1)
    (space,) = ctx.generate_design_space()
    assert "sample_perfect_tile" in str(space.trace)


def test_rounding_loops_stay_vectorized():
    """clip(rint(x·s)) (the int8 activation quantize) compiles to vector code, not one element
    at a time: tirx.nearbyint is marked vectorizable."""
    from tvm import te, tirx

    cpu_schedule.vectorizable_nearbyint()
    x = te.placeholder((1, 8, 14, 14), "float32", name="x")
    q = te.compute(x.shape, lambda *i: tirx.max(tirx.min(tirx.nearbyint(x(*i) * 3.0), 127.0), -127.0).astype("int8"))
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, q]).with_attr("global_symbol", "main"))
    cpu_schedule.schedule_generic(sch, cpu_schedule.cpu_info(get_target("aarch64-linux-gnu").tvm()))
    lib = tvm.tirx.build(sch.mod, target=get_target("aarch64-linux-gnu").tvm())
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.imports[0].inspect_source("asm")
    assert "frinti\tv" in asm and "fcmp" not in asm


def _add_relu(shape, broadcast=False):
    from tvm import te

    a = te.placeholder(shape, "float32", name="a")
    b = te.placeholder((shape[1],) if broadcast else shape, "float32", name="b")
    total = te.compute(shape, lambda *i: a(*i) + (b[i[1]] if broadcast else b(*i)), name="add")
    out = te.compute(shape, lambda *i: te.max(total(*i), 0.0), name="relu")
    return te.create_prim_func([a, b, out]), b.shape


@pytest.mark.parametrize("triple", [HOST, "aarch64-linux-gnu", "armv7a-linux-gnueabihf"])
def test_odd_nchw_elementwise_runs_as_one_flat_vector_loop(triple):
    """A residual add + ReLU at 7×7 (rows not a multiple of the vector) becomes one flat
    vectorized loop with no per-lane index division; broadcasts and lane-multiple rows keep
    the generic schedule. The flat function computes the same values (host)."""
    target = get_target(triple).tvm()
    info = cpu_schedule.cpu_info(target)
    func, _ = _add_relu((2, 3, 7, 7))
    flat = cpu_schedule.flat_elementwise(func, info)
    assert flat is not None and "vectorized" in flat.script() and "//" not in flat.script()
    assert cpu_schedule.flat_elementwise(_add_relu((2, 3, 7, 7), broadcast=True)[0], info) is None
    assert cpu_schedule.flat_elementwise(_add_relu((2, 3, 7, 4 * info.lanes))[0], info) is None
    if triple != HOST:
        asm = tvm.tirx.build(flat.with_attr("global_symbol", "f"), target=target).inspect_source("asm")
        assert ("fadd\tv" in asm) if triple.startswith("aarch64") else ("vadd.f32\tq" in asm)
        return
    rng = np.random.default_rng(0)
    big = cpu_schedule.flat_elementwise(_add_relu((2, 8, 33, 33))[0], info)  # parallel rows
    assert big is not None and "parallel" in big.script()
    for func, shape in ((flat, (2, 3, 7, 7)), (big, (2, 8, 33, 33))):
        a, b = (rng.standard_normal(shape).astype("float32") for _ in range(2))
        lib = tvm.tirx.build(func.with_attr("global_symbol", "f"), target=target)
        out = tvm.runtime.tensor(np.zeros_like(a))
        lib["f"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        np.testing.assert_array_equal(out.numpy(), np.maximum(a + b, np.float32(0)))


@pytest.mark.qemu
def test_odd_residual_block_is_bit_exact_under_qemu_on_armv7():
    """The flat loops on 32-bit ARM, end to end: a 3-bit residual block at 7×7 (integer
    kernels keep NCHW, so the residual add + ReLU is a flat loop) gives the host's bits."""
    import lastbit
    from lastbit import Squeeze

    triple = "armv7a-linux-gnueabihf"
    missing = get_target(triple).missing_tools()
    if missing:
        pytest.skip(f"{triple} needs {', '.join(missing)}")

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return F.relu(x + F.relu(self.conv(x)))

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(1, 8, 7, 7)
    calib = np.random.default_rng(0).standard_normal((4, 8, 7, 7)).astype("float32")
    squeeze = Squeeze(bits=3, keep_first_last=False, data=calib)
    arm, host = (lastbit.compile(model, t, (x,), squeeze=squeeze) for t in (triple, HOST))
    assert any("_flat" in f.script() for gv, f in arm.mod.functions_items() if gv.name_hint.startswith("fused_add"))
    np.testing.assert_array_equal(arm.run(x), host.run(x))
