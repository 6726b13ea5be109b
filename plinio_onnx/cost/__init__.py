"""Hardware cost models (``po.cost``): per-layer functions summed over a model.

``po.cost.params`` and ``po.cost.macs`` count exactly on a static graph and are
differentiable in the effective channels / kernel sizes that search masks select.
"""
from . import bits
from .bits import bitops, params_bit, size, size_bits
from .memory import MemoryPlan, memory_plan, peak_memory, peak_memory_of
from .model_cost import ModelCost, PeakMemory, WorstRatio
from .models import BY_NAME, macs, ops, params, params_no_bias
from .spec import LayerSpec, layer_specs

BY_NAME.update(bits.BY_NAME)
__all__ = ["BY_NAME", "LayerSpec", "MemoryPlan", "ModelCost", "PeakMemory", "WorstRatio",
           "bitops", "bits", "layer_specs", "macs", "memory_plan", "ops",
           "params", "params_bit", "peak_memory", "peak_memory_of", "params_no_bias", "size", "size_bits", "total"]


def total(graph, cost=params) -> int:
    """Sum of ``cost`` over the layers of ``graph``."""
    return sum(int(cost(spec)) for spec in layer_specs(graph))
