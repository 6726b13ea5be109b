"""Searchable models, PLiNIO style: a torch module built from an ONNX model by a search pass.

Every searchable model answers the optimization flow's questions (learning-rate floor, parameter
groups, schedules, cost-target repair, report) through `search_hooks.SearchHooks`;
`plinio_onnx.optimize.methods` names the methods of ``optimize`` after these classes.
"""
from .accelerators import ParallelLatency
from .mps import MPS
from .odimo import ODiMO
from .pit import PIT
from .searchable import SearchableModel
from .supernet import SuperNet

__all__ = ["MPS", "ODiMO", "PIT", "ParallelLatency", "SearchableModel", "SuperNet"]
