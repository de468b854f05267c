"""Does a larger budget close ADMM's gap to STE on a BatchNorm network? ResNet-8, 1 vs 3 epochs.

quant_accuracy.py's table gives every method one epoch of 20k Fashion-MNIST samples, and
there STE leads ADMM on ResNet-8 at binary and ternary. This bench reruns those cells with
the table's settings (passes/admm.py's defaults, quant_accuracy.method_settings) at one and
at three epochs of the same samples, and records per epoch the training accuracy of the
weights being stepped, ‖W − G‖/‖W‖ and ``code_changes``: the share of the quantized
weights whose code changed during the epoch (ADMM: the codes of Π(W + λ); STE: of Π(W)).

The question it answers: if ADMM only lacked steps, three epochs would lift it as they lift
STE. If its codes stop moving once ρ has grown (the prox pins W to G − λ, and with a nearly
linear loss the scaled dual settles at −∇f/ρ instead of integrating gradients, so a code
changes only when one step of size ∇f/ρ crosses a rounding threshold), more epochs cannot
help and the gap is structural. CPU: ~6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = "resnet8"
CODE_SETS = ("binary", "ternary")
METHODS = ("ste", "admm")
EPOCHS = (1, 3)


def run(method: str, codes: str, epochs: int, fp32, train, test) -> dict:
    import quant_accuracy as qa

    from lastbit.passes.admm import admm_finetune, g_metric_for, ste_finetune

    budget = {**qa.BUDGETS[MODEL], "epochs": epochs}
    batches = math.ceil(budget["train"] / qa.BATCH) * epochs
    subset = qa.train_subset(train, budget["train"])
    fn = ste_finetune if method == "ste" else admm_finetune
    start = time.perf_counter()
    settings = qa.method_settings(method, batches, g_metric_for(fp32))
    result = fn(fp32, (subset.images, subset.labels), codes, epochs=epochs, **settings,
                bn_batches=qa.BN_BATCHES, progress=False, seed=qa.SEED, skip=qa.SKIP, skip_codes=qa.SKIP_CODES)
    return {"method": method, "codes": codes, "epochs": epochs, "train": budget["train"],
            "accuracy": qa.accuracy(result.module, test), "seconds": round(time.perf_counter() - start, 1),
            "history": [{"epoch": h.epoch, "train_accuracy": h.accuracy, "residual": h.residual, "rho": h.rho,
                         "code_changes": h.code_changes} for h in result.history]}


def main(argv=None) -> dict:
    import torch

    from lastbit.frontend.datasets import fashion_mnist
    from lastbit.frontend.models import get_model
    from results import update_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ternary only, 1 and 2 epochs of 2000 samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    import quant_accuracy as qa

    fp32, _ = get_model(MODEL, pretrained=True)
    fp32.eval()
    train, test = fashion_mnist("train"), fashion_mnist("test")
    code_sets, epochs = (("ternary",), (1, 2)) if args.quick else (CODE_SETS, EPOCHS)
    if args.quick:
        qa.BUDGETS = {**qa.BUDGETS, MODEL: {"train": 2000, "epochs": 1}}
    rows = []
    for codes in code_sets:
        for method in METHODS:
            for n in epochs:
                row = run(method, codes, n, fp32, train, test)
                rows.append(row)
                moved = " ".join(f"{h['code_changes']:.4f}" for h in row["history"])
                print(f"  {codes:<8} {method:<5} {n} epoch(s): {100 * row['accuracy']:.2f}%  "
                      f"codes changed per epoch {moved}  ({row['seconds']:.0f} s)", flush=True)
    gain = {f"{c}/{m}": next(r["accuracy"] for r in rows if r["codes"] == c and r["method"] == m and r["epochs"] == epochs[-1])
            - next(r["accuracy"] for r in rows if r["codes"] == c and r["method"] == m and r["epochs"] == epochs[0])
            for c in code_sets for m in METHODS}
    for key, g in gain.items():
        print(f"  {key}: {epochs[-1]} vs {epochs[0]} epoch(s) {100 * g:+.2f} pt")
    section = {"quick": args.quick, "model": MODEL, "train": qa.BUDGETS[MODEL]["train"], "epochs": list(epochs),
               "fp32_accuracy": qa.accuracy(fp32, test), "rows": rows, "gain_pt": {k: 100 * g for k, g in gain.items()}}
    update_section("admm_budget", section)
    return section


if __name__ == "__main__":
    main()
