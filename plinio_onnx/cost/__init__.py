"""Hardware cost models (``po.cost``): per-layer functions summed over a model.

``po.cost.params`` and ``po.cost.macs`` count exactly on a static graph and are
differentiable in the effective channels / kernel sizes that search masks select.
"""
from .models import BY_NAME, macs, ops, params, params_no_bias
from .spec import LayerSpec, layer_specs

__all__ = ["BY_NAME", "LayerSpec", "layer_specs", "macs", "ops", "params", "params_no_bias", "total"]


def total(graph, cost=params) -> int:
    """Sum of ``cost`` over the layers of ``graph``."""
    return sum(int(cost(spec)) for spec in layer_specs(graph))
from . import bits  # noqa: E402
from .bits import bitops, params_bit, size, size_bits  # noqa: E402
BY_NAME.update(bits.BY_NAME); __all__ += ["bits", "bitops", "params_bit", "size", "size_bits"]  # noqa: E702
