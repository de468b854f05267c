"""Per-layer squeeze settings: for each weighted layer a code set, a keep-ratio for the channel
group it produces, and a low-rank rank, as ``Squeeze(layers=...)`` and ``--layers`` take them.

    Squeeze(layers={"layer1.0.conv1": LayerChoice(codes="ternary", keep=0.75), ...})
    Squeeze(layers="config.json")            # {"layers": {"layer1.0.conv1": {"codes": ...}}}

Layers are named as the report names them: the weight's source name without ``.weight``
("layer1.0.conv1", "fc"). A layer the configuration does not name gets the global setting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lastbit.errors import LastbitError

__all__ = ["FLOAT_CODES", "LayerChoice", "LayerConfig", "LayerConfigError", "check_group_keeps",
           "check_layer_names", "parse_layers"]

FLOAT_CODES = "fp32"  # the code-set name of a layer left in float32
FORMAT = "lastbit-layer-config/1"


class LayerConfigError(LastbitError):
    """A per-layer configuration names an unknown layer, code set, keep ratio or rank; the message says which."""


@dataclass(frozen=True)
class LayerChoice:
    """What one layer gets: ``codes`` (a code set of ``passes/pow2_projection.py`` — "binary",
    "ternary", "pow2-2", "pow2-4", …, "int8" — or "fp32"), ``keep`` (the share of its output
    channel group kept by pruning, in (0, 1]; a group several layers produce — a residual
    chain — is pruned once, so the layers of it that prune must give the same keep) and
    ``rank`` (a low-rank split, None for none)."""

    codes: str = "int8"
    keep: float = 1.0
    rank: int | None = None

    def check(self, layer: str) -> None:
        """Raise LayerConfigError naming ``layer`` and the bad value."""
        from lastbit.passes.pow2_projection import CODE_SETS

        if not isinstance(self.codes, str) or (self.codes != FLOAT_CODES and self.codes not in CODE_SETS):
            raise LayerConfigError(f"layer {layer!r}: unknown code set {self.codes!r}; known: "
                                   f"{', '.join([*CODE_SETS, FLOAT_CODES])}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not math.isfinite(self.keep) \
                or not 0 < self.keep <= 1:
            raise LayerConfigError(f"layer {layer!r}: keep ratio must be in (0, 1], got {self.keep!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise LayerConfigError(f"layer {layer!r}: rank must be an int ≥ 1 or None, got {self.rank!r}")

    @property
    def bits(self) -> int:
        """Storage bits of one weight under this choice (32 for fp32)."""
        from lastbit.passes.pow2_projection import code_set

        return 32 if self.codes == FLOAT_CODES else code_set(self.codes).bits

    def to_dict(self) -> dict:
        return {"codes": self.codes, "keep": self.keep, "rank": self.rank}

    @classmethod
    def from_dict(cls, layer: str, d: Any) -> "LayerChoice":
        if isinstance(d, LayerChoice):
            choice = d
        elif isinstance(d, str):  # "ternary": just a code set
            choice = cls(codes=d)
        elif isinstance(d, Mapping):
            unknown = sorted(set(d) - {"codes", "keep", "rank"})
            if unknown:
                raise LayerConfigError(f"layer {layer!r}: unknown field(s) {', '.join(map(repr, unknown))} "
                                       "(expected codes, keep, rank)")
            choice = cls(codes=d.get("codes", "int8"), keep=d.get("keep", 1.0), rank=d.get("rank"))
        else:
            raise LayerConfigError(f"layer {layer!r}: expected a LayerChoice, a code-set name or a mapping, got {d!r}")
        choice.check(layer)
        return choice


@dataclass(frozen=True)
class LayerConfig:
    """Choices for named layers, in a fixed order; round-trips through JSON."""

    layers: Mapping[str, LayerChoice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = {}
        for name, choice in self.layers.items():
            if not isinstance(name, str) or not name:
                raise LayerConfigError(f"layer names must be non-empty strings, got {name!r}")
            checked[name] = LayerChoice.from_dict(name, choice)
        object.__setattr__(self, "layers", checked)

    def __getitem__(self, name: str) -> LayerChoice:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def get(self, name: str) -> LayerChoice | None:
        """The choice of ``name``; a low-rank half ("conv1.svd0") follows its layer ("conv1")."""
        if name in self.layers:
            return self.layers[name]
        base, dot, last = name.rpartition(".")
        if dot and last in ("svd0", "svd1"):
            return self.layers.get(base)
        return None

    # -- what the squeeze passes need --------------------------------------------------------
    @property
    def prune_ratios(self) -> dict[str, float]:
        """{layer: ratio removed} for the layers that prune (keep < 1)."""
        return {n: 1.0 - c.keep for n, c in self.layers.items() if c.keep < 1.0}

    @property
    def ranks(self) -> dict[str, int]:
        return {n: c.rank for n, c in self.layers.items() if c.rank is not None}

    @property
    def quantizes(self) -> bool:
        return any(c.codes != FLOAT_CODES for c in self.layers.values())

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "layers": {n: c.to_dict() for n, c in self.layers.items()}}

    def to_json(self, path: "str | Path | None" = None) -> str:
        """The configuration as JSON text; with ``path``, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from lastbit.fileio import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: Any, where: str = "layer configuration") -> "LayerConfig":
        if not isinstance(d, Mapping):
            raise LayerConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        layers = d.get("layers", d) if "format" in d or "layers" in d else d
        if "format" in d and d["format"] != FORMAT:
            raise LayerConfigError(f"{where}: unknown format {d['format']!r} (expected {FORMAT!r})")
        if not isinstance(layers, Mapping):
            raise LayerConfigError(f"{where}: 'layers' must be an object of layer -> choice")
        return cls(dict(layers))

    @classmethod
    def from_json(cls, source: "str | Path") -> "LayerConfig":
        """A configuration from a JSON file path or JSON text."""
        text, where = str(source), "layer configuration"
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            path = Path(source)
            if not path.is_file():
                raise LayerConfigError(f"layer configuration file {path} does not exist")
            text, where = path.read_text(), str(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LayerConfigError(f"{where}: not valid JSON ({err})") from None
        return cls.from_dict(data, where)

    def describe(self) -> list[str]:
        """One line per layer, for reports and logs."""
        return [f"{n:<32} {c.codes:<8} keep {c.keep:<5g} rank {c.rank if c.rank is not None else '-'}"
                for n, c in self.layers.items()]


def parse_layers(spec: Any) -> LayerConfig:
    """A LayerConfig from a LayerConfig, a {layer: LayerChoice | dict | code-set name} mapping,
    or a JSON file path."""
    if isinstance(spec, LayerConfig):
        return spec
    if isinstance(spec, Mapping):
        return LayerConfig(dict(spec))
    if isinstance(spec, (str, Path)):
        return LayerConfig.from_json(spec)
    raise LayerConfigError(f"layers must be a mapping of layer -> LayerChoice or a JSON file path, got {spec!r}")


def check_layer_names(config: LayerConfig, graph) -> None:
    """Raise LayerConfigError for a layer the configuration names that ``graph`` does not have."""
    from lastbit.passes.flops import layer_key
    from lastbit.passes.quantize_pow2 import weighted_layers

    known = [layer_key(graph, layer.weight) for layer in weighted_layers(graph)]
    split = {n.rpartition(".")[0] for n in known if n.endswith((".svd0", ".svd1"))}  # low-rank halves
    unknown = [n for n in config.layers if n not in known and n not in split]
    if unknown:
        raise LayerConfigError(f"{graph.name} has no weighted layer {unknown[0]!r}"
                               + (f" (nor {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
                               + f"; its layers: {', '.join(known)}")


def check_group_keeps(config: LayerConfig, graph) -> None:
    """Raise LayerConfigError when the layers producing one channel group (a residual chain:
    the stem and every block's last conv of a ResNet stage) ask for different keep ratios."""
    from lastbit.passes.channel_groups import analyze_channels
    from lastbit.passes.prune_channels import group_ratio_conflict

    ratios = config.prune_ratios
    if not ratios:
        return
    for group in analyze_channels(graph).groups:
        conflict = group_ratio_conflict(graph, group, ratios) if len(group.producers) > 1 else ""
        if conflict:
            raise LayerConfigError(f"{graph.name}: {conflict}")


class CheckLayerConfig:
    """Graph -> Graph (unchanged): the first squeeze pass when a per-layer configuration is
    given, so an unknown layer name or conflicting keeps fail before any pass has run."""

    def __init__(self, config: LayerConfig):
        self.config = config

    def __call__(self, graph):
        check_layer_names(self.config, graph)
        check_group_keeps(self.config, graph)
        return graph
