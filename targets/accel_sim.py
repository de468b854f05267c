"""The simulated shift-add accelerator (docs/ACCELERATOR.md): ``accel-sim`` is the default
preset, ``accel-sim-<name>`` every other preset of codegen/accel/presets.toml.

Quantized conv2d/dense layers run on the simulated array; the rest of the model is compiled
for this host (x86-64), which drives the accelerator. ``runner="sim"``: ``Artifact.run``
runs the host part in-process and the accelerator in the bit-exact simulator.
"""

from __future__ import annotations

from lastbit.codegen.accel import AccelConfig, bind_target, load_presets
from lastbit.targets.registry import Target, register
from lastbit.targets.x86_64 import _features as _host_features
from lastbit.targets.x86_64 import _tvm_target as _host_tvm_target


def accelerator_target(triple: str, config: AccelConfig, description: str | None = None) -> Target:
    """Register ``triple`` as a target that offloads quantized layers to ``config``."""
    bind_target(triple, config)
    return register(Target(
        triple=triple,
        description=description or f"simulated accelerator: {config.description or config.name}",
        tvm_target=_host_tvm_target,  # the host part of the model
        features=_host_features,
        runner="sim",
    ))


ACCEL_SIM = {
    name: accelerator_target("accel-sim" if name == "default" else f"accel-sim-{name}", config)
    for name, config in load_presets().items()
}
