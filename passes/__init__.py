"""Graph passes: each module is one small transformation `Graph -> Graph`.

Installed as ``plinio_onnx.passes``.
"""
from .canonicalize import canonicalize
from .pit import pit
from .prune import prune_channels

__all__ = ["canonicalize", "pit", "prune_channels"]
