"""`make demo` / `lastbit demo`: the main job end to end, in about a minute or two.

LeNet-5 trained on the shipped Fashion-MNIST (2 epochs on first use, then cached under
``$LASTBIT_CACHE``) is compiled for this host as fp32 and squeezed to 3 bits (power-of-two
codes, int8 first/last layers, data-free with calibrated int8 activations), and the table
compares test accuracy, model bytes and latency; the same 3-bit model is compiled for
aarch64, run under qemu-user, and its outputs are checked bit for bit against the x86
integer path. When time allows, EfficientNet-Lite0 (ImageNet, ships offline) then classifies
a few sample photos in fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

DEMO_IMAGES = ("chelsea", "coffee", "rocket", "astronaut")


@dataclass
class DemoConfig:
    """What the demo runs; the defaults are `make demo`'s, tests shrink them."""

    model: str = "lenet5"
    pretrained: bool = True  # False: the seeded random init (no training; accuracy is chance)
    train_epochs: int = 2  # on first use (then cached): ~25 s on 2 cores; the zoo's 5 add ~1 point
    bits: int = 3
    test_images: int = 10_000  # Fashion-MNIST test images scored per variant
    calibration_images: int = 256  # training images that set the int8 activation scales
    arm_triple: str = "aarch64-linux-gnu"
    arm_images: int = 4  # test images run under qemu and compared bit for bit
    latency_repeat: int = 50
    photos: bool = True  # the EfficientNet-Lite0 photos table, if the time so far allows
    photos_if_under_s: float = 60.0


@dataclass
class DemoResult:
    """The demo's numbers: one row per variant ("fp32", "3-bit"), the aarch64 check, timings."""

    rows: dict[str, dict] = field(default_factory=dict)
    arm: dict = field(default_factory=dict)
    photos: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(config: DemoConfig | None = None, target: str = "x86_64-linux-gnu") -> DemoResult:
    """Run the demo, print its tables, and return the numbers."""
    import torch

    import lastbit
    from lastbit.frontend.datasets import fashion_mnist
    from lastbit.frontend.models import ZOO, ZOO_SEED, example_input
    from lastbit.frontend.training import cached_trained

    config = config or DemoConfig()
    torch.set_num_threads(2)
    result = DemoResult()
    start = time.perf_counter()
    entry = ZOO[config.model]
    print(f"lastbit demo: {entry.description.split(',')[0]} on Fashion-MNIST, fp32 vs {config.bits}-bit, "
          f"for this host and {config.arm_triple}")
    if config.pretrained:
        model = cached_trained(config.model, entry.build, entry.dataset, epochs=config.train_epochs, seed=ZOO_SEED)
    else:
        model = entry.build().eval()
    example = example_input(config.model)
    result.seconds["model"] = time.perf_counter() - start
    test = fashion_mnist("test")
    x_test, y_test = test.images[: config.test_images], test.labels[: config.test_images]
    calibration = fashion_mnist("train").images[: config.calibration_images]
    squeeze = lastbit.Squeeze(bits=config.bits, data=calibration)  # no labels: data-free, static int8 scales

    variants = {"fp32": None, f"{config.bits}-bit": squeeze}
    artifacts = {}
    for label, sq in variants.items():
        t0 = time.perf_counter()
        artifact = lastbit.compile(model, target, (example,), name=config.model, squeeze=sq)
        artifact.run(example.numpy())  # builds the executable: part of the compile time
        compile_s = time.perf_counter() - t0
        report = artifact.report()
        result.rows[label] = {
            "accuracy": artifact.accuracy((x_test, y_test)),
            "model_bytes": int(report.model_bytes),
            "latency_ms": artifact.latency_ms(example.numpy(), repeat=config.latency_repeat),
            "compile_s": compile_s,
        }
        artifacts[label] = artifact
    result.seconds["host"] = time.perf_counter() - start - result.seconds["model"]

    t0 = time.perf_counter()
    result.arm = compare_on_arm(model, example, squeeze, artifacts[f"{config.bits}-bit"], x_test[: config.arm_images],
                                config.arm_triple, config.model)
    result.seconds["arm"] = time.perf_counter() - t0
    print_table(result, config, len(x_test))

    elapsed = time.perf_counter() - start
    if config.photos and elapsed < config.photos_if_under_s:
        result.photos = photos_table(target)
    elif config.photos:
        print(f"\n(EfficientNet-Lite0 photos table skipped: {elapsed:.0f} s in already)")
    result.seconds["total"] = time.perf_counter() - start
    print(f"\ndone in {result.seconds['total']:.0f} s")
    return result


def compare_on_arm(model, example, squeeze, host_artifact, images: np.ndarray, triple: str, name: str) -> dict:
    """The squeezed model compiled for ``triple`` and run under qemu-user on ``images``, one at
    a time, against the host's integer path on the same images: how many outputs are bit-identical."""
    import lastbit
    from lastbit.targets import get_target

    missing = get_target(triple).missing_tools()
    if missing:
        return {"triple": triple, "skipped": f"needs {', '.join(missing)} (make system-deps installs them)"}
    t0 = time.perf_counter()
    arm = lastbit.compile(model, triple, (example,), name=name, squeeze=squeeze)
    compared = compare_outputs(host_artifact.run, arm.run, images)
    return {"triple": triple, **compared, "seconds": time.perf_counter() - t0}


def compare_outputs(run_host, run_other, images: np.ndarray) -> dict:
    """Run both on each image (batch 1) and count the outputs that are equal bit for bit
    (shape, dtype and every value); max_abs_diff is the largest elementwise gap seen."""
    identical, max_abs_diff = 0, 0.0
    for image in images:
        x = np.ascontiguousarray(image[None], dtype=np.float32)
        on_host, on_other = np.asarray(run_host(x)), np.asarray(run_other(x))
        same = on_host.shape == on_other.shape and on_host.dtype == on_other.dtype and np.array_equal(on_host, on_other)
        identical += int(same)
        if on_host.shape == on_other.shape:
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(on_host.astype(np.float64) - on_other))))
    return {"compared": len(images), "identical": identical, "max_abs_diff": max_abs_diff}


def print_table(result: DemoResult, config: DemoConfig, test_images: int) -> None:
    labels = list(result.rows)
    fp32, low = (result.rows[k] for k in labels)
    print(f"\n{'':<28}" + "".join(f"{k:>14}" for k in labels))
    print(f"{f'test accuracy ({test_images:,})':<28}" + "".join(f"{r['accuracy']:>14.2%}" for r in result.rows.values()))
    print(f"{'model bytes':<28}" + "".join(f"{r['model_bytes']:>14,}" for r in result.rows.values())
          + f"   {fp32['model_bytes'] / max(low['model_bytes'], 1):.1f}x smaller")
    print(f"{'latency, batch 1 (ms)':<28}" + "".join(f"{r['latency_ms']:>14.3f}" for r in result.rows.values()))
    print(f"{'compile + build (s)':<28}" + "".join(f"{r['compile_s']:>14.1f}" for r in result.rows.values()))
    arm = result.arm
    if "skipped" in arm:
        shown = f"skipped: {arm['skipped']}"
    else:
        shown = f"bit-identical to x86 on {arm['identical']}/{arm['compared']} test images"
        if arm["identical"] < arm["compared"]:
            shown = f"DIFFERS: only {shown} (max |Δ| {arm['max_abs_diff']:.3g})"
    print(f"{config.arm_triple + ' (qemu)':<28}{'-':>14}   {shown}")


def photos_table(target: str, repeat: int = 20) -> dict:
    """EfficientNet-Lite0 fp32 on a few sample photos: lastbit's top-5 next to torch's top-1."""
    import torch

    import lastbit
    from lastbit.frontend.models.efficientnet import efficientnet_lite0, sample_images
    from lastbit.frontend.models.imagenet_labels import imagenet_labels

    labels = imagenet_labels()
    model = efficientnet_lite0(pretrained=True)
    images = sample_images(DEMO_IMAGES)
    example = next(iter(images.values()))
    print("\nEfficientNet-Lite0 (pretrained ImageNet, ships offline), fp32 on this host")
    start = time.perf_counter()
    artifact = lastbit.compile(model, target=target, example_inputs=(example,), name="efficientnet-lite0")
    artifact.run(example.numpy())  # builds the executable
    compile_s = time.perf_counter() - start
    print(f"{'image':<11} {'torch top-1':<16} lastbit top-5 (probability)")
    agree = 0
    for name, x in images.items():
        logits = np.asarray(artifact.run(x.numpy())).reshape(-1)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top5 = np.argsort(probs)[::-1][:5]
        with torch.no_grad():
            torch_top1 = int(model(x).argmax())
        agree += int(top5[0] == torch_top1)
        shown = ", ".join(f"{labels[i]} ({probs[i]:.2f})" for i in top5)
        print(f"{name:<11} {labels[torch_top1][:16]:<16} {shown}")
    lastbit_ms = artifact.latency_ms(example.numpy(), repeat=repeat)
    with torch.no_grad():
        for _ in range(3):
            model(example)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - t0)
    torch_ms = float(np.median(times) * 1e3)
    print(f"top-1 agreement {agree}/{len(images)}; latency {lastbit_ms:.2f} ms (torch eager {torch_ms:.2f} ms); "
          f"compiled in {compile_s:.1f} s")
    return {"lastbit_ms": lastbit_ms, "torch_ms": torch_ms, "agree": agree, "images": len(images), "compile_s": compile_s}
