"""The ``lastbit`` command line: a thin layer over ``lastbit.compile`` and friends."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from lastbit.errors import LastbitError


def _load_model(spec: str, pretrained: bool = True):
    """MODEL on the command line: a zoo name, an .onnx file or a torch.export .pt2 file."""
    path = Path(spec)
    if path.suffix.lower() in (".onnx", ".pt2") or path.exists():
        return str(path), None
    from lastbit.frontend.models import get_model

    module, example = get_model(spec, pretrained=pretrained)
    return module, (example,)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """lastbit: squeeze a trained model and compile it for a target triple."""
    # torch 2.13's pytree trips its own LeafSpec deprecation warning while exporting.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("compile")
@click.argument("model")
@click.option("--target", "-t", default="x86_64-linux-gnu", show_default=True, help="Target triple (see `lastbit targets`).")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="Write the IR after each pipeline phase here.")
@click.option("--untrained", is_flag=True, help="Zoo models: seeded random weights instead of trained ones (no training on first use).")
@click.option("--quant", default=None, metavar="SCHEME:BITS", help="Quantize weights data-free, e.g. pow2:3 (or pow2:ternary).")
@click.option("--db", "db_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None, help="Tuning database from `lastbit tune`: use its best schedules.")
@click.option("--prune", default=None, metavar="RATIO|flops:F", help="Remove this share of every channel group (0.5), or keep F of the FLOPs (flops:0.5).")
@click.option("--prune-criterion", default="l1", show_default=True, type=click.Choice(["l1", "bn"]), help="Channel importance: filter L1 norm or BN-γ.")
@click.option("--lowrank", default=None, metavar="auto|ENERGY|flops:F", help="Split dense and k×k conv layers by truncated SVD.")
@click.option("--sparsity", default=None, type=click.FloatRange(0, 1, max_open=True), help="Zero this share of each weight (stored run-length encoded).")
def compile_cmd(model: str, target: str, out_dir: Path, dump_ir: Path | None, untrained: bool, quant: str | None,
                db_dir: Path | None, prune: str | None, prune_criterion: str, lowrank: str | None,
                sparsity: float | None) -> None:
    """Compile MODEL (zoo name, .onnx or .pt2) for a target and export a deployable bundle."""
    import lastbit

    structural = _structural_squeeze(prune, prune_criterion, lowrank, sparsity)
    squeeze = lastbit.Squeeze.from_cli(quant, **structural) if quant else \
        (lastbit.Squeeze(**structural) if structural else None)
    module, example = _load_model(model, pretrained=not untrained)
    artifact = lastbit.compile(
        module, target=target, example_inputs=example, name=Path(model).stem, dump_ir=dump_ir, squeeze=squeeze,
        db=db_dir,
    )
    artifact.export(out_dir)
    click.echo(artifact.report().format_table())
    click.echo(f"bundle written to {out_dir}")


def _structural_squeeze(prune: str | None, criterion: str, lowrank: str | None, sparsity: float | None) -> dict:
    """Squeeze keyword arguments for --prune/--lowrank/--sparsity (numbers parsed, specs kept)."""
    def number_or_spec(text: str | None):
        if text is None:
            return None
        try:
            return float(text)
        except ValueError:
            return text

    options: dict = {}
    if prune is not None:
        options.update(prune=number_or_spec(prune), prune_criterion=criterion)
    if lowrank is not None:
        options["rank"] = number_or_spec(lowrank)
    if sparsity:
        options["sparsity"] = sparsity
    return options


@main.command("tune")
@click.argument("model")
@click.option("--target", "-t", default="x86_64-linux-gnu", show_default=True, help="Target triple (see `lastbit targets`).")
@click.option("--trials", "-n", default=64, show_default=True, type=click.IntRange(min=1), help="Measured candidates per task (including earlier runs with --resume).")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Tuning database directory (MetaSchedule JSON, one folder per target).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="RPC tracker of a device farm (default: a private loopback worker).")
@click.option("--key", default=None, help="Device key at the tracker (`lastbit farm status` lists them).")
@click.option("--resume", is_flag=True, help="Continue the database: measured candidates are not measured again.")
@click.option("--timeout", "timeout_s", default=10.0, show_default=True, help="Seconds one measurement may take before it is marked failed.")
@click.option("--untrained", is_flag=True, help="Zoo models: seeded random weights (tuning does not depend on the weights).")
@click.option("--quant", default=None, metavar="SCHEME:BITS", help="Tune the quantized model, e.g. pow2:3.")
def tune_cmd(model: str, target: str, trials: int, db_dir: Path, tracker: str | None, key: str | None, resume: bool,
             timeout_s: float, untrained: bool, quant: str | None) -> None:
    """Tune the kernels of MODEL on a device farm and store every measurement in --db."""
    import lastbit
    from lastbit.autotune.tuner import tune_model

    if tracker and not key:
        raise click.UsageError("--tracker needs --key (the device kind to measure on)")
    squeeze = lastbit.Squeeze.from_cli(quant) if quant else None
    module, example = _load_model(model, pretrained=not untrained)
    try:
        result = tune_model(module, target, db_dir, trials=trials, example_inputs=example, squeeze=squeeze,
                            tracker=tracker, key=key, resume=resume, timeout_s=timeout_s, name=Path(model).stem)
    except KeyboardInterrupt:
        click.echo(f"interrupted; every finished measurement is in {db_dir}: continue with --resume", err=True)
        sys.exit(130)
    click.echo(result.format_table())
    click.echo(f"records in {result.db_dir}; apply with: lastbit compile {model} --target {target} --db {db_dir} -o OUT")


@main.group("farm")
def farm_group() -> None:
    """Device farm for tuning: an RPC tracker, workers that register with it, their status."""


@farm_group.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 to serve other machines).")
@click.option("--port", default=9190, show_default=True, type=int)
def farm_tracker_cmd(host: str, port: int) -> None:
    """Run the RPC tracker until Ctrl-C."""
    from lastbit.autotune.farm import run_tracker

    run_tracker(host, port)


@farm_group.command("worker")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The tracker to register with.")
@click.option("--key", required=True, help="Device kind this worker measures for (e.g. x86-host, rpi4).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve sessions on.")
@click.option("--port", default=9090, show_default=True, type=int, help="First port to try (the next free one is used).")
@click.option("--threads", default=None, type=int, help="TVM_NUM_THREADS for the kernels measured here.")
@click.option("--device", type=click.Choice(["host", "accel-sim"]), default="host", show_default=True,
              help="What measures: this CPU running compiled kernels, or the accelerator's cycle simulator.")
def farm_worker_cmd(tracker: str, key: str, host: str, port: int, threads: int | None, device: str) -> None:
    """Serve measurements for KEY until Ctrl-C, restarting after a crashing kernel."""
    from lastbit.autotune.farm import connect_tracker, parse_address, run_worker

    connect_tracker(*parse_address(tracker), timeout_s=5.0)  # fail now, clearly, if it is not there
    if device == "accel-sim":
        from lastbit.codegen.accel.tuner import serve_forever

        serve_forever(host, port, tracker, key)
        return
    run_worker(tracker, key, host=host, port=port, threads=threads)


@farm_group.command("status")
@click.option("--tracker", default="127.0.0.1:9190", show_default=True, metavar="HOST:PORT")
def farm_status_cmd(tracker: str) -> None:
    """List the devices registered at the tracker, per key."""
    from lastbit.autotune.farm import farm_status, parse_address

    rows = farm_status(*parse_address(tracker))
    click.echo(f"{'key':<20} {'free':>4} {'pending':>7}  servers")
    for row in rows:
        click.echo(f"{row.key:<20} {row.free:>4} {row.pending:>7}  {', '.join(row.servers) or '-'}")
    if not rows:
        click.echo("(no workers registered)")


@main.command("run")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--input", "-i", "inputs", multiple=True, required=True, type=click.Path(path_type=Path, exists=True), help=".npy file per model input, in order.")
@click.option("--output", "-o", "out_path", type=click.Path(path_type=Path), default=None, help="Save the first output as .npy.")
def run_cmd(bundle: Path, inputs: tuple[Path, ...], out_path: Path | None) -> None:
    """Run an exported BUNDLE on .npy inputs (natively or under qemu-user)."""
    from lastbit.codegen.bundle import run_bundle

    arrays = [np.load(p, allow_pickle=False) for p in inputs]
    outputs = run_bundle(bundle, arrays)
    for i, out in enumerate(outputs):
        top = np.argsort(out.reshape(-1))[::-1][:5]
        click.echo(f"output {i}: shape {out.shape}, dtype {out.dtype}, top-5 indices {top.tolist()}")
    if out_path is not None:
        from lastbit.fileio import atomic_save_npy

        atomic_save_npy(out_path, outputs[0])
        click.echo(f"output 0 written to {out_path}")


@main.command("targets")
def targets_cmd() -> None:
    """List the known target triples."""
    from lastbit.targets import list_targets

    for target in list_targets():
        missing = target.missing_tools()
        state = "ready" if not missing else f"missing {', '.join(missing)}"
        click.echo(f"{target.triple:<26} {target.runner:<5} {state:<24} {target.description}")


@main.command("bench")
@click.option("--quick", is_flag=True, help="Fewer repeats and only the small models.")
def bench_cmd(quick: bool) -> None:
    """Run the benchmark harness (benchmarks/ in a source checkout) and print the ratios."""
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise click.ClickException("the benchmarks live in the source checkout (benchmarks/run_all.py)")
    sys.exit(subprocess.call([sys.executable, str(script)] + (["--quick"] if quick else [])))


@main.command("demo")
def demo_cmd() -> None:
    """LeNet-5 on Fashion-MNIST, fp32 vs 3-bit here and on aarch64 (qemu), then sample photos if time allows."""
    from lastbit.demo import run_demo

    run_demo()


def _entry() -> None:
    try:
        main(standalone_mode=True)
    except LastbitError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    _entry()
