"""The deployable bundle: a compiled model that runs without the TVM runtime, on any target.

A bundle is a directory holding the model's kernels as a shared library, a flat execution
plan, the weights, and a ~600-line C runner (``runtime/lastbit_run.c``) built for the target:

    kernels.so       the PrimFuncs, one tvm-ffi packed function each (__tvm_ffi_<name>)
    plan.txt         buffers and steps, whitespace-separated tokens (see Plan.to_text)
    params.bin       every constant, each at a 64-byte aligned offset
    lastbit_run      the runner, built for the target (dynamic, -rdynamic)
    lastbit_run.c/.h its source, to rebuild on a board with a different libc
    manifest.json    target, input/output specs, versions, sha256 of every file

``build_bundle`` writes one; ``run_bundle`` runs it natively or under qemu-user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lastbit.errors import ArtifactError, RunError, TargetError, UnsupportedOpError
from lastbit.fileio import check_replaceable_dir, staged_dir

log = logging.getLogger(__name__)

FORMAT = "lastbit-bundle"
FORMAT_VERSION = 1
PLAN_VERSION = 1
PARAM_ALIGN_BYTES = 64

KERNELS_FILE = "kernels.so"
PLAN_FILE = "plan.txt"
PARAMS_FILE = "params.bin"
RUNNER_FILE = "lastbit_run"
MANIFEST_FILE = "manifest.json"
RUNTIME_DIR = Path(__file__).parent / "runtime"
RUNNER_SOURCES = ("lastbit_run.c", "lastbit_run.h")

# runner exit status (see lastbit_run.c)
_EXIT_BAD_BUNDLE = 3

BUFFER_KINDS = ("input", "const", "temp", "output", "view")
MANIFEST_KEYS = (
    "format", "format_version", "name", "target", "tvm_target", "run", "inputs", "outputs",
    "params_bytes", "num_steps", "versions", "files",
)


# --------------------------------------------------------------------------------------
# Plan


@dataclass
class PlanBuffer:
    """One tensor the plan touches.

    ``kind`` is ``input`` (a model input), ``const`` (a weight, its bytes in params.bin),
    ``temp`` (written by one step, read by later ones), ``output`` (written by a step and
    returned) or ``view`` (a reshape of ``base``: same memory, another shape).
    """

    id: int
    shape: tuple[int, ...]
    dtype: str
    kind: str
    name: str
    base: int | None = None  # kind == "view": the buffer that owns the memory
    value: np.ndarray | None = field(default=None, repr=False, compare=False)  # kind == "const"

    def __post_init__(self):
        if self.kind not in BUFFER_KINDS:
            raise ValueError(f"buffer kind must be one of {BUFFER_KINDS}, not {self.kind!r}")

    @property
    def size_bytes(self) -> int:
        bits = _dl_dtype(self.dtype)[1] * _dl_dtype(self.dtype)[2]
        return (int(np.prod(self.shape, dtype=np.int64)) * bits + 7) // 8


@dataclass(frozen=True)
class PlanStep:
    """Call PrimFunc ``func`` with these buffers (inputs first, outputs last: destination passing)."""

    func: str
    args: tuple[int, ...]


@dataclass
class Plan:
    """What ``main`` does, flattened: the buffers, the calls in order, which buffers are the
    model's inputs and outputs (outputs in the order ``main`` returns them, tuples flattened)."""

    buffers: list[PlanBuffer]
    steps: list[PlanStep]
    inputs: list[int]
    outputs: list[int]

    @property
    def functions(self) -> list[str]:
        """PrimFunc names in first-use order."""
        return list(dict.fromkeys(step.func for step in self.steps))

    def param_offsets(self) -> dict[int, int]:
        """Byte offset of each constant in params.bin (buffer id -> offset)."""
        offsets, cursor = {}, 0
        for buf in self.buffers:
            if buf.kind == "const":
                offsets[buf.id] = cursor
                cursor = _align(cursor + buf.size_bytes)
        return offsets

    @property
    def params_bytes(self) -> int:
        consts = [b for b in self.buffers if b.kind == "const"]
        if not consts:
            return 0
        last = consts[-1]
        return self.param_offsets()[last.id] + last.size_bytes

    def params_blob(self) -> bytes:
        blob = bytearray(self.params_bytes)
        for buf_id, offset in self.param_offsets().items():
            data = np.ascontiguousarray(self.buffers[buf_id].value).tobytes()
            blob[offset : offset + len(data)] = data
        return bytes(blob)

    def to_text(self) -> str:
        """The plan as lastbit_run parses it: one entry per line, tokens separated by spaces.

        ``buffer ID KIND DTYPE CODE BITS LANES NDIM DIM... BASE PARAM_OFFSET`` (BASE and
        PARAM_OFFSET are -1 where they do not apply; DTYPE is for people, CODE/BITS/LANES
        are the DLDataType), ``function NAME``, ``step FUNC_INDEX NARGS BUFFER_ID...``,
        ``input ID``, ``output ID``, then ``end`` so a truncated file is detected.
        """
        offsets = self.param_offsets()
        func_index = {name: i for i, name in enumerate(self.functions)}
        lines = [f"lastbit-plan {PLAN_VERSION}", f"params_bytes {self.params_bytes}"]
        for buf in self.buffers:
            code, bits, lanes = _dl_dtype(buf.dtype)
            dims = " ".join(str(d) for d in buf.shape)
            base = -1 if buf.base is None else buf.base
            lines.append(
                f"buffer {buf.id} {buf.kind} {buf.dtype} {code} {bits} {lanes} {len(buf.shape)}"
                f"{' ' + dims if dims else ''} {base} {offsets.get(buf.id, -1)}"
            )
        lines += [f"function {name}" for name in self.functions]
        for step in self.steps:
            args = "".join(f" {i}" for i in step.args)
            lines.append(f"step {func_index[step.func]} {len(step.args)}{args}")
        lines += [f"input {i}" for i in self.inputs]
        lines += [f"output {i}" for i in self.outputs]
        lines.append("end")
        return "\n".join(lines) + "\n"


def _align(n: int) -> int:
    return (n + PARAM_ALIGN_BYTES - 1) // PARAM_ALIGN_BYTES * PARAM_ALIGN_BYTES


def _dl_dtype(dtype: str) -> tuple[int, int, int]:
    import tvm_ffi

    d = tvm_ffi.dtype(dtype)
    return int(d.type_code), int(d.bits), int(d.lanes)


def extract_plan(mod) -> Plan:
    """Flatten ``mod["main"]`` (the output of ``lower_to_tir``, scheduled or not) into a Plan.

    ``main`` may bind ``call_tir`` calls, tuples, tuple items, plain aliases and
    ``R.reshape`` (a view); anything else raises UnsupportedOpError naming the op and var.
    """
    from tvm import relax

    main = mod["main"]
    builder = _PlanBuilder(mod)
    inputs = [builder.add_input(param) for param in main.params]
    for block in main.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise UnsupportedOpError(
                    type(binding).__name__, binding.var.name, "cannot be placed in a bundle"
                )
            builder.bind(binding.var, binding.value)
    outputs = list(_flatten(builder.value_of(main.body.body, "return")))
    for buf_id in outputs:
        if builder.buffers[buf_id].kind == "temp":
            builder.buffers[buf_id].kind = "output"
    return Plan(builder.buffers, builder.steps, inputs, outputs)


class _PlanBuilder:
    """Walks ``main``'s bindings, giving every tensor a buffer and every call_tir a step.

    A Relax var's value is a buffer id, or a tuple of values for tuple-typed vars.
    """

    def __init__(self, mod):
        import tvm

        self.mod = mod
        self.buffers: list[PlanBuffer] = []
        self.steps: list[PlanStep] = []
        self.values: dict[Any, Any] = {}  # relax Var -> value
        self.consts: list[tuple[Any, int]] = []  # (Constant, buffer id): one buffer per constant
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.reshape = tvm.ir.Op.get("relax.reshape")

    def new_buffer(self, ty, kind: str, name: str, **extra) -> int:
        shape, dtype = _static_tensor_type(ty, name)
        self.buffers.append(PlanBuffer(len(self.buffers), shape, dtype, kind, name, **extra))
        return len(self.buffers) - 1

    def add_input(self, param) -> int:
        self.values[param] = self.new_buffer(param.ty, "input", param.name)
        return self.values[param]

    def bind(self, var, expr) -> None:
        from tvm import relax

        if isinstance(expr, relax.Call) and expr.op.same_as(self.call_tir):
            self.values[var] = self.add_call_tir(var, expr)
        elif isinstance(expr, relax.Call) and expr.op.same_as(self.reshape):
            self.values[var] = self.add_view(var, expr.args[0])
        else:
            self.values[var] = self.value_of(expr, var.name)

    def add_call_tir(self, var, call):
        from tvm import tirx

        if len(call.args) != 2:
            raise UnsupportedOpError(
                "relax.call_tir", var.name, "symbolic shape arguments cannot be placed in a bundle"
            )
        func_gv = call.args[0]
        name = func_gv.name_hint
        func = self.mod[func_gv]
        if not isinstance(func, tirx.PrimFunc):
            raise UnsupportedOpError("relax.call_tir", var.name, f"callee {name} is not a PrimFunc")
        arg_ids = [self.tensor_of(arg, var.name) for arg in _call_args(call.args[1])]
        returns_tuple = hasattr(call.ty, "fields")
        out_types = list(call.ty.fields) if returns_tuple else [call.ty]
        out_ids = [
            self.new_buffer(ty, "temp", f"{var.name}.{i}" if returns_tuple else var.name)
            for i, ty in enumerate(out_types)
        ]
        all_ids = arg_ids + out_ids  # destination passing: outputs are the last parameters
        if len(func.params) != len(all_ids):
            raise UnsupportedOpError(
                name, var.name, f"takes {len(func.params)} buffers, the call passes {len(all_ids)}"
            )
        _check_buffer_types(func, name, [self.buffers[i] for i in all_ids])
        self.steps.append(PlanStep(name, tuple(all_ids)))
        return tuple(out_ids) if returns_tuple else out_ids[0]

    def add_view(self, var, source) -> int:
        base = self.tensor_of(source, var.name)
        if self.buffers[base].kind == "view":
            base = self.buffers[base].base  # views always point at the buffer owning the memory
        view = self.new_buffer(var.ty, "view", var.name, base=base)
        if self.buffers[view].size_bytes != self.buffers[base].size_bytes:
            raise UnsupportedOpError("relax.reshape", var.name, "changes the number of elements")
        return view

    def const_buffer(self, expr) -> int:
        for known, buf_id in self.consts:
            if known.same_as(expr):
                return buf_id
        buf_id = self.new_buffer(expr.ty, "const", f"const{len(self.consts)}", value=_constant_value(expr))
        self.consts.append((expr, buf_id))
        return buf_id

    def value_of(self, expr, where: str):
        import tvm
        from tvm import relax

        if isinstance(expr, relax.Var):
            if expr not in self.values:
                raise UnsupportedOpError(
                    type(expr).__name__, expr.name, "free variable cannot be placed in a bundle"
                )
            return self.values[expr]
        if isinstance(expr, tvm.ir.Constant):
            return self.const_buffer(expr)
        if isinstance(expr, relax.Tuple):
            return tuple(self.value_of(f, where) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            tup = self.value_of(expr.tuple_value, where)
            if not isinstance(tup, tuple):
                raise UnsupportedOpError("TupleGetItem", where, "indexes a tensor, not a tuple")
            return tup[int(expr.index)]
        raise UnsupportedOpError(_op_name(expr), where, "cannot be placed in a bundle")

    def tensor_of(self, expr, where: str) -> int:
        value = self.value_of(expr, where)
        if isinstance(value, tuple):
            raise UnsupportedOpError("tuple argument", where, "call_tir arguments must be tensors")
        return value


def _call_args(args) -> list:
    from tvm import relax

    return list(args.fields) if isinstance(args, relax.Tuple) else [args]


def _flatten(value):
    if isinstance(value, tuple):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def _op_name(expr) -> str:
    op = getattr(expr, "op", None)
    if op is not None:
        return getattr(op, "name", None) or getattr(op, "name_hint", None) or str(op)
    return type(expr).__name__


def _static_tensor_type(ty, name: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    dtype = getattr(ty, "dtype", None)
    if shape is None or dtype is None or hasattr(ty, "fields"):
        raise UnsupportedOpError(str(ty), name, "only tensors of known shape can be placed in a bundle")
    dims = []
    for dim in shape:
        if not hasattr(dim, "value"):
            raise UnsupportedOpError(f"dynamic shape {shape}", name, "cannot be placed in a bundle")
        dims.append(int(dim.value))
    return tuple(dims), str(dtype)


def _constant_value(expr) -> np.ndarray:
    for attr in ("value", "data"):
        value = getattr(expr, attr, None)
        if value is not None and hasattr(value, "numpy"):
            return np.ascontiguousarray(value.numpy())
    raise UnsupportedOpError(type(expr).__name__, "constant", "has no tensor value")


def _check_buffer_types(func, name: str, bufs: list[PlanBuffer]) -> None:
    """Catch a call whose tensors disagree with the PrimFunc's buffers now, not in the runner."""
    for param, buf in zip(func.params, bufs):
        decl_shape = getattr(param, "shape", None)  # PrimFunc params are buffer vars in 0.27
        if decl_shape is None:
            continue
        shape = tuple(int(d.value) if hasattr(d, "value") else -1 for d in decl_shape)
        shape_differs = len(shape) != len(buf.shape) or any(
            a not in (-1, b) for a, b in zip(shape, buf.shape)
        )
        if str(param.dtype) != buf.dtype or shape_differs:
            raise UnsupportedOpError(
                name, buf.name,
                f"buffer {param.name} is {shape} {param.dtype}, the call passes {buf.shape} {buf.dtype}",
            )


# --------------------------------------------------------------------------------------
# Build


def build_bundle(
    mod,
    target,
    out_dir: "str | Path",
    *,
    name: str = "model",
    extra_manifest: dict | None = None,
) -> Path:
    """Compile ``mod`` (from ``lower_to_tir``, scheduled or not) into a bundle at ``out_dir``.

    The bundle is built in a temporary directory beside ``out_dir`` and renamed into place
    once complete; an existing ``out_dir`` is replaced only then.  On any failure nothing
    new remains and an old ``out_dir`` is untouched.
    """
    from lastbit.targets import get_target

    target = get_target(target)
    out_dir = Path(out_dir).absolute()
    cc = target.cross_cc or "gcc"
    if shutil.which(cc) is None:
        hint = f" (Debian: apt-get install {' '.join(target.apt_packages)})" if target.apt_packages else ""
        raise TargetError(f"target '{target.triple}' needs the C compiler {cc} on PATH{hint}")
    clash = sorted(set(extra_manifest or {}) & set(MANIFEST_KEYS))
    if clash:
        raise ValueError(f"extra_manifest keys {clash} would overwrite bundle fields")
    check_replaceable_dir(out_dir, MANIFEST_FILE, FORMAT, "a lastbit bundle")
    plan = extract_plan(mod)

    with staged_dir(out_dir) as tmp:
        _build_kernels(mod, plan, target, cc, tmp / KERNELS_FILE)
        (tmp / PARAMS_FILE).write_bytes(plan.params_blob())
        (tmp / PLAN_FILE).write_text(plan.to_text())
        _build_runner(cc, tmp)
        manifest = _manifest(plan, target, cc, name, tmp)
        manifest.update(extra_manifest or {})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("bundle %s for %s written to %s", name, target.triple, out_dir)
    return out_dir


def _build_kernels(mod, plan: Plan, target, cc: str, path: Path) -> None:
    import tvm

    funcs = {}
    for func_name in plan.functions:
        funcs[func_name] = mod[func_name].with_attr("global_symbol", func_name)
    executable = tvm.compile(tvm.IRModule(funcs), target=target.tvm())
    if list(getattr(executable.mod, "imports", []) or []):
        raise TargetError(
            f"kernels for '{target.triple}' import other modules; a bundle holds only host code"
        )
    # Kernels call libm (erff, expf, ...); record the dependency in kernels.so itself, since
    # the runner need not link libm for its own sake.
    try:
        executable.export_library(str(path), cc=cc, options=["-Wl,--no-as-needed", "-lm"])
    except Exception as err:  # tvm reports a failed link as a bare RuntimeError
        raise TargetError(f"{cc} failed linking {KERNELS_FILE} for '{target.triple}': {err}") from err


def _tvm_ffi_include() -> str | None:
    try:
        import tvm_ffi.libinfo

        return tvm_ffi.libinfo.find_include_path()
    except Exception:  # the ABI check is a safety net; the runner builds without it
        return None


def _build_runner(cc: str, bundle: Path) -> None:
    for src in RUNNER_SOURCES:
        shutil.copyfile(RUNTIME_DIR / src, bundle / src)
    include = _tvm_ffi_include()
    if include:
        _run_cc([cc, "-fsyntax-only", "-std=c99", "-DLASTBIT_CHECK_ABI", f"-I{include}",
                 "-x", "c", str(bundle / "lastbit_run.h")], "ABI check of lastbit_run.h")
    else:
        log.warning("tvm_ffi headers not found: skipping the runner's ABI check")
    source, binary = bundle / "lastbit_run.c", bundle / RUNNER_FILE
    _run_cc([cc, *_RUNNER_CFLAGS, "-o", str(binary), str(source), *_RUNNER_LIBS], "lastbit_run")


# -rdynamic: kernels.so resolves TVMFFIErrorSetRaisedFromCStrParts & co. against the runner
_RUNNER_CFLAGS = ("-O2", "-std=c99", "-Wall", "-rdynamic")
_RUNNER_LIBS = ("-ldl", "-lpthread", "-lm")


def _run_cc(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"{cmd[0]} failed building {what}:\n{proc.stderr.strip()}")


def _manifest(plan: Plan, target, cc: str, name: str, bundle: Path) -> dict:
    import tvm
    import tvm_ffi

    import lastbit

    def spec(buf_id: int, label: str) -> dict:
        buf = plan.buffers[buf_id]
        return {"name": label, "shape": list(buf.shape), "dtype": buf.dtype}

    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "target": target.triple,
        "tvm_target": _target_json(target.tvm()),
        "run": {
            "runner": target.runner,
            "qemu": target.qemu,
            "qemu_cpu": target.qemu_cpu,
            "sysroot": target.sysroot,
            "cc": cc,
            "cflags": list(_RUNNER_CFLAGS),
            "libs": list(_RUNNER_LIBS),
        },
        "inputs": [spec(i, plan.buffers[i].name) for i in plan.inputs],
        "outputs": [spec(i, f"output{k}") for k, i in enumerate(plan.outputs)],
        "params_bytes": plan.params_bytes,
        "num_steps": len(plan.steps),
        "versions": {
            "lastbit": getattr(lastbit, "__version__", None) or _dist_version("lastbit"),
            "tvm": tvm.__version__,
            "tvm_ffi": tvm_ffi.__version__,
            "numpy": np.__version__,
        },
        "files": {f: _sha256(bundle / f) for f in files},
    }
    assert tuple(manifest) == MANIFEST_KEYS
    return manifest


def _target_json(tvm_target) -> Any:
    text = str(tvm_target)
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def copy_bundle(bundle_dir: "str | Path", out_dir: "str | Path") -> Path:
    """Copy a finished bundle to ``out_dir`` with the same guarantees as ``build_bundle``
    (copied beside it, renamed into place, an old bundle replaced only then)."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir).absolute()
    load_manifest(bundle_dir)  # a damaged source is refused before anything is written
    check_replaceable_dir(out_dir, MANIFEST_FILE, FORMAT, "a lastbit bundle")
    with staged_dir(out_dir) as tmp:
        shutil.copytree(bundle_dir, tmp, dirs_exist_ok=True)
    return out_dir


# --------------------------------------------------------------------------------------
# Run


@dataclass(frozen=True)
class BundleTiming:
    """Wall time of the plan alone (no process start, no file IO), per run and the median."""

    median_ms: float
    runs_ms: tuple[float, ...]
    threads: int


def load_manifest(bundle_dir: "str | Path", *, verify: bool = True) -> dict:
    """Read a bundle's manifest; with ``verify``, check every file against its sha256.

    A missing, unreadable or modified file raises ArtifactError naming it.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (is {bundle_dir} a lastbit bundle?)") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: bundle format {manifest.get('format_version')}, this lastbit reads {FORMAT_VERSION}"
        )
    if verify:
        for fname in (KERNELS_FILE, PLAN_FILE, PARAMS_FILE, RUNNER_FILE):
            if fname not in manifest.get("files", {}):
                raise ArtifactError(f"{path}: does not list {fname}")
        for fname, digest in manifest["files"].items():
            fpath = bundle_dir / fname
            if not fpath.is_file():
                raise ArtifactError(f"{fpath}: missing from the bundle")
            if _sha256(fpath) != digest:
                raise ArtifactError(f"{fpath}: corrupt (sha256 differs from {MANIFEST_FILE})")
    return manifest


def run_bundle(
    bundle_dir: "str | Path",
    inputs: Sequence[np.ndarray],
    *,
    timeout_s: float = 300.0,
    threads: int | None = None,
    verify: bool = True,
) -> list[np.ndarray]:
    """Run a bundle on ``inputs`` (in manifest order) and return its outputs.

    Runs natively when the bundle's architecture is this machine's, else under the qemu-user
    recorded in the manifest.  Wrong inputs and runner failures raise RunError; a missing or
    corrupt bundle file raises ArtifactError naming it.  ``threads`` sizes the runner's pool
    (default: all CPUs); ``verify=False`` skips hashing the files against the manifest.
    """
    outputs, _ = _run(bundle_dir, inputs, timeout_s=timeout_s, threads=threads, repeat=0, verify=verify)
    return outputs


def time_bundle(
    bundle_dir: "str | Path",
    inputs: Sequence[np.ndarray],
    *,
    repeat: int = 10,
    timeout_s: float = 600.0,
    threads: int | None = None,
    verify: bool = True,
) -> BundleTiming:
    """Time the plan inside the runner: one warm-up run, then ``repeat`` timed runs."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    _, stdout = _run(bundle_dir, inputs, timeout_s=timeout_s, threads=threads, repeat=repeat, verify=verify)
    fields = {line.split(" ", 1)[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}
    try:
        return BundleTiming(
            median_ms=float(fields["median_ms"][0]),
            runs_ms=tuple(float(x) for x in fields["runs_ms"]),
            threads=int(fields["threads"][0]),
        )
    except (KeyError, IndexError, ValueError) as err:
        raise RunError(f"lastbit_run printed no timing: {stdout!r}") from err


def _run(bundle_dir, inputs, *, timeout_s: float, threads: int | None, repeat: int, verify: bool):
    bundle_dir = Path(bundle_dir).absolute()
    manifest = load_manifest(bundle_dir, verify=verify)
    arrays = _check_inputs(manifest, inputs)
    cmd_prefix = _runner_prefix(manifest)
    with tempfile.TemporaryDirectory(prefix="lastbit-run-") as io_dir:
        for i, arr in enumerate(arrays):
            arr.tofile(os.path.join(io_dir, f"input_{i}.bin"))
        cmd = [*cmd_prefix, str(bundle_dir / RUNNER_FILE), str(bundle_dir), io_dir]
        if repeat:
            cmd += ["--repeat", str(repeat)]
        if threads:
            cmd += ["--threads", str(threads)]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RunError(f"{bundle_dir}: lastbit_run did not finish within {timeout_s:g} s") from None
        except OSError as err:
            raise RunError(f"{bundle_dir}: cannot start {cmd[0]}: {err}") from err
        stderr = proc.stderr.strip()
        if proc.returncode == _EXIT_BAD_BUNDLE:
            raise ArtifactError(f"{bundle_dir}: {stderr}")
        if proc.returncode != 0:
            rc = proc.returncode
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with {rc}"
            raise RunError(f"{bundle_dir}: lastbit_run {how}: {stderr or '(no stderr)'}")
        outputs = [
            _read_output(Path(io_dir) / f"output_{k}.bin", spec) for k, spec in enumerate(manifest["outputs"])
        ]
    return outputs, proc.stdout


def _check_inputs(manifest: dict, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    specs = manifest["inputs"]
    if len(inputs) != len(specs):
        names = ", ".join(s["name"] for s in specs)
        raise RunError(f"model takes {len(specs)} input(s) ({names}), got {len(inputs)}")
    arrays = []
    for k, (spec, value) in enumerate(zip(specs, inputs)):
        arr = np.asarray(value)
        want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        if arr.shape != want_shape or arr.dtype != want_dtype:
            raise RunError(
                f"input '{spec['name']}' (#{k}): expected shape {want_shape} {want_dtype}, "
                f"got {arr.shape} {arr.dtype}"
            )
        arrays.append(np.ascontiguousarray(arr))
    return arrays


def _read_output(path: Path, spec: dict) -> np.ndarray:
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunError(f"lastbit_run wrote no {path.name}: {err}") from err
    if len(data) != expected:
        raise RunError(f"{path.name}: {len(data)} bytes, expected {expected} for {shape} {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


_ARCH_FAMILY = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def _arch_family(arch: str) -> str:
    arch = arch.lower()
    if arch in _ARCH_FAMILY:
        return _ARCH_FAMILY[arch]
    return "arm" if arch.startswith("arm") else arch


def _runner_prefix(manifest: dict) -> list[str]:
    """[] to run natively, or the qemu-user command line that runs the target's binaries."""
    triple = manifest["target"]
    if _arch_family(triple.split("-")[0]) == _arch_family(platform.machine()):
        return []
    run = manifest.get("run", {})
    qemu = run.get("qemu")
    if not qemu:
        raise TargetError(
            f"bundle for '{triple}' cannot run on this {platform.machine()} host: no emulator recorded"
        )
    if shutil.which(qemu) is None:
        raise TargetError(
            f"running a '{triple}' bundle here needs {qemu} on PATH (Debian: apt-get install qemu-user)"
        )
    prefix = [qemu]
    if run.get("qemu_cpu"):
        prefix += ["-cpu", run["qemu_cpu"]]
    if run.get("sysroot"):
        prefix += ["-L", run["sysroot"]]
    return prefix
