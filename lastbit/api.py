"""The public API: ``lastbit.compile(model, target) -> Artifact`` that can run, export and report."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from lastbit.errors import RunError
from lastbit.graph import Graph
from lastbit.pipeline import Compiled, build_bundle, build_vm, compile_graph, import_model
from lastbit.report import Report, build_report
from lastbit.squeeze import Squeeze
from lastbit.targets import Target, get_target

log = logging.getLogger(__name__)

# TVM's thread pool halves the core count to skip hyperthreads, which leaves half of a
# small VM idle; use every core unless the user chose (read when the pool first starts).
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def compile(  # noqa: A001 - the verb users expect
    model,
    target: "str | Target" = "x86_64-linux-gnu",
    example_inputs: Sequence | None = None,
    *,
    name: str | None = None,
    dump_ir: "str | Path | None" = None,
    squeeze: "Squeeze | None" = None,
    db: "str | Path | None" = None,
    trust_pickle: bool = False,
) -> "Artifact":
    """Compile ``model`` (torch module, ONNX path/proto, .pt2 path or Graph) for ``target``.

    ``example_inputs`` is needed for torch modules (they fix the input shapes).
    ``dump_ir`` writes the IR after each phase of ``lastbit/pipeline.py`` into that folder.
    ``squeeze`` (``lastbit.Squeeze(bits=3, ...)``) shrinks the model first; with labelled
    data and a torch module it fine-tunes it (ADMM), else it projects the weights.
    ``db`` is a tuning database folder written by ``lastbit tune``: functions it has records
    for get their best tuned schedule, the others the default one.
    ``trust_pickle=True`` allows a .pt2 file: ``torch.export.load`` unpickles it, which can
    run code from the file, so it is refused without this.
    """
    target = get_target(target)
    graph = import_model(model, example_inputs, name=name, trust_pickle=trust_pickle)
    torch_module = model if _is_torch_module(model) else None
    compiled = compile_graph(graph, target, dump_ir=dump_ir, squeeze=squeeze, torch_module=torch_module, db=db)
    return Artifact(compiled, squeeze=squeeze, torch_module=torch_module)


def _is_torch_module(model) -> bool:
    import sys

    torch = sys.modules.get("torch")  # a torch module implies torch is imported already
    return torch is not None and isinstance(model, torch.nn.Module)


class Artifact:
    """A model compiled for one target: ``run`` it, ``export`` it, ``report`` its cost."""

    def __init__(self, compiled: Compiled, squeeze: "Squeeze | None" = None, torch_module=None):
        self._compiled = compiled
        self._vm = None
        self._profile_vm = None  # function_times_ms's own VM: its instrument hook stays on it
        self._bundle_dir: Path | None = None
        # Where run() builds the bundle for a non-host target; removed with the artifact.
        self._bundle_tmp: tempfile.TemporaryDirectory | None = None
        self.squeeze = squeeze
        self._torch_module = torch_module
        self._accuracy: float | None = None

    @property
    def target(self) -> Target:
        return self._compiled.target

    @property
    def graph(self) -> Graph:
        return self._compiled.graph

    @property
    def torch_module(self):
        """The torch module behind this artifact: the ADMM fine-tuned copy when squeezing
        trained one (its quantized weights are exactly the graph's α·codes), else the
        module that was compiled; None for ONNX/.pt2 sources."""
        return self._compiled.torch_module if self._compiled.torch_module is not None else self._torch_module

    @property
    def mod(self):
        """The scheduled TensorIR module (Relax ``main`` calling PrimFuncs)."""
        return self._compiled.mod

    # -- running -------------------------------------------------------------------------
    def run(self, *inputs) -> "np.ndarray | list[np.ndarray]":
        """Run on the target (host: in-process VM; ARM: the bundle under qemu-user).

        Returns one array for single-output models, else a list.
        """
        arrays = self._check_inputs(inputs)
        if self.target.is_host or self.target.runner == "sim":  # sim: host part in-process, accelerator simulated
            outputs = self._run_vm(arrays)
        else:
            from lastbit.codegen.bundle import run_bundle

            outputs = run_bundle(self._ensure_bundle(), arrays)
        return outputs[0] if len(outputs) == 1 else outputs

    def latency_ms(self, *inputs, repeat: int = 30, warmup: int = 3) -> float:
        """Median wall-clock latency of one call on the host target."""
        if not self.target.is_host:
            raise RunError(f"latency of '{self.target.triple}' cannot be measured on this host")
        import tvm

        arrays = self._check_inputs(inputs)
        vm = self._ensure_vm()
        args = [tvm.runtime.tensor(a) for a in arrays]
        for _ in range(warmup):
            vm["main"](*args)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            vm["main"](*args)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)

    def function_times_ms(self, *inputs, runs: int = 10, warmup: int = 2) -> dict[str, float]:
        """Where one call of the host model spends its time: wall-clock ms per call of
        ``main`` for every function it calls (PrimFuncs and VM builtins), averaged over
        ``runs`` calls, timed by the VM's instrument hook (a few µs of hook per call)."""
        if not self.target.is_host:
            raise RunError(f"'{self.target.triple}' cannot be profiled on this host")
        import tvm
        from tvm import relax

        args = [tvm.runtime.tensor(a) for a in self._check_inputs(inputs)]
        if self._profile_vm is None:  # built once: a caller interleaving rounds must not rebuild per call
            self._profile_vm = relax.VirtualMachine(build_vm(self.mod, self.target), tvm.cpu())
        vm = self._profile_vm
        vm.set_instrument(None)
        for _ in range(warmup):
            vm["main"](*args)
        totals: dict[str, float] = {}
        started: list[float] = []

        def hook(func, name, before_run, ret_value, *_args) -> int:
            if before_run:
                started.append(time.perf_counter())
            else:
                totals[str(name)] = totals.get(str(name), 0.0) + time.perf_counter() - started.pop()
            return 0  # VMInstrumentReturnKind.NO_OP

        vm.set_instrument(hook)
        for _ in range(runs):
            vm["main"](*args)
        return {name: seconds * 1e3 / runs for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}

    def _check_inputs(self, inputs) -> list[np.ndarray]:
        specs = self.graph.inputs
        if len(inputs) != len(specs):
            raise RunError(f"model '{self.graph.name}' takes {len(specs)} input(s), got {len(inputs)}")
        arrays = []
        for spec, value in zip(specs, inputs):
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            array = np.ascontiguousarray(value)
            if tuple(array.shape) != spec.shape:
                raise RunError(f"input '{spec.name}': expected shape {spec.shape}, got {tuple(array.shape)}")
            if str(array.dtype) != spec.dtype:
                raise RunError(f"input '{spec.name}': expected dtype {spec.dtype}, got {array.dtype}")
            arrays.append(array)
        return arrays

    def _ensure_vm(self):
        if self._vm is None:
            import tvm
            from tvm import relax

            self._vm = relax.VirtualMachine(build_vm(self.mod, self.target), tvm.cpu())
        return self._vm

    def _run_vm(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import tvm

        result = self._ensure_vm()["main"](*[tvm.runtime.tensor(a) for a in arrays])
        return _flatten(result)

    def _ensure_bundle(self) -> Path:
        if self._bundle_dir is None:
            # A TemporaryDirectory is removed when the artifact is collected, or at exit.
            tmp = tempfile.TemporaryDirectory(prefix="lastbit-bundle-")
            try:
                self._bundle_dir = build_bundle(self.mod, self.target, Path(tmp.name) / "bundle", name=self.graph.name)
            except BaseException:
                tmp.cleanup()
                raise
            self._bundle_tmp = tmp
        return self._bundle_dir

    def close(self) -> None:
        """Remove the bundle ``run`` built for a non-host target (done anyway when the
        artifact is garbage-collected or the process exits); a later ``run`` rebuilds it."""
        if self._bundle_tmp is not None:
            self._bundle_tmp.cleanup()
            self._bundle_tmp = self._bundle_dir = None

    # -- exporting and reporting ------------------------------------------------------------
    def export(self, out_dir: "str | Path") -> Path:
        """Write a deployable bundle (shared library, plan, params, runner, manifest.json) atomically;
        for a simulated accelerator, its programs (codegen/accel/export.py)."""
        out_dir = Path(out_dir)
        if self.target.runner == "sim":  # the accelerator programs; the host part runs in-process
            from lastbit.codegen.accel.export import export_programs

            log.warning("%s: writing the accelerator programs only; the host part of the model is not bundled",
                        self.target.triple)
            return export_programs(self._compiled.accel, out_dir, self.target.triple, self.graph.name)
        if self._bundle_dir is not None:  # already built to run it (ARM): do not compile again
            from lastbit.codegen.bundle import copy_bundle

            return copy_bundle(self._bundle_dir, out_dir)
        return build_bundle(self.mod, self.target, out_dir, name=self.graph.name)

    def report(self) -> Report:
        """Parameters, bytes (codes packed), FLOPs per layer; with labelled squeeze data on
        the host, also the compiled model's accuracy on it (measured once)."""
        report = build_report(self.graph, self.target.triple, self._compiled.kernels)
        if getattr(self._compiled, "accel", None) is not None:  # cycles, utilisation, DRAM, energy vs int8 MACs
            report.accelerator = self._compiled.accel.summary()
            offloaded = {row["layer"] for row in report.accelerator["layers"]}
            for layer in report.layers:
                if layer.name in offloaded:
                    layer.kernel = f"accel {report.accelerator['config']['name']} shift-add"
        sq = self.squeeze
        if sq is not None and sq.layers is not None:
            report.layer_choices = sq.layers.to_dict()["layers"]
        if sq is not None and sq.data is not None and sq.has_labels and self.target.is_host:
            if self._accuracy is None:
                self._accuracy = self.accuracy(sq.data)
            report.accuracy = self._accuracy
        return report

    def accuracy(self, data) -> float:
        """Top-1 accuracy of the compiled model on (X, y) arrays or (x, y) batches, run in
        chunks of the model's batch size (a remainder smaller than that is left out)."""
        if len(self.graph.inputs) != 1:
            raise RunError(f"accuracy needs a single-input model; '{self.graph.name}' takes {len(self.graph.inputs)}")
        x, y = _labelled_arrays(data)
        batch = self.graph.inputs[0].shape[0]
        usable = (len(x) // batch) * batch
        if usable == 0:
            raise RunError(f"{len(x)} samples are fewer than the model's batch size {batch}")
        dtype = self.graph.inputs[0].dtype
        correct = 0
        for start in range(0, usable, batch):
            logits = np.asarray(self.run(x[start:start + batch].astype(dtype)))
            correct += int(np.sum(logits.reshape(batch, -1).argmax(axis=1) == y[start:start + batch]))
        return correct / usable


def _labelled_arrays(data) -> tuple[np.ndarray, np.ndarray]:
    def as_array(a):
        return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        return as_array(data[0]), as_array(data[1]).reshape(-1)
    xs, ys = zip(*[(as_array(x), as_array(y)) for x, y in data])
    return np.concatenate(xs), np.concatenate(ys).reshape(-1)


def _flatten(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(_flatten(item))
    return out
