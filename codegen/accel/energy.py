"""Energy and area estimate of a simulated run, from a per-operation table, so a user sees
what power-of-two codes buy in hardware.

Source: M. Horowitz, "1.1 Computing's energy problem (and what we can do about it)",
ISSCC 2014, pp. 10-14, the 45 nm / 0.9 V table ("Rough energy costs for various
operations" and the area column beside it):

    integer add     8 bit 0.03 pJ   36 µm²     32 bit 0.1 pJ   137 µm²
    integer mult    8 bit 0.2 pJ   282 µm²     32 bit 3.1 pJ  3495 µm²
    float add      32 bit 0.9 pJ  4184 µm²
    float mult     32 bit 3.7 pJ  7700 µm²
    SRAM read (64 bit)  8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ
    DRAM (64 bit)       1.3-2.6 nJ

Modelling choices (ours, not the paper's): a shift-add PE is a 32-bit accumulate plus a
barrel shifter we cost like an 8-bit adder (the table has no shifter; a 3-stage shifter of
a 14-bit value is a few dozen muxes); an int8 MAC PE is an 8-bit multiply plus a 32-bit
accumulate; an fp32 MAC a float multiply plus a float add. SRAM energy per 64 bits is
interpolated in log(size) between the three table points (clamped outside them), writes
cost like reads, DRAM uses the low end, 1.3 nJ per 64 bits. ``EnergyReport.pe_area_mm2`` covers the PE array only (the
table gives no SRAM area); ``accelerator_area_mm2`` adds the three buffers for design-space
exploration, at the 45 nm 6T bit cell of Intel's 45 nm process, 0.346 µm² (K. Mistry et
al., "A 45nm logic technology ...", IEDM 2007), over an assumed 70 % array efficiency
(decoders, sense amplifiers: our choice), about 0.5 µm² per bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lastbit.codegen.accel.config import AccelConfig
from lastbit.codegen.accel.timing_sim import TimingReport

__all__ = ["HOROWITZ_45NM", "PE_OPS", "EnergyReport", "accelerator_area_mm2", "estimate_energy", "pe_area_um2",
           "pe_energy_pj", "sram_area_mm2"]

# operation -> (energy pJ, area µm²), Horowitz ISSCC 2014, 45 nm
HOROWITZ_45NM: dict[str, tuple[float, float]] = {
    "int8_add": (0.03, 36.0),
    "int32_add": (0.1, 137.0),
    "int8_mult": (0.2, 282.0),
    "int32_mult": (3.1, 3495.0),
    "fp32_add": (0.9, 4184.0),
    "fp32_mult": (3.7, 7700.0),
}
SRAM_PJ_PER_64BIT = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))
DRAM_PJ_PER_64BIT = 1300.0
SRAM_BITCELL_UM2 = 0.346  # Intel 45 nm 6T cell, Mistry et al., IEDM 2007
SRAM_ARRAY_EFFICIENCY = 0.7  # bit cells over macro area (our assumption)

# what one PE does per cycle, as operations of the table
PE_OPS: dict[str, tuple[str, ...]] = {
    "shift-add": ("int32_add", "int8_add"),  # accumulate + barrel shift (costed as an 8-bit add)
    "mac8": ("int8_mult", "int32_add"),
    "fp32-mac": ("fp32_mult", "fp32_add"),
}


def pe_energy_pj(pe: str) -> float:
    return sum(HOROWITZ_45NM[op][0] for op in PE_OPS[pe])


def pe_area_um2(pe: str) -> float:
    return sum(HOROWITZ_45NM[op][1] for op in PE_OPS[pe])


def sram_area_mm2(size_bytes: int) -> float:
    """Area of an SRAM macro of ``size_bytes`` (bit cells over the array efficiency)."""
    return size_bytes * 8 * SRAM_BITCELL_UM2 / SRAM_ARRAY_EFFICIENCY / 1e6


def accelerator_area_mm2(config: AccelConfig) -> dict[str, float]:
    """PE array, buffers and their sum, in mm² (what design-space exploration trades)."""
    pe = config.pes * pe_area_um2(config.pe) / 1e6
    sram = sum(sram_area_mm2(kib * 1024) for kib in (config.input_kib, config.weight_kib, config.acc_kib))
    return {"pe_mm2": pe, "sram_mm2": sram, "total_mm2": pe + sram}


def sram_pj_per_64bit(size_bytes: int) -> float:
    points = SRAM_PJ_PER_64BIT
    if size_bytes <= points[0][0]:
        return points[0][1]
    for (s0, e0), (s1, e1) in zip(points, points[1:]):
        if size_bytes <= s1:
            f = (math.log(size_bytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return e0 + f * (e1 - e0)
    return points[-1][1]


@dataclass
class EnergyReport:
    """Energy of one run, split by where it goes, and the PE array's area."""

    pe_pj: float
    sram_pj: float
    dram_pj: float
    pe_area_mm2: float
    pe: str

    @property
    def total_pj(self) -> float:
        return self.pe_pj + self.sram_pj + self.dram_pj

    def __add__(self, other: EnergyReport) -> EnergyReport:
        return EnergyReport(self.pe_pj + other.pe_pj, self.sram_pj + other.sram_pj, self.dram_pj + other.dram_pj,
                            self.pe_area_mm2, self.pe)

    def to_json(self) -> dict:
        d = asdict(self)
        d["total_pj"] = self.total_pj
        return d


def estimate_energy(timing: TimingReport, config: AccelConfig) -> EnergyReport:
    """Energy of a run whose counts are ``timing`` on ``config``: every PE of the array works
    in every array cycle (padded lanes too), SRAM by bytes moved, DRAM by bytes moved."""
    pe_pj = timing.pe_cycles * config.pes * pe_energy_pj(config.pe)
    sram_pj = (
        timing.sram_input_read_bytes / 8 * sram_pj_per_64bit(config.input_kib * 1024)
        + timing.sram_weight_read_bytes / 8 * sram_pj_per_64bit(config.weight_kib * 1024)
        + timing.sram_acc_access_bytes / 8 * sram_pj_per_64bit(config.acc_kib * 1024)
        + timing.dram_read_bytes / 8 * sram_pj_per_64bit(config.input_kib * 1024)  # DMA writes into SRAM
    )
    dram_pj = timing.dram_bytes / 8 * DRAM_PJ_PER_64BIT
    return EnergyReport(pe_pj, sram_pj, dram_pj, config.pes * pe_area_um2(config.pe) / 1e6, config.pe)
