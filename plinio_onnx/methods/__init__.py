"""Searchable models, PLiNIO style: a torch module built from an ONNX model by a search pass.

Each method's CLI hook is module-qualified (``plinio_onnx.methods.mps.build_searchable``,
``plinio_onnx.methods.supernet.build_searchable``).
"""
from .mps import MPS
from .pit import PIT
from .searchable import SearchableModel
from .supernet import SuperNet

__all__ = ["MPS", "PIT", "SearchableModel", "SuperNet"]
