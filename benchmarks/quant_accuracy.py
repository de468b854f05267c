"""Accuracy of power-of-two weight quantization (projection vs STE vs ADMM) on Fashion-MNIST,
plus EfficientNet-Lite0 data-free fidelity.  Writes bench/results.json and a PNG.

Every trained/evaluated number is cached as JSON under cache_dir()/quant_accuracy/, keyed by
model, code set, method, budget and seed, so a rerun only re-prints and re-plots.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench"
CODE_SETS = ("binary", "ternary", "pow2-2", "pow2-4")
METHODS = ("projection", "ste", "admm")
SEED = 0
LR = 0.01
BATCH = 64
BN_BATCHES = 8

# Fine-tuning budget per model, identical for STE and ADMM: `train` samples of the Fashion-MNIST
# train split (a fixed seed-0 subset), `epochs` passes.  Sized for a 2-core CPU: one resnet20
# STE batch costs ~1 s there, an ADMM batch (extragradient: two forward/backward) ~2 s.
BUDGETS = {
    "lenet5": {"train": 2000, "epochs": 1},
    "resnet20": {"train": 384, "epochs": 1},
}
QUICK_BUDGETS = {"lenet5": {"train": 512, "epochs": 1}}
EFFNET_SAMPLES = 256


def cache_path(key: dict) -> Path:
    from lastbit.frontend.training import cache_dir

    blob = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    tag = "-".join(str(key[k]) for k in ("model", "codes", "method") if k in key)
    return cache_dir() / "quant_accuracy" / f"{tag}-{digest}.json"


def cached(key: dict, compute) -> dict:
    """compute() once per key; the result dict (plain numbers) lives in a JSON beside the weights."""
    from lastbit.fileio import atomic_write_json

    path = cache_path(key)
    if path.is_file():
        try:
            return json.loads(path.read_text())["result"]
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged entry is recomputed
    start = time.perf_counter()
    result = compute()
    result["compute_s"] = round(time.perf_counter() - start, 2)
    atomic_write_json(path, {"key": key, "result": result})
    return result


def model_bytes(module, result=None) -> int:
    """Deployed size: packed codes ceil(n·bits/8) + 4 B per α for quantized weights, 4 B per other
    parameter (fp32 first/last layers, biases, BatchNorm affine; running stats fold into the conv)."""
    quantized = set(result.codes) if result is not None else set()
    total = sum(4 * p.numel() for name, p in module.named_parameters() if name not in quantized)
    if result is not None:
        bits = result.code_set.bits
        for name, q in result.codes.items():
            total += math.ceil(q.size * bits / 8) + 4 * int(np.asarray(result.alphas[name]).size)
    return int(total)


def accuracy(module, arrays, batch_size: int = 500) -> float:
    """Top-1 on arrays, eval mode, no autograd."""
    import torch

    module.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(arrays.labels), batch_size):
            x = torch.from_numpy(arrays.images[i:i + batch_size])
            y = torch.from_numpy(arrays.labels[i:i + batch_size])
            correct += int((module(x).argmax(1) == y).sum())
    return correct / len(arrays.labels)


def train_subset(train, count: int):
    from lastbit.frontend.datasets import ImageArrays

    idx = np.sort(np.random.default_rng(SEED).permutation(len(train.labels))[:count])
    return ImageArrays(train.images[idx], train.labels[idx])


def admm_schedule(batches: int) -> dict:
    """Four G-steps (and dual updates) per run at a fixed ρ = 1: with one epoch the default
    once-per-epoch G-step would leave a single dual update.  (On lenet5/10k, ρ = 1/(ηk) and
    ρ-growth schedules scored within ±1.5 points of this one.)"""
    return {"update_every": max(1, batches // 4), "rho": 1.0, "rho_growth": 1.0}


def fashion_rows(name: str, budget: dict, data: dict, progress: bool) -> list[dict]:
    from lastbit.frontend.models import get_model
    from lastbit.passes.admm import admm_finetune, project_module, recalibrate_bn, ste_finetune
    from lastbit.passes.pow2_projection import code_set

    fp32, _ = get_model(name, pretrained=True)
    fp32.eval()
    base = {"model": name, "dataset": "fashion-mnist", "test": 10000, "seed": SEED}
    rows = [{**cached({**base, "method": "fp32", "codes": "fp32"},
                      lambda: {"accuracy": accuracy(fp32, data["test"]), "bytes": model_bytes(fp32)}),
             "model": name, "codes": "fp32", "method": "fp32", "bits": 32}]
    batches = math.ceil(budget["train"] / BATCH) * budget["epochs"]
    for codes in CODE_SETS:
        for method in METHODS:
            key = {**base, "codes": codes, "method": method, "per_channel": False, "lr": LR, "batch": BATCH}
            if method != "projection":
                key.update(budget)
            if method == "admm":
                key.update(admm_schedule(batches))

            def compute(codes=codes, method=method):
                common = {"per_channel": False, "skip": ("first", "last")}
                if method == "projection":
                    result = project_module(fp32, codes, **common)
                    recalibrate_bn(result.module, data["bn"], num_batches=BN_BATCHES, batch_size=BATCH)
                else:
                    train = train_subset(data["train"], budget["train"])
                    fn, extra = (ste_finetune, {}) if method == "ste" else (admm_finetune, admm_schedule(batches))
                    result = fn(fp32, (train.images, train.labels), codes, epochs=budget["epochs"], lr=LR,
                                batch_size=BATCH, bn_batches=BN_BATCHES, progress=progress, seed=SEED, **common, **extra)
                return {"accuracy": accuracy(result.module, data["test"]), "bytes": model_bytes(result.module, result)}

            row = cached(key, compute)
            rows.append({**row, "model": name, "codes": codes, "method": method, "bits": code_set(codes).bits,
                         "budget": None if method == "projection" else dict(budget)})
            print(f"  {name:<9} {codes:<8} {method:<10} acc {row['accuracy']:.4f}  ({row.get('compute_s', 0):.0f} s)", flush=True)
    return rows


def effnet_rows(samples: int) -> list[dict]:
    """Data-free fidelity of projected EfficientNet-Lite0 against its own fp32 outputs."""
    import torch.nn.functional as F

    from lastbit.frontend.models.efficientnet import augmented_samples, efficientnet_lite0
    from lastbit.passes.admm import project_module
    from lastbit.passes.pow2_projection import code_set

    state = {}

    def fp32_logits():
        if "ref" not in state:
            state["model"] = efficientnet_lite0(pretrained=True)
            state["x"] = augmented_samples(samples, seed=SEED)
            state["ref"] = logits_of(state["model"], state["x"])
        return state["model"], state["x"], state["ref"]

    base = {"model": "efficientnet-lite0", "samples": samples, "seed": SEED, "method": "projection", "per_channel": True}
    rows = [{**cached({**base, "codes": "fp32", "method": "fp32"}, lambda: {"bytes": model_bytes(fp32_logits()[0])}),
             "model": "efficientnet-lite0", "codes": "fp32", "method": "fp32", "bits": 32, "top1_agreement": 1.0, "kl": 0.0}]
    for codes in CODE_SETS:
        def compute(codes=codes):
            model, x, ref = fp32_logits()
            result = project_module(model, codes, per_channel=True, skip=("first", "last"))
            out = logits_of(result.module, x)
            kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
            return {"top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()), "kl": float(kl),
                    "bytes": model_bytes(result.module, result)}

        row = cached({**base, "codes": codes}, compute)
        rows.append({**row, "model": "efficientnet-lite0", "codes": codes, "method": "projection", "bits": code_set(codes).bits})
        print(f"  effnet    {codes:<8} agree {row['top1_agreement']:.3f} KL {row['kl']:.4f}  ({row.get('compute_s', 0):.0f} s)", flush=True)
    return rows


def logits_of(model, x, batch_size: int = 32):
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, marker in (("lenet5", "o"), ("resnet20", "s")):
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        for method in METHODS:
            pts = sorted((r["bytes"], r["accuracy"]) for r in mine if r["method"] == method)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, label=f"{model} {method}")
        fp = next(r for r in mine if r["method"] == "fp32")
        ax.scatter([fp["bytes"]], [100 * fp["accuracy"]], marker="*", s=150, color="k", zorder=5)
        ax.annotate(f"{model} fp32", (fp["bytes"], 100 * fp["accuracy"]), textcoords="offset points", xytext=(-60, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model bytes (packed codes + α + fp32 first/last layers; log)")
    ax.set_ylabel("Fashion-MNIST test top-1, % (10k)")
    ax.set_title("power-of-two weights: binary → ternary → {±2} → {±4} (left to right)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    from lastbit.fileio import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


def print_table(rows: list[dict], effnet: list[dict]) -> None:
    print(f"\n{'model':<9} {'codes':<8} {'bits':>4} {'bytes':>9} | {'projection':>10} {'STE':>7} {'ADMM':>7}")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        fp = next(r for r in mine if r["method"] == "fp32")
        print(f"{model:<9} {'fp32':<8} {32:>4} {fp['bytes']:>9} | {100 * fp['accuracy']:>9.2f}%")
        for codes in CODE_SETS:
            by = {r["method"]: r for r in mine if r["codes"] == codes}
            accs = " ".join(f"{100 * by[m]['accuracy']:>{10 if m == 'projection' else 7}.2f}" for m in METHODS)
            print(f"{model:<9} {codes:<8} {by['admm']['bits']:>4} {by['admm']['bytes']:>9} | {accs}")
    if effnet:
        print(f"\nefficientnet-lite0, projection per output channel, {EFFNET_SAMPLES} augmented sample crops "
              "(no ImageNet validation set offline: fidelity to fp32, not accuracy)")
        for r in effnet:
            print(f"  {r['codes']:<8} {r['bits']:>2} bit {r['bytes']:>9} B  top-1 agreement {100 * r['top1_agreement']:6.2f}%  KL(fp32‖q) {r['kl']:.4f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="lenet5 only, small budget, no EfficientNet")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while fine-tuning")
    args = parser.parse_args(argv)
    import torch

    from results import update_section

    from lastbit.frontend.datasets import fashion_mnist

    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    lazy = {}

    class Data(dict):  # the 70k images are only read when some entry is not cached yet
        def __missing__(self, split):
            if not lazy:
                lazy["train"], lazy["test"] = fashion_mnist("train"), fashion_mnist("test")
                lazy["bn"] = (lazy["train"].images[:BATCH * BN_BATCHES * 4], lazy["train"].labels[:BATCH * BN_BATCHES * 4])
            return lazy[split]

    rows = []
    for name, budget in budgets.items():
        rows += fashion_rows(name, budget, Data(), args.progress)
    effnet = [] if args.quick else effnet_rows(EFFNET_SAMPLES)
    print_table(rows, effnet)

    import platform

    import lastbit

    meta = {
        "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "lastbit": lastbit.__version__,
        "per_channel": {"fashion-mnist": False, "efficientnet-lite0": True}, "skip": ["first", "last"], "lr": LR,
        "batch": BATCH, "budgets": budgets, "admm_schedule": {m: admm_schedule(math.ceil(b["train"] / BATCH) * b["epochs"]) for m, b in budgets.items()},
        "test_set": "fashion-mnist test, 10000 images", "effnet_inputs": f"{EFFNET_SAMPLES} augmented_samples(seed=0); no ImageNet validation set offline",
        "wall_s": round(time.perf_counter() - start, 1),
    }
    section = {"meta": meta, "rows": rows, "efficientnet": effnet}
    update_section("quant_accuracy", section)
    plot(rows, OUT_DIR / "quant_accuracy.png")
    print(f"\nwall {meta['wall_s']} s")
    return section


if __name__ == "__main__":
    main()
