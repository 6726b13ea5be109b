"""plinio-onnx: gradient-based DNN optimization (PIT, MPS, SuperNet) on ONNX graphs."""
from . import cost, hardware, passes, regularizers
from .errors import ModelLoadError, PlinioOnnxError, UnsupportedOpError
from .finalize import finalize
from .graph import Graph
from .load import load
from .methods import MPS, PIT, ODiMO, SuperNet, odimo
from .optimize import optimize
from .sync import sync
from .to_torch import to_torch
from .training_artifacts import training_artifacts

__all__ = ["MPS", "ODiMO", "PIT", "SuperNet", "Graph", "ModelLoadError", "PlinioOnnxError", "UnsupportedOpError",
           "cost", "finalize", "hardware", "load", "odimo", "optimize", "passes", "regularizers", "sync",
           "to_torch", "training_artifacts"]
__version__ = "0.1.0"
