"""Searchable models, PLiNIO style: a torch module built from an ONNX model by a search pass."""
from .pit import PIT
from .searchable import SearchableModel

__all__ = ["PIT", "SearchableModel"]
