"""Model import (torch.export, ONNX), the built-in model zoo and datasets."""
