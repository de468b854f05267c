"""lastbit: squeeze a trained model and compile it to fast low-bit code for a target triple.

    import lastbit
    art = lastbit.compile(torch_module, target="aarch64-linux-gnu", example_inputs=(x,))
    art.run(x); art.export("out/"); print(art.report().format_table())
"""

from lastbit.api import Artifact, compile
from lastbit.errors import (
    ArtifactError,
    LastbitError,
    ModelFormatError,
    NodeImportError,
    RunError,
    TargetError,
    UnsupportedOpError,
    UntrustedModelError,
)
from lastbit.graph import Graph, QuantInfo, TensorSpec
from lastbit.passes.datafree import DataFree
from lastbit.passes.pow2_projection import QuantizationError
from lastbit.squeeze import Squeeze

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "DataFree",
    "Graph",
    "LastbitError",
    "ModelFormatError",
    "NodeImportError",
    "QuantInfo",
    "QuantizationError",
    "RunError",
    "Squeeze",
    "TargetError",
    "TensorSpec",
    "UnsupportedOpError",
    "UntrustedModelError",
    "compile",
]
