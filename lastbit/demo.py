"""`make demo`: compile the built-in default model for this host, classify sample photos,
and print what it costs and how fast it runs next to PyTorch eager on the same inputs."""

from __future__ import annotations

import time

import numpy as np

DEMO_IMAGES = ("chelsea", "coffee", "rocket", "astronaut")


def run_demo(target: str = "x86_64-linux-gnu", repeat: int = 20) -> dict:
    import torch

    import lastbit
    from lastbit.frontend.models.efficientnet import efficientnet_lite0, sample_images
    from lastbit.frontend.models.imagenet_labels import imagenet_labels

    torch.set_num_threads(2)
    labels = imagenet_labels()
    model = efficientnet_lite0(pretrained=True)
    images = sample_images(DEMO_IMAGES)
    example = next(iter(images.values()))

    print("lastbit demo: EfficientNet-Lite0 (pretrained ImageNet, ships offline) on this host")
    start = time.perf_counter()
    artifact = lastbit.compile(model, target=target, example_inputs=(example,), name="efficientnet-lite0")
    artifact.run(example.numpy())  # builds the executable
    compile_s = time.perf_counter() - start

    print(f"\n{'image':<11} {'torch top-1':<16} lastbit top-5 (probability)")
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

    x = example.numpy()
    lastbit_ms = artifact.latency_ms(x, repeat=repeat)
    with torch.no_grad():
        for _ in range(3):
            model(example)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - t0)
    torch_ms = float(np.median(times) * 1e3)

    report = artifact.report()
    print(f"\n{'':<24} {'lastbit':>12} {'torch eager':>12}")
    print(f"{'parameters':<24} {report.params:>12,} {sum(p.numel() for p in model.parameters()):>12,}")
    print(f"{'model bytes':<24} {report.model_bytes:>12,} {sum(p.numel() * 4 for p in model.parameters()):>12,}")
    print(f"{'GFLOPs':<24} {report.flops / 1e9:>12.3f} {'':>12}")
    print(f"{'latency, batch 1 (ms)':<24} {lastbit_ms:>12.2f} {torch_ms:>12.2f}")
    print(f"{'top-1 agreement':<24} {agree}/{len(images)}")
    print(f"\ncompiled for {target} in {compile_s:.1f} s; lastbit/torch latency ratio {lastbit_ms / torch_ms:.2f}")
    return {"lastbit_ms": lastbit_ms, "torch_ms": torch_ms, "agree": agree, "images": len(images)}
