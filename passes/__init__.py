"""Graph passes: each module is one small transformation `Graph -> Graph`.

Installed as ``plinio_onnx.passes``.
"""
from .canonicalize import canonicalize

__all__ = ["canonicalize"]
