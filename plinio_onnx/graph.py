"""`Graph`: the editing IR (an onnx-graphsurgeon graph) plus where it came from, and saving."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .atomic import atomic_path
from .serialize import structure, tensor_proto, write_model

#: IR version written on every save: ONNX Runtime 1.19 reads IR <= 10.
IR_VERSION = 10
#: Models whose serialized size exceeds this are saved with external data (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
PLINIO_DOMAIN = "ai.plinio"


class Graph:
    """A model being optimized: an onnx-graphsurgeon ``gs.Graph`` (``.gs``) and its origin.

    Passes edit ``.gs`` (plain attribute changes, then ``cleanup``/``toposort``). ``source`` is the
    file the model came from, used to name it in errors.
    """

    def __init__(self, graph: gs.Graph, *, source: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.gs = graph
        self.source = source
        self.metadata = dict(metadata or {})

    # -- views --------------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.gs.nodes

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.gs.tensors()

    def initializers(self) -> dict[str, gs.Constant]:
        return {name: t for name, t in self.gs.tensors().items() if isinstance(t, gs.Constant)}

    def copy(self, *, weights: bool = False) -> "Graph":
        """A copy that passes can edit without touching this graph: new nodes, tensors and
        attribute dicts; weight arrays are shared, so passes assign new arrays, never write
        into ``tensor.values`` in place. ``weights``: copy the arrays too (a graph whose
        weights may then be trained in place, e.g. by ``to_torch(share_weights=True)``)."""
        copied = self.gs.copy()
        if weights:
            for tensor in copied.tensors().values():
                if isinstance(tensor, gs.Constant) and isinstance(tensor._values, np.ndarray):
                    tensor.values = tensor.values.copy()
        # (read through __dict__: onnx-graphsurgeon resolves unknown attributes as graph helpers)
        copied.sub_byte_types = dict(self.gs.__dict__.get("sub_byte_types", {}))
        return Graph(copied, source=self.source, metadata=self.metadata)

    def __repr__(self) -> str:
        return (f"Graph({self.gs.name!r}, {len(self.gs.nodes)} nodes, opset {self.opset}, "
                f"inputs={[t.name for t in self.gs.inputs]}, outputs={[t.name for t in self.gs.outputs]})")

    # -- serialization ------------------------------------------------------------------------
    def to_onnx(self, *, check: bool = True) -> onnx.ModelProto:
        """Export to a ``ModelProto`` with IR version 10 and, optionally, run the checker (on the
        graph without its weight data: `check_graph`)."""
        model, constants = self._structure()
        for constant in constants:  # one at a time: the weights are copied once
            model.graph.initializer.append(tensor_proto(constant))
        if check:
            check_graph(self.gs)
        return model

    def _structure(self) -> "tuple[onnx.ModelProto, list[gs.Constant]]":
        """The model without its initializers, and the constants that are (`serialize.structure`)."""
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        model, constants = structure(self.gs)
        model.ir_version = IR_VERSION
        if self.metadata:
            del model.metadata_props[:]
            for key, value in self.metadata.items():
                model.metadata_props.add(key=key, value=value)
        return model, constants

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically (temp file + rename), checked (`check_graph`); external data
        above 2 GB. The weights are written from their arrays (`serialize.write_model`): saving
        holds no second copy of them.

        Refuses to overwrite the file the graph was loaded from.
        """
        model, constants = self._structure()
        if sum(np.asarray(c._values).nbytes if isinstance(c._values, np.ndarray) else c._values.nbytes
               for c in constants) >= EXTERNAL_DATA_THRESHOLD:
            return save_model(self.to_onnx(), path, source=self.source)
        check_graph(self.gs)
        path = _writable(path, self.source)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            write_model(model, constants, handle)
        return path


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data: a cheap stand-in for ``ByteSize()`` (which walks everything)."""
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data)
               for t in model.graph.initializer)


def sub_byte_types(model: onnx.ModelProto) -> dict[str, int]:
    """Names of the int4/uint4 tensors of ``model`` → their ONNX type (onnx-graphsurgeon holds
    them as int8/uint8, so the loader needs to know which are 4-bit)."""
    narrow = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    g = model.graph
    found = {info.name: info.type.tensor_type.elem_type
             for info in list(g.value_info) + list(g.input) + list(g.output)
             if info.type.tensor_type.elem_type in narrow}
    found.update({t.name: t.data_type for t in g.initializer if t.data_type in narrow})
    return found


def _is_float_dtype(dtype) -> bool:
    try:
        return np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:  # ONNX types numpy lacks (bfloat16, float8)
        return False


def _is_quantized_array(values) -> bool:
    """int8/uint8 weights held as an array (never shape-like; INT4 ones are held packed)."""
    return isinstance(values, np.ndarray) and values.dtype in (np.int8, np.uint8)


def _skeleton(graph: gs.Graph) -> onnx.ModelProto:
    """``graph`` exported without its weight data, so checks cost what the graph's size costs.

    Large floating (and int8/uint8) initializers are exported as graph inputs of the same type and
    shape: shape inference reads only their shapes (shape-like constants, which it reads by value, stay)."""
    big: list[tuple[gs.Node, int, gs.Constant]] = []
    stand_ins: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            # shape/dtype, not values: reading values would unpack lazily held (e.g. int4) data
            if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > 16 and \
                    (_is_float_dtype(tensor.dtype) or _is_quantized_array(tensor._values)):
                stand_in = stand_ins.setdefault(tensor.name, gs.Variable(
                    tensor.name, dtype=tensor.dtype, shape=list(tensor.shape)))
                big.append((node, i, tensor))
                node.inputs[i] = stand_in
    saved_inputs = list(graph.inputs)
    graph.inputs = saved_inputs + list(stand_ins.values())
    try:
        skeleton = gs.export_onnx(graph, do_type_check=False)
    finally:
        graph.inputs = saved_inputs
        for node, i, tensor in big:
            node.inputs[i] = tensor
    skeleton.ir_version = IR_VERSION
    return skeleton


def check_graph(graph: gs.Graph) -> None:
    """Run the ONNX checker on ``graph`` (its skeleton: no weight data); raises its error."""
    onnx.checker.check_model(_skeleton(graph))


def infer_shapes(graph: gs.Graph, *, check: bool = True, keep_known: bool = False) -> None:
    """Infer every intermediate shape and dtype of ``graph`` in place (strict), optionally running
    the checker — on a skeleton without weight data, so the cost does not grow with model size.
    ``keep_known``: start from the shapes the tensors hold (inference fills in the others and
    keeps their symbolic dimensions), instead of from nothing."""
    skeleton = _skeleton(graph)
    if not keep_known:
        del skeleton.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True,
                                                 data_prop=True)
    if check:
        onnx.checker.check_model(inferred)
    tensors = graph.tensors()
    # onnx-graphsurgeon holds int4/uint4 tensors as int8/uint8: remember which are 4-bit.
    graph.sub_byte_types = {**graph.__dict__.get("sub_byte_types", {}), **sub_byte_types(inferred)}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor = tensors.get(info.name)
        if isinstance(tensor, gs.Variable) and info.type.HasField("tensor_type"):
            ttype = info.type.tensor_type
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type) \
                if ttype.elem_type not in (0, onnx.TensorProto.BFLOAT16) and \
                ttype.elem_type < onnx.TensorProto.FLOAT8E4M3FN else tensor.dtype
            if ttype.HasField("shape"):
                tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in ttype.shape.dim]


def reinfer_shapes(graph: Graph, *, what: str, check: bool = True, forget: bool = True) -> None:
    """The one way passes re-infer shapes, strictly, in place (`infer_shapes`). ``forget``: drop
    every intermediate shape first (graph inputs and outputs keep theirs) — after edits that
    change shapes; False: keep the known ones and infer those of new tensors — after edits that
    only add tensors. A graph that does not infer raises `PassError` "``what``: <why>"."""
    from .errors import PassError

    g = graph.gs
    boundary = set(map(id, g.inputs)) | set(map(id, g.outputs))
    for tensor in g.tensors().values() if forget else ():
        if isinstance(tensor, gs.Variable) and id(tensor) not in boundary:
            tensor.shape = None
    try:
        infer_shapes(g, check=check, keep_known=not forget)
    except Exception as err:
        raise PassError(f"{what}: {' '.join(str(err).split())[:400]}", file=graph.source) from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | None = None) -> Path:
    """Atomically write ``model`` to ``path`` with IR 10, never over ``source``."""
    path = _writable(path, source)
    model.ir_version = IR_VERSION
    large = _weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    with atomic_path(path) as tmp:
        if large:
            data_name = path.name + ".data"
            with atomic_path(path.parent / data_name) as tmp_data:
                onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=1024)
                # The proto names the final data file; rewrite the location before renaming both.
                saved = onnx.load(tmp, load_external_data=False)
                for tensor in onnx.external_data_helper._get_all_tensors(saved):
                    for entry in tensor.external_data:
                        if entry.key == "location":
                            entry.value = data_name
                onnx.save_model(saved, tmp)
        else:
            onnx.save_model(model, tmp)
    return path


def _writable(path: str | os.PathLike, source: str | None) -> Path:
    """``path``, unless it is the file ``source`` (the input model), which is never overwritten."""
    from .errors import PlinioOnnxError

    path = Path(path)
    if source is not None and Path(source).exists() and path.exists() \
            and os.path.samefile(path, source):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(path))
    return path


def _quiet_graphsurgeon() -> None:
    """onnx-graphsurgeon logs warnings (and a hint about colors) on stdout; keep errors only.

    It also tries ``import ml_dtypes`` for every tensor it exports; without that package each
    failed import searches sys.path again (half a second on a 600-node graph). Recording the
    module as absent makes the attempt fail at once."""
    logger = gs.logger.G_LOGGER
    logger.severity = logger.ERROR
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        import sys
        sys.modules.setdefault("ml_dtypes", None)


_quiet_graphsurgeon()
