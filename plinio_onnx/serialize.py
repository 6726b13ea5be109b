"""Serialize an onnx-graphsurgeon graph with its weights written straight from their arrays.

``gs.export_onnx`` holds every weight several times at once (the exported tensors, the graph
they are copied into, the model, then ``SerializeToString``'s bytes): four to five times the
weights for a model that holds them once. Here the model is exported without its initializers'
data (`structure`), and the file is written field by field (`write_model`): the model's fields
before ``graph``, the graph's fields before ``initializer``, every initializer (its header, then
its array's memory itself), the remaining fields. Protobuf writes a message's fields in field
number order, so the bytes are those ``onnx.save_model`` writes for the same model, while the
extra memory is one tensor's header.
"""
from __future__ import annotations

import sys
from typing import BinaryIO, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import SparseValues

#: Field numbers (onnx.proto) of ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_LENGTH_DELIMITED = 2


def structure(graph: gs.Graph) -> tuple[onnx.ModelProto, list[gs.Constant]]:
    """``graph`` exported without its initializers (the model), and the constants that are its
    initializers, in the order ``gs.export_onnx`` writes them. (A constant that is also a graph
    input or output stays in the model.)"""
    boundary = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)
                 and not isinstance(t._values, SparseValues) and id(t) not in boundary]
    arrays = [(t, t._values) for t in constants if isinstance(t._values, np.ndarray)]
    try:
        for tensor, values in arrays:  # exported as empty tensors, dropped below
            tensor._values = np.empty(0, dtype=values.dtype)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in arrays:
            tensor._values = values
    names = {t.name for t in constants}
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model, constants


def tensor_proto(constant: gs.Constant) -> onnx.TensorProto:
    """The initializer ``constant`` exports as (what ``gs.export_onnx`` writes)."""
    return OnnxExporter.export_tensor_proto(constant)


class _Initializer:
    """One initializer to write: its serialized header and, when its data comes straight from an
    array, that array (raw_data); else its whole serialization."""

    def __init__(self, constant: gs.Constant) -> None:
        self.array = _raw_array(constant)
        if self.array is None:
            self.head, self.size = tensor_proto(constant).SerializeToString(), 0
        else:
            meta = _header(constant, self.array)
            self.head = meta.SerializeToString()
            self.size = self.array.nbytes
        self.length = len(self.head) + (_field_size(_TENSOR_RAW_DATA, self.size) if self.array is not None else 0)

    def write(self, handle: BinaryIO) -> None:
        handle.write(field_key(_GRAPH_INITIALIZER) + varint(self.length) + self.head)
        if self.array is not None:
            handle.write(field_key(_TENSOR_RAW_DATA) + varint(self.size))
            handle.write(memoryview(self.array.reshape(-1)).cast("B"))


def _raw_array(constant: gs.Constant) -> np.ndarray | None:
    """The array whose memory is the initializer's raw_data as it is, or None (lazily read or
    converted data, big-endian hosts, strings)."""
    values = constant._values
    if not isinstance(values, np.ndarray) or sys.byteorder != "little" or values.dtype.kind not in "fiub" \
            or not values.flags.c_contiguous or values.size == 0:
        return None
    return values


def _header(constant: gs.Constant, array: np.ndarray) -> onnx.TensorProto:
    """The initializer's fields but its data: exported from an empty array of its dtype (so the
    exporter decides the type), with its real dims."""
    empty = gs.Constant(constant.name, np.empty(0, dtype=array.dtype), export_dtype=constant._export_dtype)
    empty.data_location = constant.data_location
    meta = tensor_proto(empty)
    meta.ClearField("raw_data")
    del meta.dims[:]
    meta.dims.extend(int(d) for d in array.shape)
    return meta


def _fields(message, keep) -> bytes:
    """``message`` serialized with only the fields whose number ``keep`` accepts."""
    part = type(message)()
    part.CopyFrom(message)
    for field, _ in message.ListFields():
        if not keep(field.number):
            part.ClearField(field.name)
    return part.SerializeToString()


def write_model(model: onnx.ModelProto, constants: Iterable[gs.Constant], handle: BinaryIO) -> None:
    """Write ``model`` (from `structure`) with ``constants`` appended to its initializers."""
    graph = model.graph
    entries = [_Initializer(c) for c in constants]
    graph_head = _fields(graph, lambda n: n <= _GRAPH_INITIALIZER)
    graph_tail = _fields(graph, lambda n: n > _GRAPH_INITIALIZER)
    graph_length = len(graph_head) + len(graph_tail) + sum(
        len(field_key(_GRAPH_INITIALIZER)) + len(varint(e.length)) + e.length for e in entries)
    handle.write(_fields(model, lambda n: n < _MODEL_GRAPH))
    handle.write(field_key(_MODEL_GRAPH) + varint(graph_length) + graph_head)
    for entry in entries:
        entry.write(handle)
    handle.write(graph_tail)
    handle.write(_fields(model, lambda n: n > _MODEL_GRAPH))


def _field_size(number: int, length: int) -> int:
    return len(field_key(number)) + len(varint(length)) + length


def field_key(number: int) -> bytes:
    """The protobuf key of a length-delimited field ``number``."""
    return varint(number << 3 | _LENGTH_DELIMITED)


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
