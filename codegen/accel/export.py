"""Write the accelerator side of a compiled model to a folder, and read it back.

What an FPGA runtime would load: per offloaded layer its encoded instruction stream
(``layerN.isa.bin``: little-endian uint64 pairs, see isa.py) and the weight region of its
DRAM image (``layerN.weights.bin``), plus ``manifest.json`` with the accelerator config,
each layer's geometry, tiling, DRAM layout and the host-side epilogue terms (α′, bias,
activation scale) the driver applies. The host part of the model (the Relax graph around
the layers) is not in it: ``Artifact.run`` runs that in-process.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lastbit.codegen.accel.compiler import AccelProgram, ConvLayer, DramLayout, Tiling
from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.isa import decode, encode
from lastbit.errors import ArtifactError
from lastbit.fileio import check_replaceable_dir, staged_dir

__all__ = ["FORMAT", "export_programs", "load_programs"]

FORMAT = "lastbit-accel-programs-1"
MANIFEST = "manifest.json"


def export_programs(module, out_dir: str | Path, target: str, model: str) -> Path:
    """Write ``module`` (an offload.AccelModule) to ``out_dir``, built beside it and renamed
    into place; only an absent or empty folder, or an earlier export, is replaced."""
    out_dir = Path(out_dir)
    check_replaceable_dir(out_dir, MANIFEST, FORMAT, "an accelerator export", owned_files=_program_files)
    with staged_dir(out_dir) as tmp:
        layers = []
        for i, layer in enumerate(module.layers):
            program = layer.program
            (tmp / f"layer{i}.isa.bin").write_bytes(encode(program.instructions).astype("<u8").tobytes())
            (tmp / f"layer{i}.weights.bin").write_bytes(program.weight_image.tobytes())
            layers.append({
                "name": layer.name, "kind": layer.kind, "fused": list(layer.fused),
                "program": f"layer{i}.isa.bin", "weights": f"layer{i}.weights.bin",
                "instructions": len(program.instructions),
                "geometry": asdict(program.layer), "tiling": asdict(program.tiling), "dram": asdict(program.dram),
                "alpha": [float(a) for a in layer.alpha],
                "bias": None if layer.bias is None else [float(b) for b in layer.bias],
                "activation_scale": layer.activation_scale, "relu": layer.relu, "terms": layer.terms,
            })
        manifest = {"format": FORMAT, "target": target, "model": model, "config": module.config.to_json(),
                    "layers": layers, "host_layers": dict(module.skipped)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def _program_files(manifest: dict) -> list[str]:
    """The files an earlier export wrote, from its manifest (the rest of the folder is the user's)."""
    return [entry[key] for entry in manifest["layers"] for key in ("program", "weights")]


def load_programs(out_dir: str | Path) -> tuple[AccelConfig, list[AccelProgram], dict]:
    """The config, one AccelProgram per layer (decoded from the files) and the manifest."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{out_dir}: no readable {MANIFEST} ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{out_dir}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    config = AccelConfig(**manifest["config"])
    programs = []
    for entry in manifest["layers"]:
        words = np.frombuffer((out_dir / entry["program"]).read_bytes(), dtype="<u8").reshape(-1, 2)
        geometry = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["geometry"].items()}
        programs.append(AccelProgram(
            layer=ConvLayer(**geometry), config=config, tiling=Tiling(**entry["tiling"]),
            instructions=decode(words), dram=DramLayout(**entry["dram"]),
            weight_image=np.frombuffer((out_dir / entry["weights"]).read_bytes(), dtype=np.uint8).copy()))
    return config, programs, manifest

