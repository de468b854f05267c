"""The parameterised hardware of the simulated accelerator, and its presets (presets.toml).

One ``AccelConfig`` fixes everything the compiler and both simulators need: the PE array
(``rows`` output channels × ``cols`` input channels per cycle), the on-chip buffers, DRAM
bandwidth, clock, and the processing element (``pe``): ``"shift-add"`` takes power-of-two
weight codes as 4-bit sign+shift fields; ``"mac8"`` is the int8-MAC design of the same array
size that the energy report compares against (8-bit weights, a multiplier per PE).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from importlib import resources

import tomllib

from lastbit.errors import LastbitError

__all__ = ["AccelConfig", "AccelConfigError", "load_presets", "preset"]

PE_KINDS = ("shift-add", "mac8")


class AccelConfigError(LastbitError):
    """An accelerator configuration is inconsistent or a preset name is unknown."""


@dataclass(frozen=True)
class AccelConfig:
    """One accelerator instance. Buffer sizes are per buffer; each is split in two halves so
    loads of the next tile overlap compute on this one (double buffering)."""

    name: str = "default"
    description: str = ""
    rows: int = 16
    cols: int = 16
    input_kib: int = 32
    weight_kib: int = 256
    acc_kib: int = 128
    dram_bytes_per_cycle: int = 16
    clock_mhz: float = 200.0
    weight_bits: int = 4
    dma_latency_cycles: int = 64
    gemm_pipeline_cycles: int = 8
    pe: str = "shift-add"

    def __post_init__(self) -> None:
        for f in ("rows", "cols", "input_kib", "weight_kib", "acc_kib", "dram_bytes_per_cycle"):
            if int(getattr(self, f)) <= 0:
                raise AccelConfigError(f"accelerator '{self.name}': {f} must be positive, got {getattr(self, f)}")
        if self.pe not in PE_KINDS:
            raise AccelConfigError(f"accelerator '{self.name}': pe {self.pe!r} is not one of {PE_KINDS}")
        want = 4 if self.pe == "shift-add" else 8
        if self.weight_bits != want:
            raise AccelConfigError(f"accelerator '{self.name}': a {self.pe} PE takes {want}-bit weights, "
                                   f"config says weight_bits={self.weight_bits}")
        if (self.rows * self.cols * self.weight_bits) % 8:
            raise AccelConfigError(f"accelerator '{self.name}': a {self.rows}x{self.cols} weight block "
                                   f"of {self.weight_bits}-bit codes is not a whole number of bytes")
        for f, entries in (("input_kib", self.input_entries), ("weight_kib", self.weight_entries),
                           ("acc_kib", self.acc_entries)):
            if entries < 2 or entries > 1 << 16:
                raise AccelConfigError(f"accelerator '{self.name}': {f}={getattr(self, f)} gives {entries} "
                                       "entries; need 2 .. 2^16 (16-bit SRAM addresses)")

    # Sizes of one SRAM entry (the unit of SRAM addresses and of DMA elements).
    @property
    def input_entry_bytes(self) -> int:
        """One input vector: ``cols`` int8 activations of one pixel."""
        return self.cols

    @property
    def weight_entry_bytes(self) -> int:
        """One rows×cols weight block of ``weight_bits``-bit codes."""
        return self.rows * self.cols * self.weight_bits // 8

    @property
    def acc_entry_bytes(self) -> int:
        """One accumulator vector: ``rows`` int32 values."""
        return self.rows * 4

    @property
    def input_entries(self) -> int:
        return self.input_kib * 1024 // self.input_entry_bytes

    @property
    def weight_entries(self) -> int:
        return self.weight_kib * 1024 // self.weight_entry_bytes

    @property
    def acc_entries(self) -> int:
        return self.acc_kib * 1024 // self.acc_entry_bytes

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def mac8_twin(self) -> AccelConfig:
        """The int8-MAC design with the same array, buffers and DRAM: what pow2 codes are compared to."""
        return replace(self, name=f"{self.name}-mac8", pe="mac8", weight_bits=8,
                       description=f"int8-MAC twin of {self.name}")

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@functools.lru_cache(maxsize=1)
def load_presets() -> dict[str, AccelConfig]:
    """Every preset of presets.toml (shipped as package data), by name."""
    text = resources.files(__package__).joinpath("presets.toml").read_text()
    known = {f.name for f in fields(AccelConfig)}
    presets = {}
    for name, table in tomllib.loads(text).items():
        unknown = set(table) - known
        if unknown:
            raise AccelConfigError(f"presets.toml [{name}]: unknown keys {sorted(unknown)}")
        presets[name] = AccelConfig(name=name, **table)
    return presets


def preset(name: str = "default") -> AccelConfig:
    presets = load_presets()
    if name not in presets:
        raise AccelConfigError(f"unknown accelerator preset '{name}'; known: {', '.join(sorted(presets))}")
    return presets[name]
