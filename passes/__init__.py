"""Graph passes: each module is one small transformation `Graph -> Graph`.

Installed as ``plinio_onnx.passes``. Search passes (pit, mps, supernet) insert ``ai.plinio``
functions; finalizing passes (pick, prune, quantize) register with `plinio_onnx.finalize`.
"""
from .canonicalize import canonicalize
from .mps import fold_batchnorm, mps
from .pick import pick_branches
from .pit import pit
from .prune import prune_channels
from .quantize import fold_quantizers
from .supernet import supernet

__all__ = ["canonicalize", "fold_batchnorm", "fold_quantizers", "mps", "pick_branches", "pit",
           "prune_channels", "supernet"]
