"""Searchable models, PLiNIO style: a torch module built from an ONNX model by a search pass."""
from .pit import PIT
from .searchable import SearchableModel

__all__ = ["PIT", "SearchableModel"]
from .supernet import SuperNet  # noqa: E402
from .mps import MPS, build_searchable  # noqa: E402
