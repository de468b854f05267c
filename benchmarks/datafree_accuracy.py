"""Data-free power-of-two quantization, technique by technique (ablation): EfficientNet-Lite0's
top-1 agreement and KL divergence with its own fp32 outputs, plus a check that the same
techniques do not hurt a small zoo net (ResNet-8 on Fashion-MNIST, test accuracy).

No ImageNet validation set ships offline: EfficientNet fidelity is measured on augmented
crops of scikit-image's sample photos (``augmented_samples``), agreement with fp32, not
accuracy. Calibration is data-free (ZeroQ images distilled from the BatchNorm statistics, or
DeepInversion's: the same plus a pull towards random classes, jittered and flipped) except in the
rows marked "real crops" (other crops of the same photos, labels unused).
Every row is cached as JSON under cache_dir()/datafree_accuracy/; writes the
"datafree_accuracy" section of bench/results.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEED = 0

# Each row adds one technique to the row above it; all rows keep the first and last layers int8
# per output channel (the library default). "calib" names the calibration inputs of bias
# correction: synthetic, data-free images (SYNTHETIC, settings below) or "crops" (real unlabelled
# crops, for reference).
_ALL = dict(per_channel=True, cle=True, bc=True, rescale=True, dw="rule")
ROWS = {
    "plain projection": dict(per_channel=False, cle=False, bc=False, rescale=False, dw=None, gptq=False, calib=None),
    "+ per-channel α": dict(per_channel=True, cle=False, bc=False, rescale=False, dw=None, gptq=False, calib=None),
    "+ CLE": dict(per_channel=True, cle=True, bc=False, rescale=False, dw=None, gptq=False, calib=None),
    "+ bias correction (ZeroQ)": dict(_ALL, rescale=False, dw=None, gptq=False, calib="zeroq"),
    "+ α rescale (ZeroQ)": dict(_ALL, dw=None, gptq=False, calib="zeroq"),
    "+ depthwise int8 (all)": dict(_ALL, gptq=False, calib="zeroq"),
    "all + GPTQ codes": dict(_ALL, gptq="symmetric", calib="zeroq"),
    "all + asym. GPTQ codes": dict(_ALL, gptq="asymmetric", calib="zeroq"),
    # the calibration sets under the whole pipeline (asymmetric GPTQ, the DataFree() default)
    "all, ZeroQ 32 at 224²": dict(_ALL, gptq="asymmetric", calib="zeroq-224"),
    "all, DeepInversion": dict(_ALL, gptq="asymmetric", calib="deepinv"),  # 32 at 224²; the zoo net's: ZOO_DEEPINV
    "all, DeepInversion clamped": dict(_ALL, gptq="asymmetric", calib="deepinv-clamped"),
    "all - GPTQ, real crops": dict(_ALL, gptq=False, calib="crops"),
    "all - GPTQ, real crops, no CLE": dict(_ALL, cle=False, gptq=False, calib="crops"),
    "all, symmetric GPTQ, real crops": dict(_ALL, gptq="symmetric", calib="crops"),
    "all, real crops": dict(_ALL, gptq="asymmetric", calib="crops"),
}
# Ternary: the ends of the ladder (the CPU budget of `make bench`); the rows without ZeroQ first.
TERNARY_ROWS = ("plain projection", "+ per-channel α", "all - GPTQ, real crops", "+ depthwise int8 (all)",
                "all + GPTQ codes", "all + asym. GPTQ codes", "all, ZeroQ 32 at 224²", "all, DeepInversion",
                "all, DeepInversion clamped", "all, symmetric GPTQ, real crops", "all, real crops")
SYNTHETIC = ("zeroq", "zeroq-224", "deepinv", "deepinv-clamped")
QUICK_ROWS = ("+ per-channel α", "+ depthwise int8 (all)")
# Depthwise convs whose relative projection error ‖W − α·q‖²/‖W‖² exceeds this go int8.
DEPTHWISE_INT8_ERROR = 0.02

# ZeroQ: 16 images at 160² × 150 Adam steps (ZeroQ used 500 at lr 0.5) for the ladder, a minute or
# two on 2 cores (see meta.zeroq.compute_s); "zeroq-224": the 32 images at the input side that
# DataFree() distils and the real crops have. DeepInversion on top of ZeroQ (Yin et al. 2020,
# their Adam betas) as DataFree(synthetic_labels=0.1) runs it: cross-entropy to seeded random
# classes with weight 0.1 beside the BN loss, a jitter of 1/20 of the side, random flips; the
# "clamped" row also keeps the images in the range real inputs have after normalization
# (DataFree(synthetic_range=...)). The "real crops" rows show what real data gives.
DEEPINV = dict(labels=0.1, flip=True, betas=(0.5, 0.9))

def _zoo_range(name: str) -> tuple[float, float]:
    """The range a zoo model's real inputs span (ZooEntry.input_range, what `lastbit compile --datafree` clamps to)."""
    from lastbit.frontend.models import ZOO

    return ZOO[name].input_range


EFFNET_RANGE = _zoo_range("efficientnet-lite0")  # pixels 0..255 through TF_MEAN_RGB / TF_STD_RGB: (−127/128, 1)


def _settings(samples: int, crops: int, small: dict, large: dict) -> dict:
    deepinv = dict(large, **DEEPINV, jitter=large["size"] // 20)
    return {"samples": samples, "crops": crops, "zeroq": small, "zeroq-224": large, "deepinv": deepinv,
            "deepinv-clamped": dict(deepinv, input_range=EFFNET_RANGE)}



def _datafree_defaults(size: int) -> dict:
    """The distillation DataFree() runs (count, steps, batch, lr), at ``size``²."""
    from lastbit.passes.datafree import DataFree

    d = DataFree()
    return dict(count=d.synthetic, size=size, steps=d.synthetic_steps, lr=d.synthetic_lr, batch_size=d.synthetic_batch,
                seed=SEED)


FULL = _settings(128, 32, dict(count=16, size=160, steps=150, lr=0.25, batch_size=16, seed=SEED), _datafree_defaults(224))
QUICK = _settings(16, 8, dict(count=4, size=96, steps=10, lr=0.2, batch_size=4, seed=SEED),
                  dict(count=4, size=96, steps=10, lr=0.2, batch_size=4, seed=SEED))
ZOO_MODEL = "resnet8"  # ResNet-20 training does not fit the shared CPU; ResNet-8 is its 1-block-per-stage sibling
ZOO_ZEROQ = dict(count=64, size=None, steps=200, lr=0.2, batch_size=64, seed=SEED)
ZOO_DEEPINV = dict(ZOO_ZEROQ, **DEEPINV, jitter=1)  # 28² // 20
ZOO_SYNTHETIC = {"zeroq": ZOO_ZEROQ, "deepinv": ZOO_DEEPINV,
                 "deepinv-clamped": dict(ZOO_DEEPINV, input_range=_zoo_range(ZOO_MODEL))}  # pixels in [0, 1]
# The zoo net with real data for reference: the first ZOO_TRAIN_IMAGES training images as calibration
# inputs (post-training, labels unused), symmetric and asymmetric GPTQ.
ZOO_TRAIN_IMAGES = 512
ZOO_REAL_ROWS = {"all, symmetric GPTQ, 512 train images": dict(_ALL, gptq="symmetric", calib="train"),
                 "all, 512 train images": dict(_ALL, gptq="asymmetric", calib="train")}


def cached(key: dict, compute) -> dict:
    """compute() once per key (benchmarks/results.py cached_result, beside the weights)."""
    from results import cached_result

    return cached_result("datafree_accuracy", key, compute)


def tensor_path(key: dict) -> Path:
    from lastbit.frontend.training import cache_dir

    blob = json.dumps(key, sort_keys=True)
    return cache_dir() / "datafree_accuracy" / f"zeroq-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"


def cached_tensor(key: dict, compute, device: str = "cpu"):
    """A tensor computed once per key (ZeroQ images), stored with torch.save, read weights_only."""
    import io

    import torch

    from lastbit.fileio import atomic_write_bytes

    path = tensor_path(key)
    if path.is_file():
        return torch.load(path, weights_only=True)["x"], json.loads(path.with_suffix(".json").read_text())
    start = time.perf_counter()
    x = compute()
    buf = io.BytesIO()
    torch.save({"x": x}, buf)
    atomic_write_bytes(path, buf.getvalue())
    meta = {"key": key, "compute_s": round(time.perf_counter() - start, 1), "device": device}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
    return x, meta


def logits_of(model, x, batch_size: int = 32):
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


# Many crops are ones fp32 itself is unsure of, where any small error flips the top-1; each row also gives the
# agreement on the crops where fp32's top-1 probability is at least this.
CONFIDENT_P = 0.5


def fidelity(out, ref) -> dict:
    import torch.nn.functional as F

    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    agree = out.argmax(1) == ref.argmax(1)
    confident = F.softmax(ref, 1).amax(1) >= CONFIDENT_P
    return {"top1_agreement": float(agree.float().mean()), "kl": float(kl), "confident": int(confident.sum()),
            "confident_agreement": float(agree[confident].float().mean()) if confident.any() else None}


def deployed_bytes(gm, report) -> int:
    """Packed codes ceil(n·bits/8) + 4 B per α for every weighted layer, 4 B per other parameter
    (the folded biases, the clamp bounds)."""
    from lastbit.passes.pow2_projection import code_set

    total = 0
    weights = set()
    for name, (q, alpha) in report.arrays.items():
        total += math.ceil(q.size * code_set(report.codes[name]).bits / 8) + 4 * int(np.asarray(alpha).size)
        weights.add(f"{name}.weight")
    total += sum(4 * p.numel() for n, p in gm.named_parameters() if n not in weights)
    total += sum(4 * b.numel() for n, b in gm.named_buffers() if n.endswith("upper"))
    return int(total)


def run_row(state: dict, codes: str, how: dict) -> dict:
    from lastbit.passes import dfq

    base = state["equalized"] if how["cle"] else state["folded"]
    memo = state.setdefault("projections", {})
    key = (codes, how["cle"], how["per_channel"], how["dw"])
    if key not in memo:  # the exact projection is the slow part; rows share it
        q = copy.deepcopy(base)
        report = dfq.project_traced(q, codes, per_channel=how["per_channel"], keep_first_last="int8",
                                    depthwise_int8_error=DEPTHWISE_INT8_ERROR if how["dw"] == "rule" else None)
        memo[key] = (q, report)
    q, report = copy.deepcopy(memo[key])
    if how["bc"]:
        dfq.bias_correct(base, q, state[how["calib"]], rescale=how["rescale"], projection=report, requantize=how["gptq"])
    return {**fidelity(logits_of(q, state["x"]), state["ref"]), "bytes": deployed_bytes(q, report),
            "depthwise_int8": len(report.depthwise_int8),
            "depthwise": sum(1 for n, m in q.named_modules() if dfq.is_depthwise(m))}


class EffnetState(dict):
    """What the EfficientNet rows share, built on first use, so rows read from the cache cost nothing;
    synthetic images (``settings[key]`` for a key of SYNTHETIC) only when a row needs them."""

    def __init__(self, settings: dict, progress: bool = False, device: str = "cpu"):
        super().__init__()
        self.settings, self.progress, self.device = settings, progress, device
        self.synthetic_meta: dict[str, dict] = {}

    def __missing__(self, key):
        from lastbit.frontend.models.efficientnet import augmented_samples, efficientnet_lite0
        from lastbit.passes import dfq
        from lastbit.passes.zeroq import DistillConfig, distill_data

        settings = self.settings
        if key in SYNTHETIC:
            config = DistillConfig(**settings[key], device=self.device)
            self[key], self.synthetic_meta[key] = cached_tensor(
                {"model": "efficientnet-lite0", **settings[key]},
                lambda: distill_data(self["model"], (3, 224, 224), config, progress=self.progress), self.device)
        elif key == "model":
            self["model"] = efficientnet_lite0(pretrained=True)
        elif key in ("x", "ref", "crops", "folded", "equalized"):
            self["x"] = augmented_samples(settings["samples"], seed=SEED)
            self["ref"] = logits_of(self["model"], self["x"])
            self["crops"] = augmented_samples(settings["crops"], seed=SEED + 1)
            self["folded"] = dfq.trace_layers(self["model"])
            dfq.fold_batch_norms(self["folded"])
            self["equalized"] = copy.deepcopy(self["folded"])
            dfq.cross_layer_equalize(self["equalized"])
        else:
            raise KeyError(key)
        return self[key]

    def synthetic_record(self, key: str) -> dict:
        """The distillation record ({"compute_s", "device", …}) of synthetic set ``key``: the one read or
        written when the images were loaded, else the cache's JSON beside them (every row came from the cache),
        else {} (never distilled)."""
        if key not in self.synthetic_meta:
            path = tensor_path({"model": "efficientnet-lite0", **self.settings[key]}).with_suffix(".json")
            if not path.is_file():
                return {}
            self.synthetic_meta[key] = json.loads(path.read_text())
        return self.synthetic_meta[key]


def effnet_rows(settings: dict, rows: dict[str, tuple[str, ...]], progress: bool, device: str = "cpu") -> tuple[list[dict], dict]:
    state = EffnetState(settings, progress, device)

    base = {"model": "efficientnet-lite0", "samples": settings["samples"], "seed": SEED,
            "dw_threshold": DEPTHWISE_INT8_ERROR, "version": 1}
    out = []
    needed = {ROWS[n]["calib"] for names in rows.values() for n in names}
    for key in SYNTHETIC:
        if key in needed:
            state[key]  # distil (or read) the synthetic images before the rows that need them
    for codes, names in rows.items():
        for name in names:
            how = ROWS[name]
            calib = {how["calib"]: settings[how["calib"]]} if how["calib"] else {}
            row = cached({**base, "codes": codes, **how, **calib}, lambda codes=codes, how=how: run_row(state, codes, how))
            out.append({**row, "codes": codes, "row": name})
            print(f"  effnet {codes:<8} {name:<34} agree {100 * row['top1_agreement']:5.1f}%  KL {row['kl']:.3f}  "
                  f"dw int8 {row['depthwise_int8']}/{row['depthwise']}  ({row.get('compute_s', 0):.0f} s)", flush=True)
    return out, {key: record for key in SYNTHETIC if (record := state.synthetic_record(key))}


def zoo_rows(progress: bool, device: str = "cpu") -> list[dict]:
    """ZOO_MODEL on Fashion-MNIST: per-channel projection vs all the data-free techniques, test accuracy;
    the same pipeline on real training images for reference."""
    import torch

    from lastbit.frontend.datasets import fashion_mnist
    from lastbit.frontend.models import get_model
    from lastbit.passes import dfq
    from lastbit.passes.zeroq import DistillConfig, distill_data

    model, example = get_model(ZOO_MODEL, pretrained=True)
    test = fashion_mnist("test")
    x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)

    def accuracy(m) -> float:
        return float((logits_of(m, x, 500).argmax(1) == y).float().mean())

    calibration_sets: dict = {}

    def calibration(name: str):
        """The calibration inputs a row names, made once per run (rows share them)."""
        if name not in calibration_sets:
            if name == "train":
                calibration_sets[name] = torch.from_numpy(fashion_mnist("train").images[:ZOO_TRAIN_IMAGES])
            else:
                config = DistillConfig(**ZOO_SYNTHETIC[name], device=device)
                calibration_sets[name] = distill_data(model, tuple(example.shape[1:]), config, progress=progress)
        return calibration_sets[name]

    base = {"model": ZOO_MODEL, "dataset": "fashion-mnist test 10k", "zeroq": ZOO_ZEROQ, "version": 1}
    rows = [{**cached({**base, "row": "fp32"}, lambda: {"accuracy": accuracy(model)}), "codes": "fp32", "row": "fp32"}]
    print(f"  {ZOO_MODEL} fp32 acc {100 * rows[0]['accuracy']:.2f}%", flush=True)
    for codes in ("pow2-4", "ternary"):
        for name in ("+ per-channel α", "+ depthwise int8 (all)", "all + GPTQ codes", "all + asym. GPTQ codes",
                     "all, DeepInversion", "all, DeepInversion clamped", *ZOO_REAL_ROWS):
            how = ZOO_REAL_ROWS.get(name) or ROWS[name]

            def compute(codes=codes, how=how):
                folded = dfq.trace_layers(model)
                dfq.fold_batch_norms(folded)
                if how["cle"]:
                    dfq.cross_layer_equalize(folded)
                q = copy.deepcopy(folded)
                report = dfq.project_traced(q, codes, keep_first_last="int8",
                                            depthwise_int8_error=DEPTHWISE_INT8_ERROR if how["dw"] == "rule" else None)
                if how["bc"]:
                    dfq.bias_correct(folded, q, calibration(how["calib"]), rescale=how["rescale"], projection=report,
                                     requantize=how["gptq"])
                return {"accuracy": accuracy(q)}

            calib = how["calib"]  # ZeroQ's settings are in `base`; the other sets name theirs
            extra = ({calib: ZOO_SYNTHETIC[calib]} if calib in ZOO_SYNTHETIC and calib != "zeroq"
                     else {"train": ZOO_TRAIN_IMAGES} if calib == "train" else {})
            row = cached({**base, "codes": codes, **how, **extra}, compute)
            rows.append({**row, "codes": codes, "row": name})
            print(f"  {ZOO_MODEL} {codes:<8} {name:<34} acc {100 * row['accuracy']:.2f}%  "
                  f"({row.get('compute_s', 0):.0f} s)", flush=True)
    return rows


# What a user of the CLI gets: EfficientNet-Lite0 compiled for the host by `lastbit compile efficientnet-lite0
# --quant pow2:3` (plain projection) and with `--datafree` (DataFree() defaults, the "deepinv-clamped" settings
# above, clamped to the zoo's input range), run by lastbit with int8 activations on the integer kernels. The
# cache key holds every DataFree field, so a change of its defaults recomputes the row.
COMPILED_ROWS = {"compiled, plain projection": False, "compiled, --datafree": True}


def compiled_rows(samples: int) -> list[dict]:
    """COMPILED_ROWS: top-1 agreement (KL) of the compiled model with torch fp32 on the same crops as the rows above."""
    import dataclasses

    import torch

    import lastbit
    from lastbit.frontend.models.efficientnet import augmented_samples, efficientnet_lite0
    from lastbit.passes.datafree import DataFree

    state: dict = {}

    def compute(options: DataFree | None) -> dict:
        if not state:
            state["model"] = efficientnet_lite0(pretrained=True)
            state["x"] = augmented_samples(samples, seed=SEED)
            state["ref"] = logits_of(state["model"], state["x"])
        x = state["x"]
        squeeze = lastbit.Squeeze(bits=3, mode="data-free", datafree=options)
        art = lastbit.compile(state["model"], "x86_64-linux-gnu", (x[:1],), name="efficientnet-lite0", squeeze=squeeze)
        out = torch.from_numpy(np.concatenate([art.run(x[i:i + 1].numpy()) for i in range(len(x))]))
        report = art.report()
        return {**fidelity(out, state["ref"]), "bytes": report.model_bytes, "notes": report.notes}

    rows = []
    for name, datafree in COMPILED_ROWS.items():
        options = DataFree(synthetic_range=EFFNET_RANGE) if datafree else None
        key = {"model": "efficientnet-lite0", "samples": samples, "seed": SEED, "row": name, "bits": 3,
               "datafree": options and dataclasses.asdict(options), "version": 1}
        row = cached(key, lambda options=options: compute(options))
        rows.append({**row, "codes": "pow2-4", "row": name})
        print(f"  effnet {name:<34} agree {100 * row['top1_agreement']:5.1f}%  KL {row['kl']:.3f}  "
              f"({row.get('compute_s', 0):.0f} s)", flush=True)
    return rows


# --calibration-counts: the whole pipeline ("all, …" rows, {−4..4}) on more calibration images: real crops of
# the photos the agreement is measured on (augmented_samples(n, seed=1) starts with the 32 of the "real crops"
# rows), crops of other photos (HELD_OUT_SAMPLES: real data, but not the test's) and clamped DeepInversion
# images (one distillation of max(n) images at the table's settings; its first 32 are the table's 32); also those
# first 32 synthetic images together with the largest set of other photos' crops.
COUNT_REAL = (32, 64, 128, 256)
COUNT_SYNTHETIC = (32, 64, 128)


def calibration_count_rows(real: tuple[int, ...], synthetic: tuple[int, ...], device: str = "cpu") -> tuple[list[dict], dict]:
    """Top-1 agreement of the full pipeline at {−4..4} against the number of calibration images, and the
    distillation's own record (its compute_s)."""
    from lastbit.frontend.models.efficientnet import HELD_OUT_SAMPLES, augmented_samples

    how = ROWS["all, real crops"]
    deepinv = dict(FULL["deepinv-clamped"], count=max(synthetic))
    state = EffnetState({**FULL, "crops": max(real), "deepinv-clamped": deepinv}, device=device)

    def other_photos():
        if "other photos" not in state:  # made once: their own rows and the mixed row read them
            state["other photos"] = augmented_samples(max(real), seed=SEED + 1, names=HELD_OUT_SAMPLES)
        return state["other photos"]

    def mixed():
        import torch

        return torch.cat([state["deepinv-clamped"][:min(synthetic)], other_photos()])

    # source: (counts, what its images are for the cache key, the images; the first n of them calibrate)
    sources = {
        "real crops": (real, {"crops": max(real)}, lambda: state["crops"]),
        "other photos": (real, {"crops": max(real), "photos": list(HELD_OUT_SAMPLES)}, other_photos),
        "DeepInversion clamped": (synthetic, {"deepinv-clamped": deepinv}, lambda: state["deepinv-clamped"]),
        # the first DeepInversion images and all the other photos' crops together
        "DeepInversion + other photos": ((min(synthetic) + max(real),),
                                         {"deepinv-clamped": deepinv, "deepinv_first": min(synthetic),
                                          "crops": max(real), "photos": list(HELD_OUT_SAMPLES)}, mixed),
    }
    base = {"model": "efficientnet-lite0", "samples": FULL["samples"], "seed": SEED, "codes": "pow2-4",
            "dw_threshold": DEPTHWISE_INT8_ERROR, **how, "confident_p": CONFIDENT_P, "version": 2}
    out = []
    for source, (counts, key, images) in sources.items():
        for n in counts:
            def compute(source=source, images=images, n=n):
                if source not in state:
                    state[source] = images()
                state["calibration"] = state[source][:n]
                return run_row(state, "pow2-4", dict(how, calib="calibration"))

            row = cached({**base, "calib": source, **key, "count": n}, compute)
            out.append({**row, "calib": source, "count": n})
            print(f"  effnet pow2-4 all, {n:>3} {source:<28} agree {100 * row['top1_agreement']:5.1f}%  KL {row['kl']:.3f}  "
                  f"confident {100 * row['confident_agreement']:5.1f}% of {row['confident']}  ({row.get('compute_s', 0):.0f} s)",
                  flush=True)
    return out, state.synthetic_record("deepinv-clamped")


def print_table(rows: list[dict], samples: int) -> None:
    print(f"\nefficientnet-lite0 data-free, top-1 agreement with fp32 (KL) on {samples} augmented crops of the sample "
          "photos (no ImageNet validation set offline: fidelity, not accuracy)")
    codes_list = list(dict.fromkeys(r["codes"] for r in rows))
    print(f"{'':<34} " + " ".join(f"{c:>18}" for c in codes_list))
    for name in ROWS:
        cells = []
        for codes in codes_list:
            r = next((r for r in rows if r["codes"] == codes and r["row"] == name), None)
            cells.append(f"{100 * r['top1_agreement']:>9.1f}% ({r['kl']:5.3f})" if r else f"{'-':>18}")
        if any(c.strip() != "-" for c in cells):
            print(f"{name:<34} " + " ".join(cells))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="16 crops, a tiny ZeroQ set, two pow2-4 rows, no zoo check")
    parser.add_argument("--no-zoo", action="store_true", help="skip the small zoo net (ResNet-8, Fashion-MNIST) check")
    parser.add_argument("--zoo-only", action="store_true",
                        help="only the small zoo net's rows; the rest of the stored section is kept")
    parser.add_argument("--compiled-only", action="store_true",
                        help="only the compiled EfficientNet rows (what the CLI gives); the rest of the stored section is kept")
    parser.add_argument("--progress", action="store_true", help="tqdm bars while distilling")
    parser.add_argument("--device", default="cpu", help="where ZeroQ optimises its images (cuda when there is one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--codes", nargs="+", metavar="SET", help="only these code sets' rows (and write no results)")
    parser.add_argument("--calibration-counts", action="store_true",
                        help=f"only the whole pipeline on {COUNT_REAL} real crops (of the test's photos and of "
                             f"others), {COUNT_SYNTHETIC} DeepInversion images and the first {min(COUNT_SYNTHETIC)} of "
                             f"those with {max(COUNT_REAL)} crops of other photos (section datafree_accuracy_count)")
    parser.add_argument("--skip-zeroq", action="store_true",
                        help="only the rows that need no synthetic images (write no results)")
    args = parser.parse_args(argv)
    import platform

    import torch
    from results import update_section

    import lastbit

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    if args.zoo_only or args.compiled_only:
        return _one_part(args)
    if args.calibration_counts:
        from lastbit.frontend.models.efficientnet import HELD_OUT_SAMPLES

        rows, distilled = calibration_count_rows(COUNT_REAL, COUNT_SYNTHETIC, args.device)
        section = {"meta": {"codes": "pow2-4", "pipeline": "all (the 'all, real crops' row's steps)",
                            "confident": f"confident_agreement: on the crops where fp32's top-1 probability ≥ {CONFIDENT_P}",
                            "eval": f"{FULL['samples']} augmented_samples(seed={SEED})",
                            "real": f"augmented_samples(n, seed={SEED + 1})",
                            "other photos": f"augmented_samples(n, seed={SEED + 1}, names={list(HELD_OUT_SAMPLES)})",
                            "synthetic": {**FULL["deepinv-clamped"], "count": max(COUNT_SYNTHETIC),
                                          "compute_s": distilled.get("compute_s"), "device": distilled.get("device")},
                            "wall_s": round(time.perf_counter() - start, 1)}, "rows": rows}
        update_section("datafree_accuracy_count", section)
        return section
    settings = QUICK if args.quick else FULL
    rows = {"pow2-4": QUICK_ROWS} if args.quick else {"pow2-4": tuple(ROWS), "ternary": TERNARY_ROWS}
    if args.codes:  # fill the row cache for some code sets (e.g. two processes); a full run then writes
        rows = {c: r for c, r in rows.items() if c in args.codes}
    if args.skip_zeroq:
        rows = {c: tuple(n for n in r if ROWS[n]["calib"] not in SYNTHETIC) for c, r in rows.items()}
    effnet, synthetic_meta = effnet_rows(settings, rows, args.progress, args.device)
    zoo = [] if args.quick or args.no_zoo else zoo_rows(args.progress, args.device)
    compiled = [] if args.quick or args.codes or args.skip_zeroq else compiled_rows(settings["samples"])
    print_table(effnet, settings["samples"])
    meta = {
        "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "lastbit": lastbit.__version__,
        "inputs": f"{settings['samples']} augmented_samples(seed={SEED}); 'real crops' rows calibrate on {settings['crops']} "
                  f"augmented_samples(seed={SEED + 1}); no ImageNet validation set offline",
        **{key: {**settings[key], "compute_s": synthetic_meta.get(key, {}).get("compute_s"),
                 "device": synthetic_meta.get(key, {}).get("device")} for key in SYNTHETIC},
        "zoo_synthetic": ZOO_SYNTHETIC,
        "depthwise_int8_error": DEPTHWISE_INT8_ERROR, "first_last": "int8 per output channel",
        "wall_s": round(time.perf_counter() - start, 1),
    }
    section = {"meta": meta, "efficientnet": effnet, "zoo": zoo, "compiled": compiled}
    if not args.codes and not args.skip_zeroq:
        update_section("datafree_accuracy", section)
    print(f"\nwall {meta['wall_s']} s")
    return section


def _one_part(args) -> dict:
    """--zoo-only / --compiled-only: that part run (or read from the cache) into the stored section, the rest kept."""
    from results import RESULTS, update_section

    stored = json.loads(RESULTS.read_text()).get("datafree_accuracy") if RESULTS.is_file() else None
    if not stored or not stored.get("efficientnet"):
        raise SystemExit("--zoo-only / --compiled-only keep the stored EfficientNet rows, and bench/results.json has "
                         "none: run without them")
    section = dict(stored)
    if args.zoo_only:
        section.update(zoo=zoo_rows(args.progress, args.device), meta={**stored["meta"], "zoo_synthetic": ZOO_SYNTHETIC})
    if args.compiled_only:
        section["compiled"] = compiled_rows(FULL["samples"])
    update_section("datafree_accuracy", section)
    return section


if __name__ == "__main__":
    main()
