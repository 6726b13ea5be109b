"""Generate a ``torch.fx.GraphModule`` from a `Graph`: dispatch once, at build time.

Initializers become named tensors of the module: floating-point arrays with more than one element
are trainable ``nn.Parameter``s; integer, boolean and one-element constants (epsilons, exponents,
shape values) are buffers. ``initializer_names`` maps each attribute back to its ONNX name, which
is how `sync` writes trained values into the graph.
"""
from __future__ import annotations

import bisect
import re
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from ..errors import UnsupportedOpError
from ..graph import Graph
from ..load import load
from . import ops  # noqa: F401  (fills the registry)
from .context import NodeContext
from .registry import Unsupported, lookup


class OnnxModule(fx.GraphModule):
    """The torch module of an ONNX graph.

    ``initializer_names`` maps module attribute names to ONNX initializer names.
    Calling it takes the graph inputs in order; returns one tensor or a tuple.

    Small parameters that one node reads together may be packed into one flat parameter (`pack`):
    an optimizer then updates them as one tensor. `initializer` gives any initializer's tensor
    (a view into its packed parameter), `parameter_initializers` every parameter with the ONNX
    names it holds.
    """

    initializer_names: dict[str, str]
    input_names: list[str]
    output_names: list[str]
    packed: dict[str, tuple[str, int, tuple[int, ...]]]  # attribute -> (packed parameter, offset, shape)

    def initializer(self, attr: str) -> torch.Tensor:
        """The tensor of initializer attribute ``attr`` (for a packed one, a view into its packed
        parameter: values, in-place writes and gradients go to the packed parameter)."""
        if attr not in self.packed:
            return getattr(self, attr)
        return self._packed_part(attr, self.get_parameter(self.packed[attr][0]))

    def initializer_grad(self, attr: str) -> torch.Tensor | None:
        """The gradient of initializer attribute ``attr`` (a view into its packed parameter's)."""
        if attr not in self.packed:
            return getattr(self, attr).grad
        grad = self.get_parameter(self.packed[attr][0]).grad
        return None if grad is None else self._packed_part(attr, grad)

    def _packed_part(self, attr: str, flat: torch.Tensor) -> torch.Tensor:
        _, offset, shape = self.packed[attr]
        return flat[offset:offset + int(np.prod(shape, dtype=np.int64))].view(shape)

    def parameter_initializers(self):
        """(attribute path, parameter, ONNX names it holds) for every parameter."""
        holds: dict[str, list[str]] = {}
        for attr, (owner, _, _) in self.packed.items():
            holds.setdefault(owner, []).append(self.initializer_names[attr])
        for path, param in self.named_parameters():
            names = holds.get(path)
            if names is None:
                name = self.initializer_names.get(path)
                names = [name] if name is not None else []
            yield path, param, names

    def pack(self, attrs: list[str], owner: str, name: str = "packed") -> torch.nn.Parameter:
        """Replace the parameters ``attrs`` (same dtype and device; no graph node may read them any
        more) by one flat parameter ``name`` of submodule ``owner`` ("": this module), their
        values concatenated in order; returns it."""
        params = [getattr(self, attr) for attr in attrs]
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]),
                                  requires_grad=all(p.requires_grad for p in params))
        self.get_submodule(owner).register_parameter(name, flat)
        path = f"{owner}.{name}" if owner else name
        offset = 0
        for attr, param in zip(attrs, params):
            delattr(self, attr)
            self.packed[attr] = (path, offset, tuple(param.shape))
            offset += param.numel()
        return flat


def _is_trainable(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.floating) and values.size > 1


class _SharedMemory:
    """Byte ranges of the arrays a module already holds without copying: a second tensor over
    the same memory (initializers tied by value share one array) must get its own copy."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def claim(self, values: np.ndarray) -> bool:
        """Whether ``values`` may be held as it is (writable, C-contiguous and aligned, its
        memory not claimed before); claims it when so."""
        flags = values.flags
        if not (flags.writeable and flags.c_contiguous and flags.aligned) or values.size == 0:
            return False
        low = values.ctypes.data
        high = low + values.nbytes
        at = bisect.bisect_right(self._starts, low)
        if (at > 0 and self._ends[at - 1] > low) or (at < len(self._starts) and self._starts[at] < high):
            return False
        self._starts.insert(at, low)
        self._ends.insert(at, high)
        return True


class _Builder:
    def __init__(self, graph: Graph, share_weights: bool = False) -> None:
        self.graph = graph
        self._shared = _SharedMemory() if share_weights else None
        self.fx = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, fx.Node] = {}
        self._attr_of: dict[str, str] = {}       # ONNX initializer name -> attribute name
        self._used_names: set[str] = set()
        self.initializer_names: dict[str, str] = {}

    # -- names --------------------------------------------------------------------------------
    def _unique(self, raw: str, prefix: str = "") -> str:
        name = re.sub(r"\W", "_", raw) or "t"
        if name[0].isdigit():
            name = "_" + name
        name = prefix + name
        candidate, k = name, 1
        while candidate in self._used_names or hasattr(torch.nn.Module, candidate):
            candidate = f"{name}_{k}"
            k += 1
        self._used_names.add(candidate)
        return candidate

    def attr_name(self, onnx_name: str) -> str:
        return self._attr_of[onnx_name]

    def add_submodule(self, raw: str, module: torch.nn.Module) -> str:
        name = self._unique(raw, prefix="op_")
        self.root.add_module(name, module)
        return name

    # -- values -------------------------------------------------------------------------------
    def value(self, tensor: gs.Tensor, trainable: bool | None = None) -> fx.Node:
        """The fx value of ``tensor``; a constant becomes a parameter or buffer on first use
        (``trainable`` overrides the default rule, e.g. for running statistics)."""
        if tensor.name in self.env:
            return self.env[tensor.name]
        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values)
            if self._shared is None or not self._shared.claim(values):
                values = np.array(values, order="C")  # own copy: the graph keeps its values
            if values.dtype == np.float64 or values.dtype.kind in "fiub":
                data = torch.from_numpy(values)
            else:
                raise Unsupported(f"initializer {tensor.name!r} has unsupported dtype {values.dtype}")
            name = self._unique(tensor.name)
            if _is_trainable(values) if trainable is None else trainable:
                self.root.register_parameter(name, torch.nn.Parameter(data))
            else:
                self.root.register_buffer(name, data)
            self._attr_of[tensor.name] = name
            self.initializer_names[name] = tensor.name
            node = self.fx.get_attr(name)
            self.env[tensor.name] = node
            return node
        raise KeyError(f"tensor {tensor.name!r} is used before it is computed")

    # -- build --------------------------------------------------------------------------------
    def build(self) -> OnnxModule:
        g = self.graph.gs
        g.toposort()
        opset = self.graph.opset
        problems: list[tuple[str, str, str]] = []
        plans = []
        for node in g.nodes:
            handler = lookup(node.domain or "", node.op, opset if not node.domain or node.domain == "ai.onnx"
                             else _domain_version(g, node.domain))
            if handler is None:
                domain = f"{node.domain}::" if node.domain else ""
                problems.append((node.name, domain + node.op, "no handler" + (f" at opset {opset}" if not domain else "")))
            if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                problems.append((node.name, node.op, "ops with subgraphs (If/Loop/Scan) are not supported"))
            plans.append((node, handler))
        if problems:
            raise UnsupportedOpError(problems, file=self.graph.source)

        for tensor in g.inputs:
            self.env[tensor.name] = self.fx.placeholder(self._unique(tensor.name, prefix="in_"))
        for node, handler in plans:
            ctx = NodeContext(self, node, opset)
            try:
                result = handler.build(ctx)
            except Unsupported as why:
                problems.append((node.name, node.op, str(why)))
                result = None
            if result is None and problems:
                result = [self._poison() for _ in node.outputs]
            if not isinstance(result, (list, tuple)):
                result = [result]
            for tensor, value in zip(node.outputs, result):
                if tensor.name and value is not None:
                    self.env[tensor.name] = value
        if problems:
            raise UnsupportedOpError(problems, file=self.graph.source)

        outputs = [self.value(t) for t in g.outputs]
        self.fx.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        module = OnnxModule(self.root, self.fx, class_name="OnnxModule")
        module.initializer_names = self.initializer_names
        module.packed = {}
        module.input_names = [t.name for t in g.inputs]
        module.output_names = [t.name for t in g.outputs]
        return module

    def _poison(self) -> fx.Node:
        return self.fx.call_function(_unsupported_marker, ())


def _unsupported_marker() -> None:  # stands in for outputs of nodes that failed to build
    raise RuntimeError("unsupported node")


def _domain_version(g: gs.Graph, domain: str) -> int:
    """The opset version the graph imports for a custom ``domain`` (1 when it does not say)."""
    return next((int(d.version) for d in (g.import_domains or []) if d.domain == domain), 1)


#: A module pass: rewrites a generated module in place (e.g.
#: `plinio_onnx.to_torch.fuse_pit_masks.fuse_pit_masks`), leaving what it does not recognize alone.
ModulePass = Callable[[OnnxModule], None]


def to_torch(graph: Graph, passes: Sequence[ModulePass] = (), *, share_weights: bool = False) -> OnnxModule:
    """Generate the torch module computing ``graph``; see the module docstring for parameters.
    ``passes`` then rewrite it, in order (none by default: the module has one call per node; a
    searchable model requests the rewrites it trains with).

    ``share_weights``: the module's tensors are the graph's arrays themselves where they can be
    (no copy: what a big model needs), so training writes into the graph's initializers;
    otherwise (default) the module holds copies and the graph keeps its values.

    Raises `UnsupportedOpError` listing every node the loader cannot express, before anything runs.
    """
    if not isinstance(graph, Graph):
        graph = load(graph)
    module = _Builder(graph, share_weights).build()
    for rewrite in passes:
        rewrite(module)
    return module
