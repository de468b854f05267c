"""lastbit's own hardware target: a simulated FPGA-style accelerator with a multiplier-free
shift-add PE array for power-of-two weight codes (docs/ACCELERATOR.md).

    config.py          the parameterised hardware and its presets (presets.toml)
    isa.py             LOAD / STORE / GEMM / ALU / FINISH, dependency tokens, 128-bit encoding
    compiler.py        one quantized layer -> tiling, instruction stream, DRAM image
    functional_sim.py  bit-exact execution, vectorised per instruction
    timing_sim.py      cycles of the three overlapping queues, DRAM traffic, PE utilisation
    energy.py          energy/area from Horowitz (ISSCC 2014), shift-add vs int8 MAC vs fp32
    offload.py         the Relax partition: quantized layers to the accelerator, the rest to the host

Targets bind a config to their triple with :func:`bind_target` (``targets/accel_sim.py``).
"""

from __future__ import annotations

from lastbit.codegen.accel.config import (
    AccelConfig,
    AccelConfigError,
    load_presets,
    preset,
)
from lastbit.errors import TargetError

__all__ = ["AccelConfig", "AccelConfigError", "bind_target", "config_for_target", "load_presets", "preset"]

_TARGET_CONFIGS: dict[str, AccelConfig] = {}


def bind_target(triple: str, config: AccelConfig) -> None:
    """Say which accelerator instance a target triple compiles for."""
    if triple in _TARGET_CONFIGS and _TARGET_CONFIGS[triple] != config:
        raise TargetError(f"target '{triple}' is bound to accelerator '{_TARGET_CONFIGS[triple].name}' already")
    _TARGET_CONFIGS[triple] = config


def config_for_target(triple: str) -> AccelConfig:
    try:
        return _TARGET_CONFIGS[triple]
    except KeyError:
        raise TargetError(f"target '{triple}' has runner 'sim' but no accelerator config is bound to it "
                          "(call lastbit.codegen.accel.bind_target)") from None
