"""What a layer costs on a target for one per-layer choice: measured (host latency, accelerator
cycles and energy), cached on disk, and predicted by an XGBoost model for choices not measured.

A :class:`CostPoint` is one layer's *effective* shape under a choice (channels after pruning,
the rank of a split, the code set), so two layers of the same shape share a measurement. A
:class:`CostSource` measures points on one target; new targets plug in by implementing it
(``name``, ``metrics``, ``measure``). :class:`HostLatency` compiles a one-layer model through
the normal pipeline and times it; :class:`ArmCycles` cross-compiles it for an ARM target,
counts the instructions it executes under qemu-user and turns them into estimated cycles of
one core (qemu counts × the cycle model of targets/arm_cycle_model.py, not board timings;
deterministic, so machine load does not matter); :class:`AccelSimCost` runs the same
one-layer model through the accelerator's compiler and timing simulator. The per-layer sum is the model's cost (the
additive model HAWQ-V3 and HAQ use); benchmarks/codesign.py checks it on whole models.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lastbit.errors import LastbitError

log = logging.getLogger(__name__)

__all__ = ["AccelSimCost", "ArmCycles", "CostCache", "CostModel", "CostPoint", "CostSource", "HostLatency", "code_fingerprint",
           "cost_source", "tvm_threads", "whole_model_cost"]


@dataclass(frozen=True)
class CostPoint:
    """One layer under one choice, by the shape the compiled layer will have."""

    op: str  # "conv2d" or "dense"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    in_hw: tuple[int, int] = (1, 1)
    batch: int = 1
    codes: str = "int8"  # code set or "fp32"
    rank: int | None = None  # split into a k×k conv with `rank` filters + a 1×1 conv (dense: two factors)
    bn_relu: bool = True  # conv followed by batch-norm and ReLU (folded into the integer epilogue)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op == "dense":
            return (1, 1)
        return tuple((self.in_hw[i] + 2 * self.padding[i] - self.kernel[i]) // self.stride[i] + 1 for i in (0, 1))

    @property
    def macs(self) -> int:
        positions = self.batch * self.out_hw[0] * self.out_hw[1]
        k = self.kernel[0] * self.kernel[1]
        if self.rank is None:
            return positions * self.out_channels * self.in_channels * k
        return positions * self.rank * (self.in_channels * k + self.out_channels)

    @property
    def params(self) -> int:
        k = self.kernel[0] * self.kernel[1]
        if self.rank is None:
            return self.out_channels * self.in_channels * k
        return self.rank * (self.in_channels * k + self.out_channels)

    @property
    def bits(self) -> int:
        from lastbit.passes.pow2_projection import code_set

        return 32 if self.codes == "fp32" else code_set(self.codes).bits

    @property
    def weight_bytes(self) -> int:
        """Packed codes + one float32 α per output channel (per half when split), or fp32 weights."""
        if self.codes == "fp32":
            return 4 * self.params
        alphas = self.out_channels + (self.rank or 0)
        return math.ceil(self.params * self.bits / 8) + 4 * alphas

    def features(self) -> list[float]:
        """What the cost model sees: shape, work, bytes, code width, split."""
        act_bytes = self.batch * self.in_channels * self.in_hw[0] * self.in_hw[1]
        return [
            1.0 if self.op == "conv2d" else 0.0, self.in_channels, self.out_channels, self.kernel[0] * self.kernel[1],
            self.stride[0], self.in_hw[0] * self.in_hw[1], self.out_hw[0] * self.out_hw[1],
            math.log1p(self.macs), math.log1p(self.params), math.log1p(self.weight_bytes), math.log1p(act_bytes),
            self.bits, 1.0 if self.codes == "fp32" else 0.0, self.rank or 0, 1.0 if self.rank else 0.0,
        ]

    def int_layers(self, act_bits: int = 8) -> list:
        """The integer layers the lowering sees for this point (two for a rank split: the k×k
        conv onto ``rank`` channels, then the 1×1 back; a dense's two factors)."""
        from lastbit.codegen import quant_reference as qr
        from lastbit.codegen.kernels import IntLayer

        bits = self.bits
        if self.op == "dense":
            widths = [self.in_channels, self.out_channels] if self.rank is None else \
                [self.in_channels, self.rank, self.out_channels]
            return [IntLayer("dense", self.codes, bits, (self.batch, k), (n, k), act_bits=qr.activation_code_bits(act_bits))
                    for k, n in zip(widths, widths[1:])]
        pad = (self.padding[0], self.padding[1], self.padding[0], self.padding[1])
        first_out = self.out_channels if self.rank is None else self.rank
        layers = [IntLayer("conv2d", self.codes, bits, (self.batch, self.in_channels, *self.in_hw),
                           (first_out, self.in_channels, *self.kernel), strides=self.stride, padding=pad,
                           act_bits=qr.activation_code_bits(act_bits))]
        if self.rank is not None:
            layers.append(IntLayer("conv2d", self.codes, bits, (self.batch, self.rank, *self.out_hw),
                                   (self.out_channels, self.rank, 1, 1), act_bits=qr.activation_code_bits(act_bits)))
        return layers

    def kernel_prior(self, target: str) -> list[float]:
        """The compiler's own estimate, as cost-model features: log of the summed cost
        (codegen/kernel_cost.py: the per-target instruction tables, else analytic rates) of
        the kernels the lowering would pick for this point on ``target``, and the first
        one's place in the target's strategy (-1: a float layer, or no integer kernel).
        Which kernel serves a shape is a step the trees cannot learn from ~100 measurements;
        on aarch64 it lifts the held-out Spearman from 0.85 to 0.91 (benchmarks/codesign.py)."""
        from lastbit.codegen.quant_lowering import choose_kernel, kernel_candidates
        from lastbit.targets import get_target

        if self.codes == "fp32":
            return [math.log1p(self.macs), -1.0]
        t = get_target(target)
        total, first = 0.0, -1.0
        for i, layer in enumerate(self.int_layers()):
            winner, _ = choose_kernel(layer, t)
            if winner is None:
                return [math.log1p(self.macs), -1.0]
            total += winner.cost
            if i == 0:
                first = float(kernel_candidates(t, None, self.op).index(winner.kernel))
        return [math.log1p(total), first]

    def torch_module(self):
        """A one-layer torch model with this shape (seeded weights; cost does not depend on them)."""
        import torch
        from torch import nn

        torch.manual_seed(0)
        if self.op == "dense":
            if self.rank is None:
                return nn.Linear(self.in_channels, self.out_channels).eval()
            return nn.Sequential(nn.Linear(self.in_channels, self.rank, bias=False),
                                 nn.Linear(self.rank, self.out_channels)).eval()
        conv = dict(stride=self.stride, padding=self.padding, bias=not self.bn_relu)
        if self.rank is None:
            layers = [nn.Conv2d(self.in_channels, self.out_channels, self.kernel, **conv)]
        else:
            layers = [nn.Conv2d(self.in_channels, self.rank, self.kernel, stride=self.stride, padding=self.padding,
                                bias=False), nn.Conv2d(self.rank, self.out_channels, 1, bias=not self.bn_relu)]
        if self.bn_relu:
            layers += [nn.BatchNorm2d(self.out_channels), nn.ReLU()]
        return nn.Sequential(*layers).eval()

    def example(self):
        import torch

        shape = (self.batch, self.in_channels) if self.op == "dense" else (self.batch, self.in_channels, *self.in_hw)
        return torch.rand(shape, generator=torch.Generator().manual_seed(1))


class CostSource(Protocol):
    """Measures :class:`CostPoint`\\ s on one target. ``measure`` returns {metric: value} or
    None when the target cannot run that choice (e.g. a float layer on the accelerator)."""

    name: str  # part of the cache key: "x86_64-linux-gnu/latency"
    metrics: tuple[str, ...]
    # the triple whose integer lowering compiles the measured layers (CostPoint.kernel_prior);
    # None where layers do not go through it (the accelerator's own compiler)
    lowering_target: str | None

    def measure(self, point: CostPoint) -> dict[str, float] | None: ...


def _compile_point(point: CostPoint, target: str):
    import lastbit

    module, x = point.torch_module(), point.example()
    squeeze = None
    if point.codes != "fp32":
        # every layer on the chosen set (no first/last exception: this model is one layer);
        # a few samples calibrate static activation scales, as a compiled model has them
        calib = np.random.default_rng(0).random((4 * point.batch, *x.shape[1:])).astype(np.float32)
        squeeze = lastbit.Squeeze(codes=point.codes, keep_first_last=False, data=calib, calibration_samples=4 * point.batch)
    return lastbit.compile(module, target, (x,), name="codesign-layer", squeeze=squeeze), x.numpy()


@contextlib.contextmanager
def tvm_threads(n: int | None):
    """TVM's CPU thread pool at ``n`` threads inside the block (None: unchanged), then back
    at TVM_NUM_THREADS. On a loaded machine a 2-thread pool stalls for milliseconds waiting
    for a descheduled worker, far longer than a small layer runs; one thread does not."""
    if n is None:
        yield
        return
    import os

    import tvm

    config = tvm.get_global_func("runtime.config_threadpool")
    config(1, int(n))
    try:
        yield
    finally:
        config(1, int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))


class HostLatency:
    """Latency (ms) of the one-layer model compiled for this host: the least of ``rounds``
    medians of ``repeat`` calls, on ``threads`` TVM threads (1 by default: see tvm_threads)."""

    metrics = ("latency_ms",)

    def __init__(self, target: str = "x86_64-linux-gnu", repeat: int = 10, rounds: int = 15, threads: int | None = 1):
        self.target, self.repeat, self.rounds, self.threads = target, repeat, rounds, threads
        self.lowering_target = target
        self.name = f"{target}/latency" + (f"/{threads}t" if threads else "")

    def measure(self, point: CostPoint) -> dict[str, float] | None:
        artifact, x = _compile_point(point, self.target)
        # the least of many short medians: on a shared machine load only ever adds time, and
        # a short window is likelier to run undisturbed than one long one
        with tvm_threads(self.threads):
            ms = min(artifact.latency_ms(x, repeat=self.repeat, warmup=1) for _ in range(self.rounds))
        return {"latency_ms": ms}


class AccelSimCost:
    """Cycles and energy of the one-layer model on a simulated accelerator (codegen/accel's
    compiler and timing simulator; int8 codes as power-of-two digit planes, one pass per
    term); a float layer does not run there (None)."""

    metrics = ("cycles", "energy_pj", "latency_ms")
    lowering_target = None
    # part of the cache key: bump it when what a measurement means changes, so older cached
    # values are measured again (2: int8 layers run on the array as digit planes; before,
    # they were recorded as not runnable there)
    VERSION = 2

    def __init__(self, target: str = "accel-sim"):
        self.target = target
        self.name = f"{target}/cycles/v{self.VERSION}"

    def measure(self, point: CostPoint) -> dict[str, float] | None:
        if point.codes == "fp32":
            return None
        artifact, _ = _compile_point(point, self.target)
        summary = artifact.report().accelerator
        if not summary or "total" not in summary:
            return None
        total = summary["total"]
        return {"cycles": float(total["cycles"]), "energy_pj": float(total["energy_pj"]),
                "latency_ms": float(total["latency_ms"])}


class ArmCycles:
    """Estimated cycles of the one-layer model on one ARM core: the bundle cross-compiled for
    ``target``, its instructions per inference counted under qemu-user
    (codegen/qemu_count.py) and costed by the per-class throughput model of
    targets/arm_cycle_model.py (``core``: "cortex-a53" or "cortex-a76"). Estimated cycles
    from qemu counts, not board timings; deterministic for one build (the cache keys carry the
    code's fingerprint), so a cached value never goes stale with machine load. ``cycles_<other core>`` and ``insns`` are recorded alongside."""

    metrics = ("cycles", "insns")

    def __init__(self, target: str = "aarch64-dotprod-linux-gnu", core: str = "cortex-a76"):
        from lastbit.targets import get_target
        from lastbit.targets.arm_cycle_model import CORES

        t = get_target(target)
        if t.runner != "qemu":
            raise LastbitError(f"ArmCycles counts code under qemu-user; target '{t.triple}' runs on '{t.runner}'")
        if core not in CORES:
            raise LastbitError(f"no cycle model for core {core!r}; known: {', '.join(sorted(CORES))}")
        self.target, self.core = t.triple, core
        self.lowering_target = t.triple
        self.name = f"{t.triple}/cycles-{core}"
        self._tools_checked = False

    def check_tools(self) -> None:
        """One clear error when the cross compiler or qemu-user is missing (before any compile)."""
        from lastbit.errors import TargetError
        from lastbit.targets import get_target

        if self._tools_checked:
            return
        t = get_target(self.target)
        missing = t.missing_tools()
        self._tools_checked = not missing
        if missing:
            raise TargetError(f"counting cycles for '{t.triple}' needs {', '.join(missing)} on PATH "
                              f"(Debian packages: {' '.join(t.apt_packages) or 'see docs/TARGETS.md'})")

    def measure(self, point: CostPoint) -> dict[str, float] | None:
        import tempfile

        from lastbit.codegen.qemu_count import count_bundle
        from lastbit.targets.arm_cycle_model import CORES

        self.check_tools()
        artifact, x = _compile_point(point, self.target)
        with tempfile.TemporaryDirectory(prefix="lastbit-armcost-") as tmp:
            counts = count_bundle(artifact.export(Path(tmp) / "bundle"), [x])
        out = {"cycles": float(counts.cycles(self.core)), "insns": float(counts.total)}
        for core in CORES:
            if core != self.core:
                out[f"cycles_{core}"] = float(counts.cycles(core))
        return out


def cost_source(target: str) -> CostSource:
    """The cost source that serves ``target``: the host measures latency, ARM targets count
    instructions under qemu into estimated cycles, accelerator targets simulate."""
    from lastbit.targets import get_target

    t = get_target(target)
    if t.runner == "sim":
        return AccelSimCost(t.triple)
    if t.is_host:
        return HostLatency(t.triple)
    if t.runner == "qemu":  # the core qemu emulates when the cycle model has it (armv7: the A53's tables)
        from lastbit.autotune.qemu_device import cycle_core

        return ArmCycles(t.triple, core=cycle_core(t))
    raise LastbitError(f"no cost source for target '{t.triple}' (runner '{t.runner}'); host latency, "
                       "ARM under qemu and accel-sim are supported")


def whole_model_cost(artifact, x: np.ndarray, threads: int | None = 1, rounds: int = 9,
                     repeat: int = 20) -> dict[str, float]:
    """What a whole compiled model costs on its target, in the cost sources' metrics: the host
    times it (the least of ``rounds`` medians of ``repeat`` calls on ``threads`` TVM threads),
    an ARM target counts it under qemu-user into the cycle model's estimate for the core its
    cost source uses (not board timings), accel-sim simulates it; ``weight_bytes`` beside."""
    import tempfile

    out = {"weight_bytes": float(artifact.report().model_bytes)}
    t = artifact.target
    if t.runner == "sim":
        total = artifact.report().accelerator["total"]
        return {**out, "energy_pj": float(total["energy_pj"]), "cycles": float(total["cycles"]),
                "latency_ms": float(total["latency_ms"])}
    if t.is_host:
        with tvm_threads(threads):
            ms = min(artifact.latency_ms(x, repeat=repeat, warmup=2) for _ in range(rounds))
        return {**out, "latency_ms": ms}
    source = cost_source(t.triple)
    if not isinstance(source, ArmCycles):
        raise LastbitError(f"no whole-model cost for target '{t.triple}' (runner '{t.runner}')")
    from lastbit.codegen.qemu_count import count_bundle
    from lastbit.targets.arm_cycle_model import CORES

    source.check_tools()
    with tempfile.TemporaryDirectory(prefix="lastbit-wholecost-") as tmp:
        counts = count_bundle(artifact.export(Path(tmp) / "bundle"), [x])
    out.update({"cycles": float(counts.cycles(source.core)), "insns": float(counts.total)})
    out.update({f"cycles_{core}": float(counts.cycles(core)) for core in CORES if core != source.core})
    return out


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the code that decides what a compiled layer costs: the sources and tables of
    lastbit's codegen, passes and targets packages. Part of every cache key, so a kernel,
    lowering or cost-table change measures again instead of reusing a number the old code
    gave (qemu counts are deterministic for one build, not across builds)."""
    import hashlib
    import importlib

    digest = hashlib.sha256()
    for package in ("lastbit.codegen", "lastbit.passes", "lastbit.targets"):
        root = Path(importlib.import_module(package).__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class CostCache:
    """Measurements on disk (JSON), keyed by cost source, the code's fingerprint and point, so a
    rerun of the same code reuses them. Saving drops entries of other code fingerprints: they
    would never be read again."""

    def __init__(self, path: "str | Path", fingerprint: str | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint or code_fingerprint()
        self.entries: dict[str, dict | None] = self._read()
        if self.entries is None:
            log.warning("cost cache %s is unreadable; starting it again", self.path)
            self.entries = {}

    def _read(self) -> "dict | None":
        """The entries on disk: {} when there is no file, None when it cannot be read."""
        if not self.path.is_file():
            return {}
        try:
            entries = json.loads(self.path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or not UTF-8
            return None
        return entries if isinstance(entries, dict) else None

    def key(self, source: CostSource, point: CostPoint) -> str:
        return f"{source.name}|{self.fingerprint}|{point.key()}"

    def get(self, source: CostSource, point: CostPoint) -> tuple[bool, dict | None]:
        k = self.key(source, point)
        return (k in self.entries), self.entries.get(k)

    def put(self, source: CostSource, point: CostPoint, value: dict | None) -> None:
        self.entries[self.key(source, point)] = value

    def save(self) -> None:
        """Write the cache atomically, merged with what another run wrote there meanwhile."""
        from lastbit.fileio import atomic_write_json

        current = f"|{self.fingerprint}|"
        merged = {**(self._read() or {}), **self.entries}
        self.entries = {k: v for k, v in merged.items() if current in k}
        atomic_write_json(self.path, {"format": "lastbit-cost-cache/1", "entries": self.entries})


class CostModel:
    """XGBoost regression of log(cost) on :meth:`CostPoint.features`, fitted on measured points;
    with ``target`` (a triple whose layers the integer lowering compiles) also on
    :meth:`CostPoint.kernel_prior`, the lowering's own estimate for that target."""

    def __init__(self, seed: int = 0, target: str | None = None):
        self.seed = seed
        self.target = target
        self.model = None

    def _features(self, points: list[CostPoint]) -> np.ndarray:
        rows = [p.features() + (p.kernel_prior(self.target) if self.target else []) for p in points]
        return np.array(rows, dtype=np.float64)

    def fit(self, points: list[CostPoint], values: np.ndarray) -> "CostModel":
        import xgboost

        x = self._features(points)
        y = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-12))
        self.model = xgboost.XGBRegressor(n_estimators=300, max_depth=4, learning_rate=0.08, subsample=0.9,
                                          random_state=self.seed, n_jobs=1)
        self.model.fit(x, y)
        return self

    def predict(self, points: list[CostPoint]) -> np.ndarray:
        if self.model is None:
            raise LastbitError("the cost model is not fitted")
        return np.exp(self.model.predict(self._features(points)))

    @staticmethod
    def held_out_scores(points: list[CostPoint], values: np.ndarray, folds: int = 5,
                        seed: int = 0, target: str | None = None) -> dict[str, float]:
        """K-fold cross-validation: every measurement predicted by a model fitted without it,
        then Spearman rank correlation and R² of predicted vs measured cost over all of them
        (and R² in log space). Pooling the folds scores every point, not one small split."""
        from scipy.stats import spearmanr

        values = np.asarray(values, dtype=np.float64)
        n = len(points)
        folds = max(2, min(folds, n // 2))
        order = np.random.default_rng(seed).permutation(n)
        pred = np.empty(n)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            model = CostModel(seed, target).fit([points[i] for i in train], values[train])
            pred[test] = model.predict([points[i] for i in test])
        true = values
        r2 = 1.0 - float(np.sum((pred - true) ** 2)) / max(float(np.sum((true - true.mean()) ** 2)), 1e-30)
        lt, lp = np.log(true), np.log(pred)
        r2_log = 1.0 - float(np.sum((lp - lt) ** 2)) / max(float(np.sum((lt - lt.mean()) ** 2)), 1e-30)
        return {"spearman": float(spearmanr(pred, true).statistic), "r2": r2, "r2_log": r2_log,
                "folds": int(folds), "points": int(n)}
