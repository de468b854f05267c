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


_TRUST_PICKLE_HELP = ("Allow a .pt2 MODEL: torch.export.load unpickles it, which can run code from the file. "
                      "Only for files you trust.")


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
@click.option("--prune-criterion", default="l1", show_default=True, type=click.Choice(["l1", "bn", "taylor"]), help="Channel importance: filter L1 norm, BN-γ, or Taylor |w·∂L/∂w| (needs --data and a zoo model).")
@click.option("--data", "data_spec", default=None, metavar="NAME[:N]",
              help="Labelled data for squeezing: a built-in dataset (fashion-mnist, mnist5k, digits), its first N "
                   "training samples (default 2048). Taylor pruning needs it; with --quant on a zoo model it "
                   "fine-tunes (ADMM, or STE with --finetune ste) and the report gives accuracy on it; with "
                   "--datafree its images calibrate, labels unused.")
@click.option("--lowrank", default=None, metavar="auto|ENERGY|flops:F", help="Split dense and k×k conv layers by truncated SVD.")
@click.option("--sparsity", default=None, type=click.FloatRange(0, 1, max_open=True), help="Zero this share of each weight (stored run-length encoded).")
@click.option("--layers", "layers_json", default=None, type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Per-layer code set / keep / rank (JSON, e.g. from `lastbit codesign`).")
@click.option("--act-bits", default=8, show_default=True, type=int, help="Activation bits of the low-bit layers (1..8; with --quant).")
@click.option("--finetune", "finetune", default="admm", show_default=True, type=click.Choice(["admm", "ste"]),
              help="With --quant and --data: train onto the codes by ADMM or straight through (STE; the more "
                   "accurate on the BatchNorm networks of benchmarks/quant_accuracy.py).")
@click.option("--datafree", is_flag=True,
              help="With --quant: data-free calibration (passes/datafree.py: BN folding, cross-layer equalization, "
                   "bias correction and GPTQ codes on DeepInversion images distilled from the BatchNorm statistics, "
                   "or on --data's images, labels unused) instead of plain projection.")
@click.option("--input-range", "input_range", default=None, metavar="LOW:HIGH",
              help="With --datafree: the range real inputs span after preprocessing; synthetic images are clamped to "
                   "it [default: the zoo model's, e.g. 0:1 for the Fashion-MNIST models; none for files].")
@click.option("--trust-pickle", is_flag=True, help=_TRUST_PICKLE_HELP)
@click.option("--keep-first-last/--no-keep-first-last", default=True, show_default=True,
              help="With --quant: keep the first and last weighted layers at int8.")
@click.option("--check", "check_source", is_flag=True, help="Run the compiled model and the source (onnxruntime for .onnx, torch for zoo models) on random input and print the largest difference; warns when the outputs are constant (the check would prove nothing).")
def compile_cmd(model: str, target: str, out_dir: Path, dump_ir: Path | None, untrained: bool, quant: str | None,
                db_dir: Path | None, prune: str | None, prune_criterion: str, lowrank: str | None,
                sparsity: float | None, layers_json: Path | None, trust_pickle: bool, keep_first_last: bool,
                data_spec: str | None, check_source: bool, act_bits: int, finetune: str, datafree: bool,
                input_range: str | None) -> None:
    """Compile MODEL (zoo name, .onnx or .pt2) for a target and export a deployable bundle."""
    import lastbit

    structural = _structural_squeeze(prune, prune_criterion, lowrank, sparsity)
    if layers_json is not None:
        structural["layers"] = layers_json
    if prune is not None and prune_criterion == "taylor" and data_spec is None:
        raise click.UsageError("--prune-criterion taylor needs labelled data: add --data fashion-mnist "
                               "(or mnist5k, digits; NAME:N for the first N samples)")
    if data_spec is not None:
        if not quant and not structural:
            raise click.UsageError("--data is used by --quant, --prune, --lowrank, --sparsity or --layers; give one of them")
        structural["data"] = _labelled_data(data_spec)
    if finetune != "admm":
        if not (quant and data_spec):
            raise click.UsageError(f"--finetune {finetune} trains onto the codes: it needs --quant and --data")
        if datafree:
            raise click.UsageError(f"--finetune {finetune} and --datafree exclude each other: one trains onto the "
                                   "codes, the other calibrates without training")
        structural["mode"] = finetune
    if datafree or input_range is not None:
        structural.update(_datafree_squeeze(model, quant, datafree, input_range, structural.get("data")))
    squeeze = lastbit.Squeeze.from_cli(quant, keep_first_last=keep_first_last, act_bits=act_bits, **structural) if quant else \
        (lastbit.Squeeze(**structural) if structural else None)
    module, example = _load_model(model, pretrained=not untrained)
    artifact = lastbit.compile(
        module, target=target, example_inputs=example, name=Path(model).stem, dump_ir=dump_ir, squeeze=squeeze,
        db=db_dir, trust_pickle=trust_pickle,
    )
    artifact.export(out_dir)
    click.echo(artifact.report().format_table())
    click.echo(f"bundle written to {out_dir}")
    if check_source:
        from lastbit.check import check_against_source

        click.echo(check_against_source(artifact, module).format())


def _labelled_data(spec: str, default_samples: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """--data NAME[:N]: the first N training samples of a built-in dataset as (X, y)."""
    from lastbit.frontend.datasets import load

    name, sep, count = spec.partition(":")
    if sep and not (count.isdigit() and int(count) > 0):
        raise click.BadParameter(f"{spec!r}: expected NAME or NAME:N with N a positive sample count",
                                 param_hint="--data")
    n = int(count) if sep else default_samples
    images, labels = load(name.strip(), "train")
    return images[:n], labels[:n]


def _datafree_squeeze(model: str, quant: str | None, datafree: bool, input_range: str | None, data) -> dict:
    """Squeeze keyword arguments for --datafree / --input-range: the DataFree step, with the synthetic
    images clamped to --input-range or the zoo model's range; --data's images calibrate, unlabelled."""
    from lastbit.frontend.models import ZOO
    from lastbit.passes.datafree import DataFree
    from lastbit.passes.zeroq import number_pair

    if not datafree:
        raise click.UsageError("--input-range clamps --datafree's synthetic images; add --datafree")
    if not quant:
        raise click.UsageError("--datafree calibrates the weights --quant quantizes; add --quant, e.g. pow2:3")
    if input_range is None:
        entry = ZOO.get(model)
        bounds = entry.input_range if entry is not None else None
    else:
        bounds = number_pair(input_range.split(":"))
        if bounds is None or not bounds[0] < bounds[1]:
            raise click.BadParameter(f"{input_range!r}: expected LOW:HIGH with finite numbers, LOW < HIGH (e.g. -1:1)",
                                     param_hint="--input-range")
    options = {"datafree": DataFree(synthetic_range=bounds), "mode": "data-free"}
    if data is not None:
        options["data"] = data[0]  # the images calibrate; labels are not used without training
    return options


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


@main.command("codesign")
@click.argument("model")
@click.option("--target", "-t", default="x86_64-linux-gnu", show_default=True, help="Target triple whose cost is measured.")
@click.option("--objective", type=click.Choice(["latency", "cycles", "energy", "bytes"]), default="latency", show_default=True, help="What the search minimises (cycles: ARM targets, estimated from qemu counts).")
@click.option("--max-drop", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Predicted accuracy drop budget, in points.")
@click.option("--data", "dataset", default="fashion-mnist", show_default=True, help="Dataset for sensitivity, fine-tuning and accuracy.")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for config.json, pareto.json/png and the bundle.")
@click.option("--calibration-samples", default=512, show_default=True, type=click.IntRange(min=16), help="Train-split samples the sensitivities are measured on.")
@click.option("--measure-share", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Share of the layer choices measured on the target (the rest predicted).")
@click.option("--cache", "cache_path", default=None, type=click.Path(path_type=Path, dir_okay=False), help="Measurement cache (JSON; default: beside the weight cache).")
@click.option("--finetune-epochs", default=0, show_default=True, type=click.IntRange(min=0), help="ADMM fine-tune the chosen configuration this long and measure its accuracy.")
@click.option("--finetune", "finetune", default="admm", show_default=True, type=click.Choice(["admm", "ste"]),
              help="With --finetune-epochs: train onto the codes by ADMM or straight through (STE).")
@click.option("--verify", "verify_rounds", default=0, show_default=True, type=click.IntRange(min=0),
              help="Close the loop: fine-tune the uniform baselines and up to N searched points (--finetune-epochs, "
                   "at least 1), score them on held-out train images and keep the cheapest whose real drop is "
                   "within --max-drop.")
@click.option("--validation-samples", default=5000, show_default=True, type=click.IntRange(min=100),
              help="With --verify: train-split samples held out to score on (not trained on).")
@click.option("--untrained", is_flag=True, help="Zoo models: seeded random weights.")
def codesign_cmd(model: str, target: str, objective: str, max_drop: float, dataset: str, out_dir: Path,
                 calibration_samples: int, measure_share: float, cache_path: Path | None, finetune_epochs: int,
                 finetune: str, verify_rounds: int, validation_samples: int, untrained: bool) -> None:
    """Choose each layer's code set, keep ratio and rank of MODEL from TARGET's measured cost under an accuracy budget."""
    from lastbit.codesign import finetune_config, run_codesign
    from lastbit.frontend.datasets import load
    from lastbit.frontend.training import cache_dir

    if finetune != "admm" and not (finetune_epochs or verify_rounds):
        raise click.UsageError(f"--finetune {finetune} picks the trainer of --finetune-epochs; "
                               "give --finetune-epochs N")
    train, test = load(dataset, "train"), load(dataset, "test")
    if verify_rounds and validation_samples + calibration_samples >= len(train.labels):
        raise click.UsageError(f"--validation-samples {validation_samples} with --calibration-samples "
                               f"{calibration_samples}: the {dataset} train split has only {len(train.labels)}")
    module, example = _load_model(model, pretrained=not untrained)
    if example is None:
        raise click.UsageError("codesign needs a zoo model (a torch module): it measures sensitivities in torch")
    pick = np.random.default_rng(0).choice(len(train.labels), min(calibration_samples, len(train.labels)), replace=False)
    calibration = (train.images[pick], train.labels[pick])
    name = Path(model).stem
    result = run_codesign(module, example[0], target, calibration, out_dir, objective=objective, max_drop=max_drop,
                          cache_path=cache_path or cache_dir().parent / "codesign-costs.json",
                          measure_share=measure_share, name=name)
    if result.chosen is None:
        raise click.ClickException(f"no configuration predicts a drop within {max_drop} points")
    chosen, real_drop = result.chosen, ""
    if verify_rounds:
        chosen, real_drop, artifact = _verified_point(module, example[0], result, target, objective, train,
                                                      calibration, pick, out_dir, max_drop, verify_rounds,
                                                      validation_samples, max(finetune_epochs, 1), finetune, name)
    else:
        data = calibration[0]  # without fine-tuning: data-free codes, activation scales calibrated
        if finetune_epochs:
            data = (train.images, train.labels)
        artifact = finetune_config(module, example[0], result.graph, chosen.config, data, target,
                                   epochs=max(finetune_epochs, 1), lanes=result.lanes, name=name, method=finetune)
    artifact.export(out_dir / "bundle")
    click.echo(artifact.report().format_table())
    if (finetune_epochs or verify_rounds) and artifact.target.is_host:
        click.echo(f"accuracy after fine-tuning: {artifact.accuracy((test.images, test.labels)):.2%} on the test split")
    scores = ", ".join(f"{m}: Spearman {s['spearman']:.3f}, R² {s['r2']:.3f}" for m, s in result.cost_scores.items())
    click.echo(f"chosen: predicted {objective} {chosen.cost:.4g}, drop {chosen.drop:.2f} pt{real_drop}, "
               f"{chosen.bytes / 1e3:.1f} KB weights; {len(result.front)} Pareto points")
    for label, cand in result.uniform.items():
        click.echo(f"  {label:<28} predicted {objective} {cand.cost:.4g}, drop {cand.drop:.2f} pt")
    click.echo(f"cost model (held out): {scores or 'too few measurements'}; {result.measured_points} measured, "
               f"{result.predicted_points} predicted; search {result.timings['total']:.0f} s")
    click.echo(f"written to {out_dir}: config.json, pareto.json, pareto.png, "
               f"{'verification.json, ' if verify_rounds else ''}bundle/")


def _verified_point(module, example, result, target: str, objective: str, train, calibration,
                    calibration_pick: np.ndarray, out_dir: Path, max_drop: float, rounds: int,
                    validation_samples: int, epochs: int, method: str, name: str):
    """``codesign --verify``: score the uniform baselines and the searched points on held-out
    train images after fine-tuning on the rest, cost each compiled whole on ``target``
    (lastbit.codesign.verify_search), write verification.json and the pick's config.json; the
    pick compiled for ``target``."""
    import lastbit
    from lastbit.codesign import OBJECTIVES, finetune_config, retarget, verify_search
    from lastbit.codesign_cost import whole_model_cost
    from lastbit.fileio import atomic_write_json

    host = "x86_64-linux-gnu"  # where the scoring runs
    outside = np.setdiff1d(np.arange(len(train.labels)), calibration_pick)  # the sensitivities' samples
    held = np.random.default_rng(1).choice(outside, validation_samples, replace=False)
    rest = np.setdiff1d(np.arange(len(train.labels)), held)
    val, data = (train.images[held], train.labels[held]), (train.images[rest], train.labels[rest])
    fp32_accuracy = lastbit.compile(module, host, (example,), name=name).accuracy(val)
    metric = OBJECTIVES[objective]
    artifacts, on_target = {}, {}  # config JSON -> the host-trained artifact / it compiled for the target

    def score(config) -> float:
        art = finetune_config(module, example, result.graph, config, data, host, epochs=epochs, lanes=result.lanes,
                              name=name, method=method)
        artifacts[config.to_json()] = art
        return art.accuracy(val)

    def measure(config) -> float:
        """The fine-tuned configuration compiled for the target and costed whole."""
        art = artifacts[config.to_json()]
        if target != host:
            art = retarget(art, config, target, example, calibration[0], name=name)
        on_target[config.to_json()] = art
        return whole_model_cost(art, np.asarray(example))[metric]

    verification = verify_search(result.tables, result.uniform, score, fp32_accuracy, max_drop, rounds=rounds,
                                 measure=measure)
    atomic_write_json(out_dir / "verification.json", {"validation_samples": len(held), "epochs": epochs,
                                                       "method": method, **verification.to_json()})
    for v in verification.tried:
        click.echo(f"  verify {v.label:<26} predicted drop {v.candidate.drop:5.2f} pt, real {v.drop:5.2f} pt "
                   f"(fp32 {verification.fp32_accuracy:.2%} on {len(held)} held-out train samples); {objective} "
                   f"{v.candidate.cost:.4g} predicted" + (f", {v.measured_cost:.4g} whole" if v.measured_cost is not None else ""))
    if verification.chosen is None:
        (out_dir / "config.json").unlink(missing_ok=True)
        best = max(verification.tried, key=lambda v: v.accuracy)
        raise click.ClickException(f"no configuration stays within {max_drop} points of fp32 after fine-tuning; "
                                   f"the closest, {best.label}, lost {best.drop:.2f} (see verification.json)")
    picked = verification.chosen
    picked.candidate.config.to_json(out_dir / "config.json")
    art = on_target[picked.candidate.config.to_json()]
    click.echo(f"verified pick: {picked.label}, real drop {picked.drop:.2f} pt")
    return picked.candidate, f" (real {picked.drop:.2f} pt after fine-tuning)", art


@main.command("tune")
@click.argument("model")
@click.option("--target", "-t", default="x86_64-linux-gnu", show_default=True, help="Target triple (see `lastbit targets`).")
@click.option("--trials", "-n", default=64, show_default=True, type=click.IntRange(min=1), help="Measured candidates per task (including earlier runs with --resume).")
@click.option("--db", "db_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Tuning database directory (MetaSchedule JSON, one folder per target).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="RPC tracker of a device farm (default: a private loopback worker: this CPU for the host, for ARM targets a qemu device reporting the cycle model's estimate, not board time).")
@click.option("--key", default=None, help="Device key at the tracker (`lastbit farm status` lists them).")
@click.option("--resume", is_flag=True, help="Continue the database: measured candidates are not measured again.")
@click.option("--timeout", "timeout_s", default=None, type=float, help="Seconds one measurement may take before it is marked failed [default: 10; 300 on a qemu device].")
@click.option("--untrained", is_flag=True, help="Zoo models: seeded random weights (tuning does not depend on the weights).")
@click.option("--quant", default=None, metavar="SCHEME:BITS", help="Tune the quantized model, e.g. pow2:3.")
@click.option("--trust-pickle", is_flag=True, help=_TRUST_PICKLE_HELP)
def tune_cmd(model: str, target: str, trials: int, db_dir: Path, tracker: str | None, key: str | None, resume: bool,
             timeout_s: float | None, untrained: bool, quant: str | None, trust_pickle: bool) -> None:
    """Tune the kernels of MODEL on a device farm and store every measurement in --db."""
    import lastbit
    from lastbit.autotune.tuner import tune_model

    if tracker and not key:
        raise click.UsageError("--tracker needs --key (the device kind to measure on)")
    squeeze = lastbit.Squeeze.from_cli(quant) if quant else None
    module, example = _load_model(model, pretrained=not untrained)
    try:
        result = tune_model(module, target, db_dir, trials=trials, example_inputs=example, squeeze=squeeze,
                            tracker=tracker, key=key, resume=resume, timeout_s=timeout_s, name=Path(model).stem,
                            trust_pickle=trust_pickle)
    except KeyboardInterrupt:
        click.echo(f"interrupted; every finished measurement is in {db_dir}: continue with --resume", err=True)
        sys.exit(130)
    peak = _host_peak_gmacs(result) if tracker is None else None  # a farm's devices are not this CPU
    click.echo(result.format_table(peak_gmacs=peak))
    if peak is not None:
        click.echo(f"of peak: each integer kernel's MAC rate over this CPU's vpdpbusd peak ({peak:.0f} GMAC/s, a "
                   f"register-only loop on every thread): what no schedule passes (docs/AUTOTUNE.md)")
    click.echo(f"records in {result.db_dir}; apply with: lastbit compile {model} --target {target} --db {db_dir} -o OUT")


def _host_peak_gmacs(result) -> float | None:
    """This CPU's int8 dot-product peak when the tuned tasks ran here and include integer
    kernels; None where it cannot be measured (no AVX-512 VNNI, no C compiler)."""
    import os

    from lastbit.autotune.roofline import RooflineError, host_vnni_peak_gmacs
    from lastbit.targets import get_target

    if not get_target(result.target).is_host or not any(t.macs for t in result.tasks):
        return None
    try:
        return host_vnni_peak_gmacs(int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    except RooflineError:
        return None


@main.group("farm")
def farm_group() -> None:
    """Device farm for tuning: an RPC tracker, workers that register with it, their status."""


@farm_group.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind. TVM RPC has no authentication: serve other machines only on a private network or through SSH tunnels (docs/AUTOTUNE.md), never 0.0.0.0 on an open one.")
@click.option("--port", default=9190, show_default=True, type=int)
def farm_tracker_cmd(host: str, port: int) -> None:
    """Run the RPC tracker until Ctrl-C."""
    from lastbit.autotune.farm import run_tracker

    run_tracker(host, port)


@farm_group.command("worker")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The tracker to register with.")
@click.option("--key", required=True, help="Device kind this worker measures for (e.g. x86-host, rpi4).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve sessions on. Sessions run uploaded code without authentication: a private address only (docs/AUTOTUNE.md).")
@click.option("--port", default=9090, show_default=True, type=int, help="First port to try (the next free one is used).")
@click.option("--threads", default=None, type=int, help="TVM_NUM_THREADS for the kernels measured here.")
@click.option("--device", default="host", show_default=True, metavar="DEVICE",
              help="What measures: this CPU running compiled kernels (host); qemu-aarch64 / qemu-arm: ARM candidates "
                   "under qemu-user, reporting the cycle model's estimated cycles (not board time); accel-sim: the "
                   "accelerator's cycle simulator.")
def farm_worker_cmd(tracker: str, key: str, host: str, port: int, threads: int | None, device: str) -> None:
    """Serve measurements for KEY until Ctrl-C, restarting after a crashing kernel."""
    from lastbit.autotune.farm import connect_tracker, parse_address, run_worker, worker_devices

    known = [*worker_devices(), "accel-sim"]
    if device not in known:
        raise click.BadParameter(f"'{device}' is not one of {', '.join(known)}", param_hint="--device")

    connect_tracker(*parse_address(tracker), timeout_s=5.0)  # fail now, clearly, if it is not there
    if device == "accel-sim":
        from lastbit.codegen.accel.tuner import serve_forever

        serve_forever(host, port, tracker, key)
        return
    run_worker(tracker, key, host=host, port=port, threads=threads, device=device)


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
    arrays = [_load_npy(p) for p in inputs]  # before importing TVM: a bad file fails fast
    from lastbit.codegen.bundle import run_bundle

    outputs = run_bundle(bundle, arrays)
    for i, out in enumerate(outputs):
        top = np.argsort(out.reshape(-1))[::-1][:5]
        click.echo(f"output {i}: shape {out.shape}, dtype {out.dtype}, top-5 indices {top.tolist()}")
    from lastbit.check import degenerate_reason

    degenerate = degenerate_reason(outputs)
    if degenerate:
        click.echo(f"warning: {degenerate}: the top-5 indices mean nothing", err=True)
    if out_path is not None:
        from lastbit.fileio import atomic_save_npy

        atomic_save_npy(out_path, outputs[0])
        click.echo(f"output 0 written to {out_path}")


def _load_npy(path: Path) -> np.ndarray:
    """One --input file: a .npy array (np.save), never unpickled; anything else is a RunError."""
    from lastbit.errors import RunError

    try:
        value = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError, OSError, EOFError, UnpicklingError
        reason = (str(err).splitlines() or ["unreadable"])[0]
        raise RunError(f"--input {path}: not a .npy array file ({type(err).__name__}: {reason}); "
                       f"save each input with numpy.save") from err
    if not isinstance(value, np.ndarray):  # an .npz archive
        value.close()
        raise RunError(f"--input {path}: an .npz archive, not one array; save each input as its own .npy file")
    return value


@main.command("accel-dse")
@click.argument("model")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for dse.json/png (and joint.json/png).")
@click.option("--quant", default="pow2:3", show_default=True, metavar="SCHEME:BITS", help="The uniform quantization the sweep costs (data-free).")
@click.option("--sweep", "sweep_items", multiple=True, metavar="AXIS=V1,V2", help="Swept axis (repeatable): rows, cols, input_kib, weight_kib, acc_kib, dram_bytes_per_cycle, pe. Default: 20 array shapes x weight KiB x DRAM B/cycle x PE kind.")
@click.option("--base", default="default", show_default=True, help="Accelerator preset the unswept parameters come from.")
@click.option("--budget-energy", "budget_energy_uj", type=float, default=None, help="Joint search: least accuracy proxy within this energy per inference (µJ).")
@click.option("--budget-area", "budget_area_mm2", type=float, default=None, help="Joint search: least energy within this area (mm², PE + SRAM), no worse proxy than --quant.")
@click.option("--max-proxy", type=float, default=None, help="Joint search: cap on the summed accuracy-drop proxy.")
@click.option("--code-sets", default="ternary,pow2-4,int8", show_default=True, help="Per-layer choices of the joint search.")
@click.option("--untrained", is_flag=True, help="Zoo models: seeded random weights (hardware cost does not depend on them).")
def accel_dse_cmd(model: str, out_dir: Path, quant: str, sweep_items: tuple[str, ...], base: str,
                  budget_energy_uj: float | None, budget_area_mm2: float | None, max_proxy: float | None,
                  code_sets: str, untrained: bool) -> None:
    """Sweep accelerator shapes for MODEL (cycles x energy x area, Pareto front); with a budget,
    choose per-layer code sets and the array together."""
    import lastbit
    from lastbit.codegen.accel import preset
    from lastbit.codegen.accel.dse import DEFAULT_SWEEP, SweepSpec
    from lastbit.codegen.accel.explore import explore_model
    from lastbit.pipeline import import_model

    spec = SweepSpec.parse(sweep_items, preset(base)) if sweep_items else SweepSpec(DEFAULT_SWEEP, preset(base))
    squeeze = lastbit.Squeeze.from_cli(quant, mode="data-free")
    module, example = _load_model(model, pretrained=not untrained)
    graph = import_model(module, example, name=Path(model).stem)
    run = explore_model(graph, squeeze, spec, energy_budget_pj=None if budget_energy_uj is None else budget_energy_uj * 1e6,
                        area_budget_mm2=budget_area_mm2, max_proxy=max_proxy,
                        code_sets=[c.strip() for c in code_sets.split(",") if c.strip()], progress=True)
    paths = run.write(out_dir, title=f"{Path(model).stem} ({quant})")
    click.echo(f"{'config':<40} {'Mcycles':>9} {'energy uJ':>10} {'area mm2':>9}")
    for row in run.sweep.front_rows:
        click.echo(f"{row['name']:<40} {row['cycles'] / 1e6:>9.2f} {row['energy_pj'] / 1e6:>10.1f} {row['area_mm2']:>9.3f}")
    click.echo(f"Pareto front: {len(run.sweep.front)} of {len(run.sweep.rows)} configs "
               f"({run.sweep.wall_s:.1f} s of simulation)")
    if run.joint is not None:
        best = run.joint.best
        if best is None:
            click.echo("joint search: no array and code-set assignment meets the budget")
        else:
            counts = {cs: list(best["code_sets"].values()).count(cs) for cs in sorted(set(best["code_sets"].values()))}
            click.echo(f"joint search: {best['name']}, energy {best['energy_pj'] / 1e6:.1f} uJ, proxy {best['proxy']:.4f}, "
                       f"layers {counts}")
    click.echo("written: " + ", ".join(str(p) for p in paths.values()))


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
