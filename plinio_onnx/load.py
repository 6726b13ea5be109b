"""`load`: read an ONNX model, check it, bring it to the working opset, canonicalize it.

Every failure is one `ModelLoadError` naming the file (and node/op where ONNX says which).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from .errors import ModelLoadError, UnsafeExternalDataError
from .file_weights import NUMPY_TYPES, as_graph_inputs, is_direct, parse_without_weights, read_array
from .graph import Graph, infer_shapes, sub_byte_types

#: Models older than this opset are converted up to it, so handlers see modern op forms.
WORKING_OPSET = 17
#: Newest default-domain opset and IR version the loader reads: what the bundled onnx knows.
MAX_OPSET = onnx.defs.onnx_opset_version()
MAX_IR_VERSION = onnx.IR_VERSION
#: Oldest default-domain opset the loader is tested with (older ones are converted when possible).
MIN_OPSET = 7


def load(model: "str | os.PathLike | onnx.ModelProto | Graph", *, canonicalize: bool = True,
         tied: str = "copy", input_shapes: "Mapping[str, Sequence[int]] | None" = None) -> Graph:
    """Load ``model`` (a path, a ``ModelProto`` or a ``Graph``) into a canonical `Graph`.

    Steps: read (external data only from inside the model's folder), check, convert opsets below
    `WORKING_OPSET`, infer shapes (strict), then canonicalize (constants to initializers, constant
    folding, Identity removal, dead-node cleanup). A ``Graph`` argument is copied, not edited.

    ``tied`` says what becomes of an initializer read by several nodes (directly or through
    ``Identity`` chains, as exporters write tensors that are equal by value): ``"copy"`` (default)
    gives every reader its own copy, so layers train separately as in the source model;
    ``"share"`` keeps one tensor for genuinely tied weights (trained once, exported once;
    BatchNormalization statistics still get their own copies).

    ``input_shapes`` (graph input name → full shape) fixes an input's symbolic dimensions other
    than the batch (axis 0 stays symbolic when it is), e.g. the shapes of the user's data for a
    model exported with symbolic height and width; fixed dimensions must agree.
    """
    from plinio_onnx.passes.tied_initializers import TIE_POLICIES
    if tied not in TIE_POLICIES:
        raise ValueError(f"tied={tied!r}: expected one of {', '.join(map(repr, TIE_POLICIES))}")
    if isinstance(model, Graph):
        return model.copy()
    if isinstance(model, onnx.ModelProto):
        source = model.graph.name or "<ModelProto>"
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        base_dir = None
    else:
        source = str(model)
        proto = _read(Path(model))
        base_dir = Path(model).resolve().parent
    _check_versions(proto, source)
    _load_external_data(proto, base_dir, source)
    if input_shapes:
        _fix_input_shapes(proto, input_shapes, source)
    _check(proto, source)
    if _rewritten(proto):  # ONNX's rewriters read and write the weights in the model
        _load_direct_data(proto, base_dir, source)
    proto = _inline_functions(proto, source)
    proto = _convert_opset(proto, source)
    try:
        graph = gs.import_onnx(proto)
    except Exception as err:  # e.g. raw data shorter than its dims
        raise ModelLoadError(f"cannot read the model ({_one_line(err)})", file=source) from None
    _detach_weights(graph, base_dir, source)
    graph.sub_byte_types = sub_byte_types(proto)
    # (a container of the parsed model would keep all of the model, weights included, alive)
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains or ()]
    try:
        infer_shapes(graph, check=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as err:
        raise _located(err, source, "inconsistent shapes or types") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    result = Graph(graph, source=source, metadata=metadata)
    if canonicalize:
        from plinio_onnx.passes.canonicalize import canonicalize as _canonicalize
        result = _canonicalize(result, tied=tied)
    _detach_weights(result.gs, base_dir, source)  # Constant nodes' values, now initializers
    return result


def _detach_weights(graph: gs.Graph, base_dir: Path | None, source: str) -> None:
    """Detach every initializer from the parsed model, so the model (which lazily read constants
    reference, keeping all of it alive) is freed once loading returns and a loaded graph holds
    its weights once: those the model left in a file (`file_weights`) are read straight from it
    into their arrays, the other values numpy holds are read into arrays from the model; the
    others (INT4, bfloat16, float8: read lazily so they export as they came) keep a copy of
    their own tensor."""
    lazy_type = gs.ir.tensor.LazyValues
    for tensor in _constants(graph):
        if not isinstance(tensor._values, lazy_type):
            continue
        proto = tensor._values.tensor
        if is_direct(proto):
            try:
                tensor.values = read_array(proto, base_dir)
            except (OSError, ValueError) as err:
                raise ModelLoadError(f"cannot read external data ({_one_line(err)})", file=source) from None
            tensor.data_location = None  # (exported inline, as if it had been)
        elif proto.data_type in NUMPY_TYPES:
            try:
                tensor.values = np.asarray(tensor.values)
            except ValueError as err:  # raw data that does not fit the dims
                raise ModelLoadError(f"initializer {tensor.name!r}: {_one_line(err)}", file=source) from None
        else:
            own = onnx.TensorProto()
            own.CopyFrom(proto)
            tensor._values = lazy_type(own)


def _constants(graph: gs.Graph) -> list[gs.Constant]:
    """The constants of ``graph`` and of its nodes' subgraphs (which may read the graph's)."""
    found, graphs = {}, [graph]
    while graphs:
        current = graphs.pop()
        for tensor in current.tensors().values():
            if isinstance(tensor, gs.Constant):
                found[id(tensor)] = tensor
        for node in current.nodes:
            for value in node.attrs.values():
                graphs.extend(v for v in (value if isinstance(value, list) else [value])
                              if isinstance(v, gs.Graph))
    return list(found.values())


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError("no such file", file=str(path))
    if not path.is_file():
        raise ModelLoadError("not a file", file=str(path))
    if not path.stat().st_size:
        raise ModelLoadError("the file is empty, not an ONNX model", file=str(path))
    proto = parse_without_weights(path) or _parse_whole(path)
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise ModelLoadError("not an ONNX model (no IR version or no graph); is the file truncated?",
                             file=str(path))
    return proto


def _parse_whole(path: Path) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"not an ONNX model or truncated ({_one_line(err)})", file=str(path)) from None
    return proto


def _load_external_data(proto: onnx.ModelProto, base_dir: Path | None, source: str) -> None:
    """Check that every tensor's external data lies in the model's folder, and read it into the
    model — but the main graph's initializers numpy holds, read straight into their arrays
    after import (`_detach_weights`)."""
    every = list(external_data_helper._get_all_tensors(proto))
    main = len(proto.graph.initializer)  # (listed first)
    tensors = [t for t in every if external_data_helper.uses_external_data(t)]
    if not tensors:
        return
    if base_dir is None:
        raise ModelLoadError("the ModelProto references external data; load it from its file path",
                             file=source)
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (base_dir / info.location).resolve()
        if os.path.isabs(info.location) or base_dir not in target.parents:
            raise UnsafeExternalDataError(
                f"initializer {tensor.name!r} reads external data from {info.location!r}, "
                "outside the model's folder; refusing to read it", file=source)
        if not target.is_file():
            raise ModelLoadError(f"initializer {tensor.name!r}: external data file "
                                 f"{info.location!r} is missing", file=source)
    _load_into_model([t for i, t in enumerate(every) if external_data_helper.uses_external_data(t)
                      and not (i < main and is_direct(t))], base_dir, source)


def _load_into_model(tensors, base_dir: Path, source: str) -> None:
    """Read ``tensors``' external data into the model (their raw_data)."""
    try:
        for tensor in tensors:
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    except Exception as err:  # corrupt offsets/lengths
        raise ModelLoadError(f"cannot read external data ({_one_line(err)})", file=source) from None


def _load_direct_data(proto: onnx.ModelProto, base_dir: Path | None, source: str) -> None:
    """Read the data `file_weights` left in files into the model itself."""
    _load_into_model([t for t in proto.graph.initializer if is_direct(t)], base_dir, source)


def _rewritten(proto: onnx.ModelProto) -> bool:
    """Whether loading hands the model to ONNX's rewriters (`_inline_functions`,
    `_convert_opset`), which need the weights inside it."""
    from .graph import PLINIO_DOMAIN
    return any(f.domain != PLINIO_DOMAIN for f in proto.functions) or \
        _default_opset(proto) < WORKING_OPSET


#: Above this many bytes of initializers the full checker is skipped (it serializes the whole
#: model); the structure is still checked by shape inference on a skeleton.
FULL_CHECK_BYTES = 64 * 1024**2


def _check(proto: onnx.ModelProto, source: str) -> None:
    if sum(len(t.raw_data) for t in proto.graph.initializer) >= FULL_CHECK_BYTES:
        return
    try:  # initializers still in their files are checked as inputs of their type and shape
        onnx.checker.check_model(as_graph_inputs(proto))
    except onnx.checker.ValidationError as err:
        raise _located(err, source, "the model fails the ONNX checker") from None


def _inline_functions(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Inline model-local functions (the dynamo exporter and onnxscript write modules as
    functions), so handlers see standard ops; ``ai.plinio`` functions stay (searchable graphs)."""
    from .graph import PLINIO_DOMAIN
    foreign = [(f.domain, f.name) for f in proto.functions if f.domain != PLINIO_DOMAIN]
    if not foreign:
        return proto
    import onnx.inliner
    keep = [(f.domain, f.name) for f in proto.functions if f.domain == PLINIO_DOMAIN]
    try:
        inlined = onnx.inliner.inline_selected_functions(proto, keep, exclude=True)
    except Exception as err:
        raise ModelLoadError(f"cannot inline the model's functions ({_one_line(err)})",
                             file=source) from None
    # the domains only the inlined functions used are no longer imported
    used = {n.domain for n in inlined.graph.node} | {f.domain for f in inlined.functions} | {""}
    kept = [entry for entry in inlined.opset_import if entry.domain in used or entry.domain == "ai.onnx"]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined


def _check_versions(proto: onnx.ModelProto, source: str) -> None:
    """Refuse, in one line, a model newer than the bundled onnx reads (before the checker, whose
    message would not say what is supported)."""
    opset = _default_opset(proto)
    if proto.ir_version > MAX_IR_VERSION or opset > MAX_OPSET:
        raise ModelLoadError(
            f"IR version {proto.ir_version}, opset {opset} is newer than this installation reads "
            f"(onnx {onnx.__version__}: IR version <= {MAX_IR_VERSION}, default-domain opset "
            f"{MIN_OPSET}-{MAX_OPSET}); re-export with an older opset, e.g. "
            f"torch.onnx.export(..., opset_version={min(MAX_OPSET, 21)})", file=source)


def _fix_input_shapes(proto: onnx.ModelProto, input_shapes, source: str) -> None:
    inputs = {value.name: value for value in proto.graph.input}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise ModelLoadError(f"input shape given for {name!r}, which is not a graph input "
                                 f"(inputs: {', '.join(inputs)})", file=source)
        dims = inputs[name].type.tensor_type.shape.dim
        shape = [int(d) for d in shape]
        if len(dims) != len(shape) or any(d <= 0 for d in shape):
            raise ModelLoadError(f"input {name!r}: shape {shape} does not fit the model's "
                                 f"{_dims_text(dims)}", file=source)
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ModelLoadError(f"input {name!r}: shape {shape} does not fit the model's "
                                     f"{_dims_text(dims)}", file=source)
            if not dim.HasField("dim_value") and axis > 0:
                dim.dim_value = size  # (clears dim_param)


def _dims_text(dims) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in dims) + "]"


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ModelLoadError("the model imports no default-domain opset", file=proto.graph.name)


def _convert_opset(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    opset = _default_opset(proto)
    if opset >= WORKING_OPSET:
        return proto
    if opset < 11 and any(n.op_type in ("Upsample", "Resize") for n in proto.graph.node):
        # onnx's converter turns them into Resize without the asymmetric/floor modes they mean;
        # the loader's handlers read the original opset instead.
        return proto
    try:
        converted = version_converter.convert_version(proto, WORKING_OPSET)
        onnx.checker.check_model(converted)
        return converted
    except Exception:
        # Handlers are registered per opset range, so the original opset still loads.
        return proto


_NODE_RE = re.compile(r"node name: ([^)]*)\)")
_OP_RE = re.compile(r"op_type:(\w+)")


def _located(err: Exception, source: str, what: str) -> ModelLoadError:
    """Turn an ONNX checker / inference message into an error naming node and op when it can."""
    text = _one_line(err)
    node = _NODE_RE.search(text)
    op = _OP_RE.search(text)
    return ModelLoadError(f"{what}: {text}", file=source,
                          node=node.group(1) if node else None, op=op.group(1) if op else None)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 400 else text[:397] + "..."
