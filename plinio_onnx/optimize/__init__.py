"""`optimize`: warm-up → search → export → fine-tune of an ONNX model on its data.

Modules, in the order a run uses them: `config` (the options, validated once), `methods` (method
names → searchable-model classes), `data` (task and splits), `sources` (the data given: one
.npz, `shards`/`streams` for a folder of shards, `datasets` for torch data), `checkpoint`, `progress`,
`distributed` (device; ranks under torchrun),
`training` (what the phases share), `plain` (warm-up, fine-tune), `control` (the cost-target
controller), `search_phase` (with `latency_loop`: a latency target measured in the runtime; `latency_multiple`: its channel block), `report`, and `flow` (the run itself).
"""
from .config import OptimizeConfig, Recipe, parse_amount
from .flow import baseline, export_searchable, optimize
from .methods import METHODS, Method, get_method
from .report import Report
from .training import adam

__all__ = ["METHODS", "Method", "OptimizeConfig", "Recipe", "Report", "adam", "baseline", "export_searchable",
           "get_method", "optimize", "parse_amount"]
