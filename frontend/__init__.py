"""Model import (torch.export, ONNX) into a lastbit Graph, plus the model zoo and datasets."""

from lastbit.frontend.onnx_import import from_onnx, load_onnx
from lastbit.frontend.torch_import import from_exported_program, from_torch, load_exported_program

__all__ = ["from_exported_program", "from_onnx", "from_torch", "load_exported_program", "load_onnx"]
