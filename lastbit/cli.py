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
def compile_cmd(model: str, target: str, out_dir: Path, dump_ir: Path | None, untrained: bool, quant: str | None) -> None:
    """Compile MODEL (zoo name, .onnx or .pt2) for a target and export a deployable bundle."""
    import lastbit

    squeeze = lastbit.Squeeze.from_cli(quant) if quant else None
    module, example = _load_model(model, pretrained=not untrained)
    artifact = lastbit.compile(
        module, target=target, example_inputs=example, name=Path(model).stem, dump_ir=dump_ir, squeeze=squeeze
    )
    artifact.export(out_dir)
    click.echo(artifact.report().format_table())
    click.echo(f"bundle written to {out_dir}")


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
    """Compile the built-in default model for this host, classify sample images, print the report."""
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
