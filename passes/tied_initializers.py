"""Initializers read through `Identity` chains or by several nodes: untie or keep as one tensor.

Exporters tie tensors by *value*: torch's legacy exporter replaces every initializer equal to an
earlier one by an ``Identity`` of it (a freshly initialised network's BatchNorm scales and running
variances are all ones, its shifts and running means all zeros), and a node may read one
initializer in two slots (a BN reading the same ones as scale and as variance). Genuinely tied
weights (one ``nn.Parameter`` used by two layers) look exactly the same in the file.

Policies (``tied=`` of `plinio_onnx.load`):

- ``"copy"`` (default): every reading slot gets its own initializer with the same values, so each
  layer trains its own tensor as the source model did; nothing is tied after loading.
- ``"share"``: slots that read one initializer keep reading that one tensor (one parameter,
  trained once, exported once) — except the running statistics of ``BatchNormalization``
  (inputs 3 and 4), which always get their own copy: a statistic is a buffer the layer updates
  itself and must never alias a trainable weight or another layer's statistic.

Guarantees: no ``Identity`` is left between an initializer and the nodes reading it (one that
writes a graph output stays); outputs are unchanged; only floating initializers with more than
one element (what `to_torch` makes trainable or keeps as statistics) are copied.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from plinio_onnx.analysis.initializers import is_weight_like, reading_slots, shared_initializers

__all__ = ["TIE_POLICIES", "resolve_tied_initializers", "shared_initializers"]

#: The values of ``tied=``.
TIE_POLICIES = ("copy", "share")

#: (op type, input index) slots that hold statistics a layer updates itself.
_STATISTIC_SLOTS = {("BatchNormalization", 3), ("BatchNormalization", 4)}


def resolve_tied_initializers(g: gs.Graph, tied: str = "copy") -> int:
    """Bypass ``Identity`` chains that start at an initializer, then untie by ``tied``; returns
    how many new initializers (copies) were made."""
    if tied not in TIE_POLICIES:
        raise ValueError(f"tied={tied!r}: expected one of {', '.join(TIE_POLICIES)}")
    _bypass_initializer_identities(g, tied)
    names = set(g.tensors())
    copies = 0
    for constant, slots in reading_slots(g):
        if len(slots) < 2 or not is_weight_like(constant):
            continue
        if tied == "copy":
            untied = slots[1:]
        else:
            untied = [s for s in slots if (s[0].op, s[1]) in _STATISTIC_SLOTS]
            if len(untied) == len(slots):
                untied = untied[1:]
        for node, index in untied:
            name = _fresh_name(f"{constant.name}_{node.name or node.op}_{index}", names)
            # the array is shared: passes assign new arrays and never write into `values`
            node.inputs[index] = gs.Constant(name, constant.values)
            copies += 1
    return copies


def _bypass_initializer_identities(g: gs.Graph, tied: str) -> None:
    """Remove ``Identity(initializer)`` (through any chain): with ``"copy"`` its output becomes an
    initializer of its own under the exporter's name for it (e.g. ``bn.running_var``); with
    ``"share"`` its readers read the initializer itself."""
    changed = True
    while changed:
        changed = False
        for node in g.nodes:
            if node.op != "Identity" or (node.domain or "") not in ("", "ai.onnx") \
                    or not node.inputs or not node.outputs:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if not isinstance(src, gs.Constant) or any(dst is t for t in g.outputs):
                continue
            node.inputs.clear()
            node.outputs.clear()
            if tied == "copy" or not is_weight_like(src):
                dst.to_constant(src.values)  # the array is shared; see below
            else:
                for consumer in list(dst.outputs):
                    for index, tensor in enumerate(consumer.inputs):
                        if tensor is dst:
                            consumer.inputs[index] = src
            changed = True


def _fresh_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name
