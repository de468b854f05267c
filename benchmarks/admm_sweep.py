"""ADMM variants on BatchNorm ResNets (Fashion-MNIST): the sweep that sets passes/admm.py's defaults.

Three stages, each picking its winner by the mean test accuracy over every (model, code set):
1. structure: α per tensor or per output channel, BatchNorm statistics batch-wise or frozen,
   W-step extragradient or proximal SGD (STE run with the same α / BN setting beside each);
2. ρ schedule on the winning structure: ρ0, its growth per G-step, the number of G-steps and
   the fraction of batches with the codes fixed at the end;
3. distillation from the fp32 model on the winning schedule: temperature T and weight β.
Every run has the same budget (training samples, epochs, lr schedule) as quant_accuracy.py's
table, so what wins here is what the table uses. `--sweep` runs the grid (GPU-sized:
`--sweep --device cuda --workers 15 --threads 1`); `--quick` is a few-minute CPU run of the same
code on a small grid; with neither (`make bench`) the winners are re-derived from the rows of the
last GPU sweep, bench/admm_sweep_gpu.json. `--bn-sweep` (GPU), `--rho-sweep` and `--metric-sweep`
(CPU) run the stages that ask why ADMM trails STE on BatchNorm networks; their saved rows
(bench/admm_bn_sweep_gpu.json, bench/admm_rho_sweep.json, bench/admm_metric_sweep.json) are
ranked in the same summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from lastbit.fileio import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
# The rows of the last full sweep (an H200 run: `--sweep --device cuda --workers 15 --threads 1
# --time-limit-s 140`, cut short by that limit, see `summarize`).
GPU_ROWS = REPO / "bench" / "admm_sweep_gpu.json"
# The rows of the BatchNorm stage (an H200 run: `--bn-sweep --device cuda --workers 15 --threads 1
# --fp32-cache --time-limit-s 230`: the fp32 models of the CPU weight cache, cut by that limit
# after the per-tensor variants and some lr-0.005 rows; no per-channel row ran).
BN_ROWS = REPO / "bench" / "admm_bn_sweep_gpu.json"
CODE_SETS = ("binary", "ternary", "pow2-2", "pow2-4")
SEED = 0
LR, LR_SCHEDULE, BATCH, BN_BATCHES = 0.01, "cosine", 64, 8
SKIP, SKIP_CODES = ("first", "last"), "int8"
# The table's budgets (quant_accuracy.BUDGETS) for the BN networks.
BUDGETS = {"resnet8": {"train": 20000, "epochs": 1}, "resnet20": {"train": 10000, "epochs": 1}}
QUICK_BUDGETS = {"resnet8": {"train": 1000, "epochs": 1}}
LARGE_BUDGETS = {"resnet8": {"train": 60000, "epochs": 1}, "resnet20": {"train": 60000, "epochs": 1}}
QUICK_CODES = ("binary", "pow2-4")

# Stage 1: structure. The schedule is the pre-sweep one (tuned by hand on LeNet-5).
BASE = {"per_channel": False, "freeze_bn": False, "w_step": "extragradient",
        "rho": 5.0, "rho_growth": 1.3, "g_steps": 9, "fixed_fraction": 0.2}
STRUCTURES = [{"per_channel": pc, "freeze_bn": fb, "w_step": ws}
              for pc, fb, ws in itertools.product((False, True), (False, True), ("extragradient", "sgd"))]
# Stage 2: schedule grid on the stage-1 winner.
SCHEDULES = [{"rho": r, "rho_growth": g, "g_steps": n, "fixed_fraction": f}
             for r, g, n, f in itertools.product((1.0, 5.0, 20.0), (1.15, 1.3, 1.6), (9, 20), (0.1, 0.25))]
# Stage 3: distillation grid on the stage-2 winner.
DISTILL = [{"temperature": t, "distill_weight": b} for t, b in itertools.product((1.0, 2.0, 4.0), (0.3, 0.6, 0.9))]
QUICK_STRUCTURES = [{"per_channel": pc, "freeze_bn": fb, "w_step": "sgd"} for pc, fb in itertools.product((False, True), (False, True))]
QUICK_SCHEDULES = [{"rho": r, "rho_growth": 1.3, "g_steps": 9, "fixed_fraction": 0.2} for r in (1.0, 5.0)]
QUICK_DISTILL = [{"temperature": 2.0, "distill_weight": 0.6}]

# Stage "bn" (`--bn-sweep`): why ADMM trails STE on BatchNorm networks. Variants of the ADMM
# defaults (BN_BASE) that move where the network is trained quantized: the tail after the last
# G-step fixed or straight-through (`tail`) and its length, ∇f at Π(W) during the ADMM phase
# (`forward`), the penalty's step ηρ kept off the cosine decay (`penalty_lr`), ρ0, α per channel;
# STE beside it with the same α setting and lr, and fp32 fine-tuned on the same budget (the
# ceiling fine-tuning itself allows).
BN_BASE = {"per_channel": False, "freeze_bn": False, "w_step": "sgd", "rho": 1.0, "rho_growth": 1.3, "g_steps": 20,
           "fixed_fraction": 0.1, "forward": "float", "tail": "fixed", "penalty_lr": "schedule", "lr": LR}
BN_VARIANTS = [
    {}, {"fixed_fraction": 0.25},
    {"tail": "ste"}, {"tail": "ste", "fixed_fraction": 0.25}, {"tail": "ste", "fixed_fraction": 0.5},
    {"tail": "ste", "fixed_fraction": 0.75},
    {"forward": "projected"}, {"forward": "projected", "rho": 0.1}, {"forward": "projected", "rho": 0.01},
    {"forward": "projected", "rho": 0.1, "tail": "ste"}, {"forward": "projected", "rho": 0.01, "rho_growth": 1.6},
    {"penalty_lr": "constant"}, {"penalty_lr": "constant", "tail": "ste", "fixed_fraction": 0.25},
    {"rho": 5.0, "tail": "ste", "fixed_fraction": 0.25}, {"rho": 0.2, "tail": "ste", "fixed_fraction": 0.5},
]
BN_LR_VARIANTS = [{"lr": 0.005}, {"lr": 0.005, "tail": "ste", "fixed_fraction": 0.25},
                  {"lr": 0.005, "tail": "ste", "fixed_fraction": 0.5}, {"lr": 0.005, "forward": "projected", "rho": 0.1}]
BN_KEYS = ("per_channel", "forward", "tail", "fixed_fraction", "penalty_lr", "rho", "rho_growth", "lr")

# Stage "rho" (`--rho-sweep`, CPU-sized: about 12 minutes on 2 cores): is the default ρ schedule
# (ρ0 = 1, ×1.3 over 20 G-steps, the pull ηρ off the cosine decay) what holds ADMM's codes still
# (code_changes 0 after the first epoch, benchmarks/admm_budget.py)? ResNet-8 binary and
# ternary at the table's budget: ρ0 × growth with ∇f at W (the paper's), and with ∇f at Π(W)
# (forward="projected", final codes Π(W), the ones trained), down to ρ0 = 0 where ADMM's W-step
# is STE with a fixed tail; STE beside them.
RHO_ROWS = REPO / "bench" / "admm_rho_sweep.json"
RHO_BASE = {**BN_BASE, "penalty_lr": "constant"}
RHO_VARIANTS = ([{"rho": r, "rho_growth": g} for r, g in itertools.product((0.1, 0.3, 1.0), (1.0, 1.1, 1.2, 1.3))]
                + [{"forward": "projected", "rho": r, "rho_growth": g}
                   for r, g in ((0.0, 1.0), (0.001, 1.0), (0.01, 1.0), (0.03, 1.0), (0.001, 1.3), (0.01, 1.3),
                                (0.1, 1.3), (1.0, 1.3))])
RHO_CODES = ("binary", "ternary")

# Stage "metric" (`--metric-sweep`, CPU-sized: about 40 minutes on 2 cores): the "rho" stage ran
# with the paper's nearest-code G-step; the default on BatchNorm networks is now the output metric
# (passes/admm.py ADMM_G_METRIC), which moves which codes the first projection picks, so the ρ
# schedule is swept again under it: ρ0 × growth on both BN nets at all four code sets, STE beside.
METRIC_ROWS = REPO / "bench" / "admm_metric_sweep.json"
METRIC_BASE = {**RHO_BASE, "g_metric": "outputs"}
METRIC_VARIANTS = ([{"rho": r, "rho_growth": g} for r, g in itertools.product((0.3, 1.0, 3.0, 10.0), (1.15, 1.3))]
                   + [{"rho": 30.0, "rho_growth": 1.3}])  # past the grid's edge, where ρ0 = 10 won


def bn_jobs(models: dict, codes: tuple) -> list[dict]:
    """The "bn" stage's runs, most telling first (a time limit cuts the tail of the list)."""
    jobs = [{"stage": "bn", "model": m, "codes": "fp32", "method": "fp32", "budget": b, **BN_BASE, "lr": lr}
            for m, b in models.items() for lr in (LR, 0.005)]

    def ste(pc: bool, lr: float) -> list[dict]:
        return [{"stage": "bn", "model": m, "codes": c, "method": "ste", "budget": b, **BN_BASE, "per_channel": pc,
                 "lr": lr, "w_step": None} for m, b in models.items() for c in codes]

    jobs += ste(False, LR)
    for v in BN_VARIANTS:
        jobs += _admm_jobs(models, codes, [v], BN_BASE, "bn")
    jobs += ste(False, 0.005)
    for v in BN_LR_VARIANTS:
        jobs += _admm_jobs(models, codes, [v], BN_BASE, "bn")
    jobs += ste(True, LR)
    for v in BN_VARIANTS:
        jobs += _admm_jobs(models, codes, [{**v, "per_channel": True}], BN_BASE, "bn")
    return jobs


_STATE: dict = {}  # per worker process: data and fp32 models


def _init_worker(device: str, data_dir: str | None, threads: int, scratch: str = "", fp32_cache: bool = False) -> None:
    import torch

    from lastbit.frontend import datasets

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    if data_dir:
        datasets.FASHION_MNIST_DIR = Path(data_dir)
    _STATE["device"] = device
    _STATE["scratch"] = scratch
    _STATE["fp32_cache"] = fp32_cache
    _STATE["train"], _STATE["test"] = datasets.fashion_mnist("train"), datasets.fashion_mnist("test")


def _fp32(name: str):
    """The zoo's trained model: from the weight cache on CPU; on a GPU trained there with the zoo's
    recipe (Adam 1e-3, batch 128, cosine, entry.train_epochs) and kept in the process."""
    import torch

    from lastbit.frontend.models import ZOO, get_model
    from lastbit.frontend.training import train_classifier

    if name not in _STATE:
        if _STATE.get("fp32_cache"):  # the weight cache's file by name (its hash covers torch's repr)
            from lastbit.frontend.training import cache_dir

            model = ZOO[name].build()
            pattern = f"{name}-fashion-mnist-e{ZOO[name].train_epochs}-*.pt"
            found = sorted(cache_dir().glob(pattern))
            if len(found) != 1:
                raise FileNotFoundError(f"--fp32-cache: want one {pattern} in {cache_dir()}, found {[f.name for f in found]}")
            path = found[0]
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.to(_STATE["device"])
        elif _STATE["device"] == "cpu":
            model, _ = get_model(name, pretrained=True, progress=False)
        else:  # trained once by the main process, loaded by the workers
            model = ZOO[name].build().to(_STATE["device"])
            path = Path(_STATE["scratch"]) / f"{name}.pt"
            if path.is_file():
                model.load_state_dict(torch.load(path, map_location=_STATE["device"], weights_only=True))
            else:
                train_classifier(model, _STATE["train"], ZOO[name].train_epochs, lr=1e-3, batch_size=128, seed=SEED,
                                 progress=False, device=_STATE["device"])
                torch.save(model.state_dict(), path)
        _STATE[name] = model.eval()
    return _STATE[name]


def _accuracy(module, device: str) -> float:
    import torch

    test = _STATE["test"]
    module.eval().to(device)
    x_all, y_all = torch.from_numpy(test.images).to(device), torch.from_numpy(test.labels).to(device)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y_all), 1000):
            correct += int((module(x_all[i:i + 1000]).argmax(1) == y_all[i:i + 1000]).sum())
    return correct / len(y_all)


def run_one(job: dict) -> dict:
    """One fine-tuning run: job = {model, codes, method, budget, **settings}; returns job + accuracy."""
    import torch

    if time.time() > job.get("deadline", math.inf):
        return {**job, "accuracy": None}
    device = _STATE["device"]
    fp32 = _fp32(job["model"])
    budget = job["budget"]
    idx = np.sort(np.random.default_rng(SEED).permutation(len(_STATE["train"].labels))[:budget["train"]])
    x = torch.from_numpy(_STATE["train"].images[idx]).to(device)
    y = torch.from_numpy(_STATE["train"].labels[idx]).to(device)
    common = {"epochs": budget["epochs"], "lr": job.get("lr", LR), "lr_schedule": LR_SCHEDULE, "batch_size": BATCH, "skip": SKIP,
              "skip_codes": SKIP_CODES, "bn_batches": BN_BATCHES, "progress": False, "seed": SEED, "device": device,
              "per_channel": job["per_channel"], "freeze_bn": job["freeze_bn"]}
    if job.get("distill_weight"):
        common.update(distill_from=fp32, temperature=job["temperature"], distill_weight=job["distill_weight"])
    start = time.perf_counter()
    try:
        return _fine_tune(job, fp32, x, y, common, budget, start)
    except Exception as err:  # a diverged setting scores chance, it does not end the sweep
        return {**job, "accuracy": 0.1, "seconds": round(time.perf_counter() - start, 2), "residual": None,
                "error": str(err)[:200]}


def _fine_tune(job, fp32, x, y, common, budget, start) -> dict:
    from lastbit.passes.admm import admm_finetune, auto_update_every, ste_finetune

    device = _STATE["device"]
    if job["method"] == "fp32":  # the same budget with no quantization: what fine-tuning alone does
        return {**job, "accuracy": _accuracy(_float_finetune(fp32, x, y, common), device),
                "seconds": round(time.perf_counter() - start, 2), "residual": None}
    if job["method"] == "ste":
        result = ste_finetune(fp32, (x, y), job["codes"], **common)
    else:
        batches = math.ceil(budget["train"] / BATCH) * budget["epochs"]
        every = auto_update_every(batches, job["fixed_fraction"], job["g_steps"])
        extra = {k: job[k] for k in ("forward", "tail", "penalty_lr", "g_metric") if k in job}
        result = admm_finetune(fp32, (x, y), job["codes"], rho=job["rho"], rho_growth=job["rho_growth"],
                               update_every=every, fixed_fraction=job["fixed_fraction"], w_step=job["w_step"],
                               **extra, **common)
    residuals = [h.residual for h in result.history]
    return {**job, "accuracy": _accuracy(result.module, device), "seconds": round(time.perf_counter() - start, 2),
            "residual": residuals[-1] if residuals else None}


def _float_finetune(fp32, x, y, common: dict):
    """fp32 fine-tuned on the table's budget (momentum SGD, the same lr schedule and batches)."""
    import copy

    import torch

    from lastbit.passes.admm import _lr_at

    model = copy.deepcopy(fp32).train()
    opt = torch.optim.SGD(model.parameters(), lr=common["lr"], momentum=0.9)
    steps = math.ceil(len(y) / BATCH) * common["epochs"]
    torch.manual_seed(SEED)
    step = 0
    for epoch in range(common["epochs"]):
        order = torch.from_numpy(np.random.default_rng([SEED, epoch]).permutation(len(y))).to(y.device)
        for i in range(0, len(y), BATCH):
            idx = order[i:i + BATCH]
            for group in opt.param_groups:
                group["lr"] = _lr_at(common["lr"], common["lr_schedule"], step, steps)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model


def _admm_jobs(models: dict, codes: tuple, settings: list[dict], base: dict, stage: str) -> list[dict]:
    return [{"stage": stage, "model": m, "codes": c, "method": "admm", "budget": b, **base, **s}
            for m, b in models.items() for c in codes for s in settings]


def _winner(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """The setting (values of keys) with the best mean accuracy over the (model, code set) cells
    that every setting has a run in (a stage cut short by the time limit compares like with like)."""
    cells: dict[tuple, dict[tuple, float]] = {}
    for r in rows:
        cells.setdefault(tuple(r[k] for k in keys), {})[(r["model"], r["codes"])] = r["accuracy"]
    common = set.intersection(*(set(c) for c in cells.values()))
    if not common:  # no cell shared by all: rank the settings that cover the most common cells
        top = max(len(c) for c in cells.values())
        cells = {k: c for k, c in cells.items() if len(c) == top}
        common = set.intersection(*(set(c) for c in cells.values()))
    best = max(cells, key=lambda k: np.mean([cells[k][c] for c in common]))
    return dict(zip(keys, best)) | {"mean_accuracy": float(np.mean([cells[best][c] for c in common])),
                                    "cells": sorted("/".join(c) for c in common)}


def _scored(row: dict) -> bool:
    """A run that counts: it finished, or diverged (a real outcome, scored at chance); not one that
    failed for another reason (a bug, e.g. STE on CUDA before its projection levels moved there)."""
    return not row.get("error") or "diverged" in row["error"]


def summarize(rows: list[dict]) -> dict:
    """The three stages' winners from saved rows (e.g. bench/admm_sweep_gpu.json), and the tables."""
    chosen = {}
    for stage, method, keys in (("structure", "admm", ("per_channel", "freeze_bn", "w_step")),
                                ("structure", "ste", ("per_channel", "freeze_bn")),
                                ("schedule", "admm", ("rho", "rho_growth", "g_steps", "fixed_fraction"))):
        mine = [r for r in rows if r["stage"] == stage and r["method"] == method and _scored(r)]
        if mine:
            chosen[stage if method == "admm" else "ste"] = _winner(mine, keys)
    kd = [r for r in rows if r["stage"] == "distill" and r.get("distill_weight") and _scored(r)]
    if kd:
        chosen["distill"] = _winner(kd, ("temperature", "distill_weight"))
    return chosen


def rho_jobs(models: dict, codes: tuple) -> list[dict]:
    """The "rho" stage's runs: STE, then every (forward, ρ0, growth) on the default structure."""
    jobs = [{"stage": "rho", "model": m, "codes": c, "method": "ste", "budget": b, **RHO_BASE, "w_step": None}
            for m, b in models.items() for c in codes]
    return jobs + _admm_jobs(models, codes, RHO_VARIANTS, RHO_BASE, "rho")


def metric_jobs(models: dict, codes: tuple) -> list[dict]:
    """The "metric" stage's runs: per model, STE then every (ρ0, growth) under the output-metric G-step."""
    jobs = []
    for m, b in models.items():
        jobs += [{"stage": "metric", "model": m, "codes": c, "method": "ste", "budget": b, **METRIC_BASE,
                  "w_step": None} for c in codes]
        jobs += _admm_jobs({m: b}, codes, METRIC_VARIANTS, METRIC_BASE, "metric")
    return jobs


def _job_key(job: dict) -> str:
    """What identifies a run: its settings, not its deadline or results."""
    skip = ("deadline", "accuracy", "seconds", "residual", "error")
    return json.dumps({k: v for k, v in job.items() if k not in skip}, sort_keys=True)


def bn_sweep(args, rho: bool = False, metric: bool = False) -> dict:
    """Run the "bn" stage (with rho the "rho" stage, ResNet-8 only; with metric the "metric"
    stage) on the table's budgets; rows to --out (bench/admm_bn_sweep_gpu.json,
    bench/admm_rho_sweep.json, bench/admm_metric_sweep.json)."""
    import multiprocessing as mp
    import tempfile

    start = time.perf_counter()
    models = QUICK_BUDGETS if args.quick else BUDGETS
    codes = QUICK_CODES if args.quick else CODE_SETS
    if rho:
        models = {"resnet8": models["resnet8"]}
        codes = RHO_CODES
    if metric:  # the deeper net first: a time limit cuts the tail
        models = dict(sorted(models.items(), key=lambda kv: kv[0] != "resnet20"))
    scratch = tempfile.mkdtemp(prefix="admm_sweep-")
    init = (args.device, args.data_dir, args.threads, scratch, args.fp32_cache)
    _init_worker(*init)
    for name in models:
        print(f"fp32 {name}: {100 * _accuracy(_fp32(name), args.device):.2f}%", flush=True)
    deadline = time.time() + args.time_limit_s
    base = METRIC_BASE if metric else RHO_BASE if rho else BN_BASE
    make_jobs = metric_jobs if metric else rho_jobs if rho else bn_jobs
    jobs = [{**j, "deadline": deadline} for j in make_jobs(models, codes)]
    rows, total, earlier_s = [], len(jobs), 0.0
    if args.resume and args.out.is_file():  # keep the runs already saved, run the rest
        try:
            saved = json.loads(args.out.read_text())
            rows, earlier_s = list(saved["rows"]), float(saved.get("meta", {}).get("wall_s", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SystemExit(f"--resume: {args.out} is not a sweep's rows file ({err!r}); "
                             "move it away or drop --resume")
        done = {_job_key(r) for r in rows}
        jobs = [j for j in jobs if _job_key(j) not in done]
        print(f"--resume: {len(rows)} runs read from {args.out}, {len(jobs)} to run", flush=True)
    with mp.get_context("spawn").Pool(max(1, args.workers), _init_worker, init) as pool:
        for r in pool.imap_unordered(run_one, jobs, chunksize=1):
            if r["accuracy"] is None:
                continue
            rows.append(r)
            extra = {k: r[k] for k in BN_KEYS if r.get(k) != base.get(k)}
            print(f"  {r['model']:<8} {r['codes']:<7} {r['method']:<4} {100 * r['accuracy']:6.2f} "
                  f"{r['seconds']:5.1f}s {extra}{' ' + r['error'] if r.get('error') else ''}", flush=True)
            if args.out and len(rows) % 10 == 0:
                atomic_write_text(args.out, json.dumps({"rows": rows}, indent=1))
    section = {"meta": {"device": args.device, "budgets": models, "batch": BATCH, "lr_schedule": LR_SCHEDULE,
                        "wall_s": round(earlier_s + time.perf_counter() - start, 1), "runs": len(rows), "of": total},
               "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(section, indent=1))
    return section


def summarize_bn(rows: list[dict]) -> dict:
    """The "bn" stage from saved rows: every setting that ran on all cells, by mean accuracy,
    with its per-cell accuracies; the best ADMM setting and STE's are the first of their kind."""
    cells: dict[tuple, dict[str, float]] = {}
    fp32 = {}
    for r in rows:
        if r["method"] == "fp32":
            fp32[f"{r['model']}/lr{r['lr']}"] = r["accuracy"]
            continue
        key = (r["method"],) + tuple(r[k] for k in BN_KEYS)
        cells.setdefault(key, {})[f"{r['model']}/{r['codes']}"] = r["accuracy"]
    top = max(len(c) for c in cells.values())
    ranked = sorted(((float(np.mean(list(c.values()))), k, c) for k, c in cells.items() if len(c) == top), reverse=True)
    table = [{"method": k[0], **dict(zip(BN_KEYS, k[1:])), "mean_accuracy": round(m, 4), "cells": c} for m, k, c in ranked]
    # ADMM's pick: the best setting that is still mostly ADMM. tail="ste" with fixed_fraction 0.75
    # (83.49 vs 83.34 for the winner, within run-to-run noise) is three quarters STE, not ADMM;
    # ρ0 = 0 with forward="projected" is STE with a fixed tail.
    best_admm = next(t for t in table if t["method"] == "admm" and t["rho"] > 0
                     and (t["tail"] != "ste" or t["fixed_fraction"] <= 0.25))
    return {"best_admm": best_admm, "best_ste": next(t for t in table if t["method"] == "ste"),
            "fp32_finetuned": fp32, "settings": table}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="resnet8 on 1000 samples, 2 code sets, a few settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="parallel runs (processes)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST .gz files (default: the Debian package's)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here (after every stage)")
    parser.add_argument("--time-limit-s", type=float, default=math.inf, help="skip the stages that start after this")
    parser.add_argument("--no-results", action="store_true", help="do not write bench/results.json")
    parser.add_argument("--large", action="store_true", help="then the chosen settings on the whole training set")
    parser.add_argument("--sweep", action="store_true", help="run the whole grid (GPU-sized: hours on 2 CPU cores)")
    parser.add_argument("--bn-sweep", action="store_true", help="run the BatchNorm stage's grid only (GPU-sized)")
    parser.add_argument("--rho-sweep", action="store_true",
                        help="run the ρ-schedule stage (ResNet-8, ~12 min on 2 cores)")
    parser.add_argument("--metric-sweep", action="store_true",
                        help="run the ρ-schedule stage again under the output-metric G-step (ResNet-8/20, ~40 min)")
    parser.add_argument("--resume", action="store_true",
                        help="with --out: keep the runs already in that file and run only the missing ones")
    parser.add_argument("--fp32-cache", action="store_true",
                        help="fp32 models from the weight cache ($LASTBIT_CACHE) on any device, as the table uses")
    parser.add_argument("--summarize", type=Path, metavar="JSON", default=GPU_ROWS,
                        help="without --sweep/--quick: re-derive the winners from these saved rows (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.resume and not (args.out and (args.bn_sweep or args.rho_sweep or args.metric_sweep)):
        parser.error("--resume needs --out and one of --bn-sweep, --rho-sweep, --metric-sweep")
    if args.fp32_cache and not (args.bn_sweep or args.rho_sweep or args.metric_sweep):
        parser.error("--fp32-cache applies to --bn-sweep, --rho-sweep and --metric-sweep only")
    if args.bn_sweep or args.rho_sweep or args.metric_sweep:
        return bn_sweep(args, rho=args.rho_sweep, metric=args.metric_sweep)
    if not (args.sweep or args.quick):
        # `make bench` on a CPU: the grid is GPU work, so re-derive the defaults from its recorded rows
        saved = json.loads(args.summarize.read_text())
        chosen = summarize(saved["rows"])
        if BN_ROWS.is_file():
            chosen["bn"] = summarize_bn(json.loads(BN_ROWS.read_text())["rows"])
        if RHO_ROWS.is_file():
            chosen["rho"] = summarize_bn(json.loads(RHO_ROWS.read_text())["rows"])
        if METRIC_ROWS.is_file():
            chosen["metric"] = summarize_bn(json.loads(METRIC_ROWS.read_text())["rows"])
        for stage, win in chosen.items():
            if stage in ("bn", "rho", "metric"):
                base = {"bn": BN_BASE, "rho": RHO_BASE, "metric": METRIC_BASE}[stage]
                for t in win["settings"]:
                    diff = {k: t[k] for k in BN_KEYS if t[k] != base[k]}
                    cells = (" ".join(f"{100 * a:.2f}" for _, a in sorted(t["cells"].items())) if stage != "bn"
                             else "")
                    print(f"  {stage:<3} {t['method']:<4} {100 * t['mean_accuracy']:6.2f}  {cells} {diff}")
                continue
            print(f"  {stage:<10} {win}")
        section = {"meta": {"source": str(args.summarize.relative_to(REPO) if args.summarize.is_relative_to(REPO)
                                          else args.summarize), "runs": len(saved["rows"])}, "chosen": chosen}
        if not args.no_results:
            from results import update_section

            update_section("admm_sweep", section)
        return section
    start = time.perf_counter()
    models = QUICK_BUDGETS if args.quick else BUDGETS
    codes = QUICK_CODES if args.quick else CODE_SETS
    structures, schedules, distill = ((QUICK_STRUCTURES, QUICK_SCHEDULES, QUICK_DISTILL) if args.quick
                                      else (STRUCTURES, SCHEDULES, DISTILL))
    import tempfile

    scratch = tempfile.mkdtemp(prefix="admm_sweep-")
    _init_worker(args.device, args.data_dir, args.threads, scratch)
    for name in models:  # train (and cache) the fp32 models once, before the workers load them
        print(f"fp32 {name}: {100 * _accuracy(_fp32(name), args.device):.2f}%", flush=True)

    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers, _init_worker, (args.device, args.data_dir, args.threads, scratch))
        run_all = lambda jobs: pool.imap_unordered(run_one, jobs, chunksize=1)  # noqa: E731
    else:
        pool = None
        run_all = lambda jobs: map(run_one, jobs)  # noqa: E731
    # Each stage gets its share of the time limit; its runs not started by then are skipped.
    share = {"structure": 0.3, "schedule": 0.2, "distill": 0.2, "large": 0.3}
    if not args.large:
        share = {k: v / 0.7 for k, v in share.items()}
    clock = {"deadline": time.time()}

    rows: list[dict] = []
    chosen: dict = {}

    def stage(name: str, jobs: list[dict]) -> list[dict]:
        clock["deadline"] = max(clock["deadline"], time.time()) + share[name] * args.time_limit_s
        t0 = time.perf_counter()
        out = []
        for r in run_all([{**j, "deadline": clock["deadline"]} for j in jobs]):
            if r["accuracy"] is None:
                continue
            out.append(r)
            extra = {k: r[k] for k in ("per_channel", "freeze_bn", "w_step", "rho", "rho_growth", "g_steps",
                                        "fixed_fraction", "temperature", "distill_weight") if k in r}
            print(f"  {r['stage']:<9} {r['model']:<8} {r['codes']:<7} {r['method']:<4} {100 * r['accuracy']:6.2f} "
                  f"res {r['residual'] or 0:.3f} {r['seconds']:5.1f}s {extra}", flush=True)
            if args.out:
                atomic_write_text(args.out, json.dumps({"rows": rows + out, "chosen": chosen}, indent=1))
        rows.extend(out)
        print(f"== {name}: {len(out)} of {len(jobs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    ste = [{"stage": "structure", "model": m, "codes": c, "method": "ste", "budget": b, "per_channel": pc, "freeze_bn": fb,
            "w_step": None} for pc, fb in itertools.product((False, True), (False, True)) for m, b in models.items() for c in codes]
    jobs = _admm_jobs(models, codes, structures, BASE, "structure") + ste
    jobs.sort(key=lambda j: (codes.index(j["codes"]), list(models).index(j["model"])))  # cut short: hard codes first
    out = stage("structure", jobs)
    chosen["structure"] = _winner([r for r in out if r["method"] == "admm"], ("per_channel", "freeze_bn", "w_step"))
    chosen["ste"] = _winner([r for r in out if r["method"] == "ste"], ("per_channel", "freeze_bn"))
    structure = {k: chosen["structure"][k] for k in ("per_channel", "freeze_bn", "w_step")}
    print("structure:", chosen["structure"], " STE's best:", chosen["ste"], flush=True)

    out = stage("schedule", _admm_jobs(models, codes if args.quick else ("binary", "ternary"), schedules,
                                        {**BASE, **structure}, "schedule"))
    schedule = {k: BASE[k] for k in ("rho", "rho_growth", "g_steps", "fixed_fraction")}
    if out:
        chosen["schedule"] = _winner(out, ("rho", "rho_growth", "g_steps", "fixed_fraction"))
        schedule = {k: chosen["schedule"][k] for k in schedule}
        print("schedule:", chosen["schedule"], flush=True)

    # the no-teacher run first in every cell, so a stage cut short still has its baselines
    out = stage("distill", _admm_jobs(models, codes, [{}] + distill, {**BASE, **structure, **schedule}, "distill"))
    if out:
        chosen["distill"] = _winner([r for r in out if r.get("distill_weight")], ("temperature", "distill_weight"))
        print("distill:", chosen["distill"], flush=True)
    if not args.quick and args.large:
        # the chosen settings on the whole training set (GPU budget): STE with its own best α / BN
        # setting, ADMM, ADMM + KD
        kd = {k: chosen["distill"][k] for k in ("temperature", "distill_weight")} if "distill" in chosen else {}
        admm = {**BASE, **structure, **schedule}
        ste_best = {k: chosen["ste"][k] for k in ("per_channel", "freeze_bn")}
        jobs = [{"stage": "large", "model": m, "codes": c, "method": "ste", "budget": b, **ste_best, "w_step": None}
                for m, b in LARGE_BUDGETS.items() for c in codes]
        jobs += _admm_jobs(LARGE_BUDGETS, codes, [{}] + ([kd] if kd else []), admm, "large")
        jobs.sort(key=lambda j: (list(LARGE_BUDGETS).index(j["model"]), codes.index(j["codes"])))
        stage("large", jobs)
    if pool is not None:
        pool.close()

    section = {"meta": {"device": args.device, "budgets": models, "lr": LR, "lr_schedule": LR_SCHEDULE, "batch": BATCH,
                        "wall_s": round(time.perf_counter() - start, 1), "quick": args.quick},
               "chosen": chosen, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(section, indent=1))
    if not args.no_results:
        from results import update_section

        update_section("admm_sweep", section)
    return section


if __name__ == "__main__":
    main()
