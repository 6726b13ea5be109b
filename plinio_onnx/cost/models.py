"""Cost models: functions of a `LayerSpec`, summed over the model's layers.

A cost model is any ``Callable[[LayerSpec], number]``; arithmetic only, so the same function
gives an exact integer on a static spec and a differentiable tensor when a search replaces
channel counts or kernel sizes by effective (masked) values. To write your own::

    def my_latency(spec: po.cost.LayerSpec):
        return spec.output_positions * spec.out_channels * 3.5 if spec.kind == "conv" else 0
    model = po.PIT("model.onnx", cost=my_latency)
"""
from __future__ import annotations

from typing import Any

from .spec import LayerSpec


def _weights(spec: LayerSpec) -> Any:
    """Weight elements: C_out·(C_in/groups)·K; depthwise C·K (groups follow the channels)."""
    if spec.depthwise:
        return spec.out_channels * spec.kernel_size
    return spec.out_channels * (spec.in_channels / spec.groups) * spec.kernel_size


def params(spec: LayerSpec) -> Any:
    """Parameters: weights plus biases. Activation×activation MatMuls have none."""
    if spec.kind == "matmul":
        return 0
    return _weights(spec) + (spec.out_channels if spec.bias else 0)


def params_no_bias(spec: LayerSpec) -> Any:
    return 0 if spec.kind == "matmul" else _weights(spec)


def macs(spec: LayerSpec) -> Any:
    """Multiply-accumulates per inference: weights × output positions (bias adds not counted)."""
    if spec.kind == "matmul":
        return spec.in_channels * spec.out_channels * spec.output_positions
    return _weights(spec) * spec.output_positions


def ops(spec: LayerSpec) -> Any:
    """MACs plus one add per output element for the bias (PLiNIO's ``ops``)."""
    extra = spec.out_channels * spec.output_positions if spec.bias else 0
    return macs(spec) + extra


#: Cost models reachable by name (CLI ``--cost``).
BY_NAME = {"params": params, "params_no_bias": params_no_bias, "macs": macs, "ops": ops}
