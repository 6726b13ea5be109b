"""`Graph`: the editing IR (an onnx-graphsurgeon graph) plus where it came from, and saving."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

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

    def copy(self) -> "Graph":
        """A deep copy (weights included) that passes can edit without touching this graph."""
        return Graph(gs.import_onnx(self.to_onnx(check=False)), source=self.source,
                     metadata=self.metadata)

    def __repr__(self) -> str:
        return (f"Graph({self.gs.name!r}, {len(self.gs.nodes)} nodes, opset {self.opset}, "
                f"inputs={[t.name for t in self.gs.inputs]}, outputs={[t.name for t in self.gs.outputs]})")

    # -- serialization ------------------------------------------------------------------------
    def to_onnx(self, *, check: bool = True) -> onnx.ModelProto:
        """Export to a ``ModelProto`` with IR version 10 and, optionally, run the checker."""
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(self.gs, do_type_check=False)
        model.ir_version = IR_VERSION
        if self.metadata:
            del model.metadata_props[:]
            for key, value in self.metadata.items():
                model.metadata_props.add(key=key, value=value)
        if check and model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically (temp file + rename); external data above 2 GB.

        Refuses to overwrite the file the graph was loaded from.
        """
        return save_model(self.to_onnx(), path, source=self.source)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, source: str | None = None) -> Path:
    """Atomically write ``model`` to ``path`` with IR 10, never over ``source``."""
    from .errors import PlinioOnnxError

    path = Path(path)
    if source is not None and Path(source).exists() and path.exists() \
            and os.path.samefile(path, source):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(path))
    model.ir_version = IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if large:
            data_name = path.name + ".data"
            tmp_data = path.parent / (data_name + ".tmp")
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name + ".tmp", size_threshold=1024)
            # The proto names the final data file; rewrite the location before renaming both.
            saved = onnx.load(tmp, load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(saved):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(saved, tmp)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
