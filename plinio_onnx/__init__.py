"""plinio-onnx: gradient-based DNN optimization (PIT, MPS, SuperNet) on ONNX graphs."""
from . import cost, passes
from .errors import ModelLoadError, PlinioOnnxError, UnsupportedOpError
from .graph import Graph
from .finalize import finalize
from .load import load
from .methods import PIT
from .sync import sync
from .to_torch import to_torch

__all__ = ["PIT", "Graph", "ModelLoadError", "PlinioOnnxError", "UnsupportedOpError", "cost",
           "finalize", "load", "passes", "sync", "to_torch"]
__version__ = "0.1.0"
from .methods import SuperNet  # noqa: E402
from .methods import MPS; __all__ += ["MPS"]  # noqa: E402,E702
