"""Op handlers, one module per family; importing this package fills the registry.

The ``ai.plinio`` functions' handlers live beside their ONNX definitions in
`plinio_onnx.functions`.
"""
from . import elementwise, nn, quantize, reduce, tensor  # noqa: F401
from ...functions import mps, pit, supernet  # noqa: F401
