"""User-defined SuperNet alternatives: ONNX graphs (``onnx.ModelProto`` / ``onnx.GraphProto`` /
paths of ``.onnx`` files) with one input and one output, standard ops only, converted to the
model's opset and checked to map the region's input shape to its output shape."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference, version_converter

from plinio_onnx.errors import PassError

from .supernet_builtins import BUILTIN_KINDS, Candidate, Emitter
from .supernet_regions import Region

__all__ = ["alternative_model", "check_alternative_shape", "graph_candidate"]


def alternative_model(alt, opset: int, where: str) -> tuple[onnx.ModelProto, str]:
    """(a copy of the alternative as a ModelProto at the graph's opset, a branch name); refuses
    files that cannot be read, non-standard ops and anything but one input and one output."""
    if isinstance(alt, onnx.GraphProto):
        model = onnx.helper.make_model(alt, opset_imports=[onnx.helper.make_opsetid("", opset)])
        name = alt.name or "custom"
    elif isinstance(alt, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(alt)
        name = alt.graph.name or "custom"
    else:
        path = Path(alt)
        if not path.is_file():
            raise PassError(f"{where}: alternative {str(alt)!r} is neither a builtin "
                            f"({', '.join(BUILTIN_KINDS)}) nor an ONNX file")
        try:
            model = onnx.load(str(path))
        except Exception as err:
            raise PassError(f"{where}: cannot read alternative ({' '.join(str(err).split())[:200]})",
                            file=str(path)) from None
        name = path.stem
    if model.functions or any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise PassError(f"{where}: alternative {name!r} must use standard ONNX ops only")
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if version != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as err:
            raise PassError(f"{where}: alternative {name!r} (opset {version}) cannot be converted to the "
                            f"model's opset {opset} ({' '.join(str(err).split())[:200]})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise PassError(f"{where}: alternative {name!r} must have one input and one output "
                        f"(it has {len(inputs)} and {len(model.graph.output)})")
    return model, name


def check_alternative_shape(model: onnx.ModelProto, region: Region, name: str, where: str) -> None:
    """Infer the alternative's output shape from the region's input shape; it must be the region's."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializers = {t.name for t in probe.graph.initializer}
    graph_input = next(i for i in probe.graph.input if i.name not in initializers)
    if region.x.shape is not None:
        graph_input.type.tensor_type.ClearField("shape")
        for d in region.x.shape:
            dim = graph_input.type.tensor_type.shape.dim.add()
            if isinstance(d, (int, np.integer)):
                dim.dim_value = int(d)
            elif d:
                dim.dim_param = str(d)
    del probe.graph.value_info[:]
    probe.graph.output[0].type.tensor_type.ClearField("shape")
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=True)
    except Exception as err:
        raise PassError(f"{where}: alternative {name!r} does not accept input {region.x.name!r} "
                        f"{region.x.shape}: {' '.join(str(err).split())[:300]}") from None
    out = inferred.graph.output[0].type.tensor_type
    if not out.HasField("shape"):
        raise PassError(f"{where}: the output shape of alternative {name!r} cannot be inferred")
    got = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in out.shape.dim]
    want = list(region.out.shape) if region.out.shape is not None else None
    if want is not None and (len(got) != len(want) or any(
            isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and int(a) != int(b)
            for a, b in zip(got, want))):
        raise PassError(f"{where}: alternative {name!r} outputs shape {got}, the original "
                        f"{region.out.name!r} has {want}")


def graph_candidate(model: onnx.ModelProto, name: str) -> Candidate:
    """The branch that copies the alternative's nodes (names prefixed) and reads the region's input;
    its initializers become the branch's trainable weights."""
    def emit(e: Emitter) -> gs.Tensor:
        sub = gs.import_onnx(model)
        prefix = e.prefix
        source = sub.inputs[0]
        result = sub.outputs[0]
        for tensor in sub.tensors().values():
            if tensor is not source and tensor.name:   # "" marks an omitted optional input
                tensor.name = f"{prefix}/{tensor.name}"
        for k, node in enumerate(sub.nodes):
            node.name = f"{prefix}/{node.name or node.op + str(k)}"
            node.inputs = [e.region.x if t is source else t for t in node.inputs]
            e.g.nodes.append(node)
            e.nodes.append(node)
        if result is source:   # an identity graph
            return e.region.x
        return result
    return Candidate(name, emit)
