"""plinio-onnx: gradient-based DNN optimization (PIT, MPS, SuperNet) on ONNX graphs."""
from . import passes
from .errors import ModelLoadError, PlinioOnnxError, UnsupportedOpError
from .graph import Graph
from .load import load
from .sync import sync
from .to_torch import to_torch

__all__ = ["Graph", "ModelLoadError", "PlinioOnnxError", "UnsupportedOpError", "load", "passes",
           "sync", "to_torch"]
__version__ = "0.1.0"
