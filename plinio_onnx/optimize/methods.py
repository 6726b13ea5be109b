"""The method names of `optimize` and the searchable-model class (and options) each one builds.

How a method searches — its learning-rate floor, parameter groups, schedules, cost-target repair,
report — is answered by its model class through `plinio_onnx.methods.search_hooks.SearchHooks`;
this table only names the methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..errors import PlinioOnnxError
from ..graph import Graph
from ..methods import MPS, PIT, ODiMO, ParallelLatency, SearchableModel, SuperNet

__all__ = ["DEFAULT_CHANNEL_MULTIPLE", "METHODS", "METHOD_KEY", "Method", "default_channel_multiple", "get_method",
           "method_of_checkpoint", "tag_method"]

#: The metadata key naming a searchable checkpoint's method (``plinio.*``: finalize drops it).
METHOD_KEY = "plinio.method"

#: Channels a PIT search keeps in multiples of, without a hardware profile. Measured
#: (bench/latency_truth.py, ONNX Runtime 1.19 CPU, ORT_ENABLE_ALL, one thread): random-mask exports
#: of every zoo model keep the input's speed or beat it at 8, while odd counts (1) leave ONNX
#: Runtime's blocked convolution kernels and run up to several times slower than their input.
DEFAULT_CHANNEL_MULTIPLE = 8


def default_channel_multiple(profile=None) -> int:
    """The channel multiple of a search: ``profile``'s (a `plinio_onnx.hardware.HardwareProfile`
    or anything with a positive ``channel_multiple``) or, without one, `DEFAULT_CHANNEL_MULTIPLE`."""
    multiple = getattr(profile, "channel_multiple", None) if profile is not None else None
    return int(multiple) if multiple else DEFAULT_CHANNEL_MULTIPLE


@dataclass(frozen=True)
class Method:
    """A method of `optimize`: its name, its searchable-model class and the options it builds the
    model with. A searchable graph (a checkpoint) is resumed by the same call."""

    name: str
    model_class: type[SearchableModel]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Cost models only this method knows: name → a function making it (ODiMO's "latency").
    costs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, graph: Graph, cost) -> SearchableModel:
        """A fresh searchable model on ``graph``, or the resumed one for a searchable graph."""
        return self.model_class(graph, cost=cost, **self.options)

    @property
    def searches_channels(self) -> bool:
        """Whether the method searches channels with PIT masks (then it takes a ``channel_multiple``)."""
        return self.model_class is PIT or bool(self.options.get("pit"))

    def with_channel_multiple(self, multiple: int) -> "Method":
        """This method with PIT's channels searched in blocks of ``multiple`` (itself when it does
        not search channels). A checkpoint resumes with the blocks it was made with."""
        if not self.searches_channels:
            return self
        return replace(self, options={**self.options, "channel_multiple": int(multiple)})

    @property
    def metadata_keys(self) -> tuple[str, ...]:
        """Every metadata record a searchable graph of this method holds."""
        return self.model_class.search_metadata_keys(**self.options)

    @property
    def default_cost(self) -> str:
        return self.model_class.default_cost

    @property
    def supports_targets(self) -> bool:
        return self.model_class.supports_targets

    @property
    def finetune_export(self) -> bool:
        return self.model_class.finetune_export


#: Search methods by name; `optimize(method=...)` picks one.
METHODS: dict[str, Method] = {
    "pit": Method("pit", PIT, {"discrete_cost": True}),
    "mps": Method("mps", MPS),
    "qat": Method("qat", MPS, {"w_precisions": (8,), "a_precisions": (8,)}),   # uniform int8
    "pit+mps": Method("pit+mps", MPS, {"pit": True}),
    "supernet": Method("supernet", SuperNet),
    "supernet+pit": Method("supernet+pit", SuperNet, {"pit": True}),
    "odimo": Method("odimo", ODiMO, costs={"latency": lambda: ParallelLatency()}),   # DIANA's two units
}


def get_method(name: str) -> Method:
    """The method called ``name`` (any case); a clear error naming the supported ones otherwise."""
    key = str(name).lower()
    if key in METHODS:
        return METHODS[key]
    raise PlinioOnnxError(f"unknown method {name!r}; supported: {', '.join(sorted(METHODS))}")


def tag_method(graph: Graph, method: Method) -> Graph:
    """``graph`` (a searchable graph of ``method``) with the method's name in its metadata."""
    graph.metadata[METHOD_KEY] = method.name
    return graph


def method_of_checkpoint(graph: Graph) -> Method | None:
    """The method named in ``graph``'s metadata (when its records are there); for checkpoints
    written before the name was recorded, the method whose metadata records ``graph`` holds (the
    one with most records first — it cannot tell "qat" from "mps", nor "pit+mps" from "pit")."""
    named = METHODS.get(graph.metadata.get(METHOD_KEY, ""))
    if named is not None and all(key in graph.metadata for key in named.metadata_keys):
        return named
    for method in sorted(METHODS.values(), key=lambda m: -len(m.metadata_keys)):
        if all(key in graph.metadata for key in method.metadata_keys):
            return method
    return None
