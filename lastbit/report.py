"""What a compiled model costs: parameters, bytes, FLOPs, and a per-layer table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lastbit.graph import Graph


@dataclass
class LayerInfo:
    """One weighted layer: the op, its weight, its output and its cost."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: int
    kernel: str = "fp32"  # which kernel the target picked for it; "pow2-4 (ref)": dequantize + fp32
    kernel_note: str = ""  # why: the preferred kernels that passed (and their reasons), or why it stayed float
    bits: int = 32  # storage bits per weight (the code width when quantized)
    weight_bytes: int = 0  # the weight as stored: packed codes + α, or 4 bytes/param
    act: str = "fp32"  # activations the layer runs on: "int8", "2u" (2-bit unsigned), "3s" (signed), "fp32"

    def to_json(self) -> dict:
        d = asdict(self)
        d["weight_shape"], d["output_shape"] = list(self.weight_shape), list(self.output_shape)
        return d


@dataclass
class Report:
    """The numbers ``Artifact.report()`` returns and the CLI prints."""

    model: str
    target: str
    params: int
    model_bytes: int
    flops: int
    layers: list[LayerInfo] = field(default_factory=list)
    latency_ms: float | None = None
    fp32_bytes: int = 0  # the same parameters at 4 bytes each
    accuracy: float | None = None  # top-1 on the squeeze data, when it has labels
    accelerator: dict | None = None  # accelerator targets: AccelModule.summary() (cycles, utilisation, energy)
    # Structural squeezes (prune / low-rank): each layer's FLOPs before them, by layer name.
    flops_before: dict[str, int] = field(default_factory=dict)
    # Weights stored sparse-aware (passes/sparsity.py: dense, bitmap or run-length codes per
    # tensor, whichever is smallest); None when no weight has a zero worth encoding.
    encoded_bytes: int | None = None
    # Squeeze(layers=...): each named layer's choice {"codes", "keep", "rank"}, by layer name.
    layer_choices: dict[str, dict] | None = None
    notes: list[str] = field(default_factory=list)  # the squeeze passes' own lines (Graph.notes)

    @property
    def encoded_compression(self) -> float | None:
        """fp32 size over the sparse-aware stored size: sparsity and codes together."""
        return self.fp32_bytes / self.encoded_bytes if self.encoded_bytes else None

    @property
    def compression(self) -> float:
        """fp32 size over stored size (codes packed)."""
        return self.fp32_bytes / self.model_bytes if self.model_bytes else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [layer.to_json() for layer in self.layers]
        d["compression"] = self.compression
        return d

    def format_table(self) -> str:
        rows = [f"{'layer':<40} {'op':<8} {'weight':<18} {'output':<18} {'MFLOPs':>9} {'act':>4} {'bits':>4}  kernel"]
        for layer in self.layers:
            rows.append(
                f"{layer.name[:40]:<40} {layer.op:<8} {str(layer.weight_shape):<18} "
                f"{str(layer.output_shape):<18} {layer.flops / 1e6:>9.2f} {layer.act:>4} {layer.bits:>4}  {layer.kernel}"
                + (f"  [{layer.kernel_note}]" if layer.kernel_note else "")
            )
        rows.append(
            f"total: {self.params:,} params, {self.model_bytes / 1e6:.2f} MB"
            + (f" ({self.compression:.1f}x smaller than fp32)" if self.model_bytes != self.fp32_bytes else "")
            + f", {self.flops / 1e9:.3f} GFLOPs"
            + (f", {self.latency_ms:.3f} ms" if self.latency_ms is not None else "")
            + (f", accuracy {self.accuracy:.2%}" if self.accuracy is not None else "")
        )
        if self.accelerator and "total" in self.accelerator:
            rows += accelerator_lines(self.accelerator)
        rows += squeeze_lines(self)
        rows += layer_choice_lines(self)
        rows += self.notes
        return "\n".join(rows)


def squeeze_lines(report: Report) -> list[str]:
    """FLOPs before/after per layer changed by pruning or low-rank, and the sparse storage."""
    rows = []
    if report.flops_before:
        after: dict[str, int] = {}
        for layer in report.layers:  # a low-rank split "fc1.svd0" + "fc1.svd1" counts as "fc1"
            base = layer.name.rsplit(".svd", 1)[0]
            after[base] = after.get(base, 0) + layer.flops
        changed = [(n, b, after.get(n, 0)) for n, b in report.flops_before.items() if after.get(n, 0) != b]
        total_before = sum(report.flops_before.values())
        rows.append(f"pruning/low-rank: {total_before / 1e6:.2f} -> {report.flops / 1e6:.2f} MFLOPs "
                    f"({len(changed)} layer(s) changed)")
        rows += [f"  {name[:40]:<40} {b / 1e6:>9.2f} -> {a / 1e6:>9.2f} MFLOPs" for name, b, a in changed]
    if report.encoded_bytes is not None:
        rows.append(f"sparse storage: {report.encoded_bytes / 1e6:.3f} MB "
                    f"({report.encoded_compression:.1f}x smaller than fp32, sparsity and codes together)")
    return rows


def layer_choice_lines(report: Report) -> list[str]:
    """The per-layer configuration (Squeeze(layers=...)): code set, keep ratio, rank per layer."""
    if not report.layer_choices:
        return []
    rows = [f"per-layer squeeze ({len(report.layer_choices)} layer(s)):",
            f"  {'layer':<32} {'codes':<8} {'keep':>5} {'rank':>5}"]
    for name, c in report.layer_choices.items():
        rows.append(f"  {name[:32]:<32} {c['codes']:<8} {c['keep']:>5.2f} {c['rank'] if c['rank'] is not None else '-':>5}")
    return rows


def accelerator_lines(summary: dict) -> list[str]:
    """The accelerator part of the table: one row per offloaded layer, then the totals beside
    the int8-MAC design of the same array size."""
    rows = [f"accelerator '{summary['config']['name']}' ({summary['config']['rows']}x{summary['config']['cols']} "
            f"{summary['config']['pe']} PEs, {summary['config']['clock_mhz']:g} MHz): "
            f"{summary['offloaded_layers']} layer(s) offloaded, {len(summary['host_layers'])} on the host",
            f"  {'layer':<32} {'cycles':>10} {'util':>6} {'DRAM KB':>9} {'energy uJ':>10}  tiling"]
    for row in summary["layers"]:
        t = row["tiling"]
        rows.append(f"  {row['layer'][:32]:<32} {row['cycles']:>10,} {row['pe_utilisation']:>6.1%} "
                    f"{row['dram_bytes'] / 1e3:>9.1f} {row['energy_pj'] / 1e6:>10.2f}  "
                    f"{t['tile_oh']}x{t['tile_ow']} px, {t['tile_ob']} ob, {t['tile_cb']} cb, {t['order']}")
    total = summary["total"]
    line = (f"  total: {total['cycles']:,} cycles ({total['latency_ms']:.3f} ms), PE utilisation "
            f"{total['pe_utilisation']:.1%}, DRAM {total['dram_bytes'] / 1e6:.2f} MB, energy {total['energy_pj'] / 1e6:.2f} uJ")
    rows.append(line)
    if "mac8_total_energy_pj" in summary:
        rows.append(f"  int8-MAC array of the same size: {summary['mac8_cycles']:,} cycles, DRAM "
                    f"{summary['mac8_dram_bytes'] / 1e6:.2f} MB, energy {summary['mac8_total_energy_pj'] / 1e6:.2f} uJ "
                    f"(shift-add uses {summary['energy_ratio_vs_mac8']:.0%} of it); PE array "
                    f"{total['pe_area_mm2']:.3f} mm2 vs {summary['mac8_pe_area_mm2']:.3f} mm2")
    return rows


def layer_table(graph: Graph, kernels: dict | None = None) -> list[LayerInfo]:
    """Cost every conv/matmul whose weight is a parameter of the graph (quantized or not).
    ``kernels`` (layer var -> ``quant_lowering.KernelChoice``) names the integer kernel each
    quantized layer got; without it, or for a layer it lacks, the float reference is shown."""
    from lastbit.passes.quantize_pow2 import weighted_layers

    weight_of_codes = {info.codes_param: weight for weight, info in graph.quant.items()}
    layers: list[LayerInfo] = []
    for layer in weighted_layers(graph):
        pname = weight_of_codes.get(layer.weight, layer.weight)
        quant = graph.quant.get(pname)
        w = graph.params[layer.weight]
        out_shape = tuple(int(d) for d in layer.relax_var.ty.shape)
        if layer.kind in ("conv2d", "conv1d"):
            groups = int(layer.call.attrs.groups)
            # out elements x (in_channels / groups) x kernel window MACs
            macs = int(np.prod(out_shape)) * int(np.prod(w.shape[1:]))
            kind = "dwconv" if groups > 1 and groups == out_shape[1] else layer.kind
        else:
            # the reduced dimension is the second-to-last of the right-hand operand
            macs = int(np.prod(out_shape)) * int(layer.call.args[1].ty.shape[-2])
            kind = "dense"
        source = quant.source_name if quant else graph.source_names.get(pname, pname)
        choice = (kernels or {}).get(layer.var) if quant else None
        kernel = f"{quant.code_set} (ref)" if quant else "fp32"
        if choice is not None and choice.is_integer:
            kernel = choice.kernel
        layers.append(
            LayerInfo(
                name=source.removesuffix(".weight"),
                op=kind,
                weight_shape=tuple(int(s) for s in w.shape),
                output_shape=out_shape,
                params=int(w.size),
                flops=2 * macs,
                kernel=kernel,
                kernel_note=(choice.reason or "; ".join(choice.passed_over)) if choice is not None else "",
                bits=quant.bits if quant else 8 * w.itemsize,
                weight_bytes=(packed_bytes(w.size, quant.bits) + graph.params[quant.alpha_param].nbytes)
                if quant else int(w.nbytes),
                act=_activation_label(quant, choice),
            )
        )
    return layers


def _activation_label(quant, choice) -> str:
    """What the layer's activations are: k-bit grids always (the reference fake-quantizes to
    them), int8 on an integer kernel, else float."""
    if quant is None:
        return "fp32"
    if quant.act_bits < 8:
        return f"{quant.act_bits}{'u' if quant.act_unsigned else 's'}"
    if (choice is not None and choice.is_integer) or quant.fake_quant_activations:
        return "int8"
    return "fp32"


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` codes of ``bits`` each, packed densely: ceil(count·bits/8)."""
    return math.ceil(count * bits / 8)


def stored_bytes(graph: Graph) -> tuple[int, int, int]:
    """(parameters, bytes as stored, bytes at fp32): codes count ceil(n·bits/8), their α
    float32 (overhead, not parameters), every other parameter its own size."""
    codes_bits = {info.codes_param: info.bits for info in graph.quant.values()}
    alphas = {info.alpha_param for info in graph.quant.values()}
    params, stored = 0, 0
    for name, value in graph.params.items():
        if name in codes_bits:
            params, stored = params + value.size, stored + packed_bytes(value.size, codes_bits[name])
        elif name in alphas:
            stored += value.nbytes
        else:
            params, stored = params + value.size, stored + value.nbytes
    return int(params), int(stored), 4 * int(params)


def build_report(graph: Graph, target: str, kernels: dict | None = None) -> Report:
    layers = layer_table(graph, kernels)
    params, stored, fp32 = stored_bytes(graph)
    return Report(
        model=graph.name,
        target=target,
        params=params,
        model_bytes=stored,
        flops=int(sum(layer.flops for layer in layers)),
        layers=layers,
        fp32_bytes=fp32,
        flops_before=dict(graph.layer_flops_before),
        encoded_bytes=_encoded_bytes(graph),
        notes=list(graph.notes),
    )


def _encoded_bytes(graph: Graph) -> int | None:
    """Stored size with each tensor in its cheapest sparse-aware encoding, when that beats
    the dense packing somewhere (a sparse model); else None."""
    from lastbit.passes.sparsity import storage_table

    table = storage_table(graph)
    if not any(t.encoding.scheme != "dense" for t in table):
        return None
    return int(sum(t.size_bytes for t in table))
