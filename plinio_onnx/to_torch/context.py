"""`NodeContext`: what a handler sees of one node while the torch module is being generated."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from .registry import Unsupported


class NodeContext:
    """Build-time view of one ONNX node.

    ``input(i)`` gives the fx value of input ``i`` (a graph value, parameter or buffer);
    ``static(i)`` gives the numpy value of a constant input (None when it is computed at run
    time), so shape-like inputs become Python values in the generated code.
    """

    def __init__(self, builder: Any, node: gs.Node, opset: int) -> None:
        self._builder = builder
        self.node = node
        self.opset = opset

    # -- attributes ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    def attr(self, name: str, default: Any = None) -> Any:
        value = self.node.attrs.get(name, default)
        if isinstance(value, gs.Constant):
            return value.values
        return value

    def require_attr_in(self, name: str, allowed: tuple, default: Any = None) -> Any:
        value = self.attr(name, default)
        if value not in allowed:
            raise Unsupported(f"attribute {name}={value!r} is not supported")
        return value

    # -- inputs -------------------------------------------------------------------------------
    @property
    def num_inputs(self) -> int:
        return len(self.node.inputs)

    def has_input(self, i: int) -> bool:
        return i < len(self.node.inputs) and bool(self.node.inputs[i].name)

    def tensor(self, i: int) -> gs.Tensor:
        return self.node.inputs[i]

    def input(self, i: int, *, trainable: bool | None = None) -> fx.Node | None:
        """The run-time value of input ``i`` (None when the optional input is absent).

        A constant input becomes a parameter or buffer; ``trainable=False`` forces a buffer
        (statistics, lookup tables), ``True`` a parameter."""
        if not self.has_input(i):
            return None
        return self._builder.value(self.node.inputs[i], trainable)

    def inputs(self) -> list[fx.Node | None]:
        return [self.input(i) for i in range(self.num_inputs)]

    def static(self, i: int) -> np.ndarray | None:
        """The value of input ``i`` if it is a constant, else None."""
        if not self.has_input(i):
            return None
        tensor = self.node.inputs[i]
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    def ints(self, i: int) -> list[int] | fx.Node | None:
        """Input ``i`` as a list of ints: a Python list when constant, else a run-time list."""
        value = self.static(i)
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        if not self.has_input(i):
            return None
        return self.call(_tensor_to_list, self.input(i))

    def scalar(self, i: int, default: Any = None) -> Any:
        """A constant scalar input as a Python number, or the run-time tensor."""
        value = self.static(i)
        if value is not None:
            return value.reshape(-1)[0].item()
        if not self.has_input(i):
            return default
        return self.input(i)

    def operand(self, i: int, other: int) -> Any:
        """Input ``i`` for an elementwise op with input ``other``; a one-element constant of the
        same dtype and no higher rank is inlined as a Python number (no buffer read per step)."""
        value = self.static(i)
        if value is not None and value.size == 1:
            other_tensor = self.node.inputs[other]
            other_rank = len(other_tensor.shape) if other_tensor.shape is not None else -1
            if other_tensor.dtype is not None and _numpy_dtype(other_tensor) == value.dtype \
                    and value.ndim <= other_rank:
                return value.reshape(-1)[0].item()
        return self.input(i)

    def shape(self, i: int) -> list | None:
        """Inferred shape of input ``i``: ints for static dims, str/None for symbolic ones."""
        tensor = self.node.inputs[i]
        return list(tensor.shape) if tensor.shape is not None else None

    def rank(self, i: int) -> int:
        shape = self.shape(i)
        if shape is None:
            raise Unsupported(f"the rank of input {self.node.inputs[i].name!r} is unknown")
        return len(shape)

    def dtype(self, i: int) -> np.dtype | None:
        return _numpy_dtype(self.node.inputs[i])

    def out_dtype(self, j: int = 0) -> np.dtype | None:
        return _numpy_dtype(self.node.outputs[j])

    def out_shape(self, j: int = 0) -> list | None:
        tensor = self.node.outputs[j]
        return list(tensor.shape) if tensor.shape is not None else None

    @property
    def num_outputs(self) -> int:
        return len(self.node.outputs)

    def output_used(self, j: int) -> bool:
        return j < len(self.node.outputs) and bool(self.node.outputs[j].name)

    # -- emitting code ------------------------------------------------------------------------
    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self._builder.fx.call_function(fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._builder.fx.call_method(name, args, kwargs)

    def getitem(self, value: fx.Node, index: Any) -> fx.Node:
        import operator
        return self.call(operator.getitem, value, index)

    def module(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> fx.Node:
        """Call a submodule (for ops whose behaviour depends on train/eval mode or that hold
        state of their own); it is registered under a name derived from the node."""
        target = self._builder.add_submodule(self.node.name or self.node.op, module)
        return self._builder.fx.call_module(target, args, kwargs)

    def parameter_name(self, i: int) -> str | None:
        """Attribute name of the parameter/buffer holding constant input ``i`` (materializing it)."""
        if not self.has_input(i) or not isinstance(self.node.inputs[i], gs.Constant):
            return None
        self.input(i)
        return self._builder.attr_name(self.node.inputs[i].name)


def _numpy_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a tensor; types numpy lacks (bfloat16, float8) are refused clearly."""
    if tensor.dtype is None:
        return None
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        raise Unsupported(f"tensor {tensor.name!r} has a data type torch cannot run here "
                          f"({tensor.dtype})") from None


def _tensor_to_list(t: torch.Tensor) -> list:
    return t.tolist()


def onnx_to_torch_dtype(dtype: Any) -> torch.dtype:
    """numpy/ONNX dtype → torch dtype."""
    import onnx
    if isinstance(dtype, (int, np.integer)):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype
