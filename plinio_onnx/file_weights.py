"""An ONNX file's large initializers left in their file until each is read straight into its array.

Parsing a whole file holds its bytes and the parsed model at once (twice the weights); reading
the weights out of the parsed model into arrays holds the model and the arrays (twice again);
ONNX's checker serializes and reparses the model (three times). Here the file is scanned at
protobuf's wire level instead (`parse_without_weights`): every large main-graph initializer of
a type numpy holds is parsed without its ``raw_data`` and marked as external data in the model
file itself (location: the file's name, offset and length of its bytes there), so the parsed
model holds no weights; `read_array` then reads each initializer stored so — or stored in an
external data file, as ONNX's own format allows — from its file into a new array. Only the
arrays hold the weights, once.

Protobuf's encoding: a message is a sequence of fields, each a key (varint: field number << 3 |
wire type) then a value: a varint (wire type 0), 8 bytes (1), a length-delimited byte string
(2: length varint, bytes; submessages, strings, packed arrays) or 4 bytes (5). Fields may come
in any order; a repeated field's entries keep theirs. Whatever the scanner does not follow
(groups, bad lengths) makes it give up: the caller then parses the file as a whole.
"""
from __future__ import annotations

import mmap
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .serialize import field_key, varint

__all__ = ["NUMPY_TYPES", "MIN_BYTES", "parse_without_weights", "is_direct", "read_array",
           "as_graph_inputs"]

#: ONNX tensor types numpy holds exactly (INT4, bfloat16, float8 ... stay with ONNX's readers).
NUMPY_TYPES = frozenset(getattr(onnx.TensorProto, name) for name in (
    "FLOAT", "DOUBLE", "FLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64",
    "UINT64", "BOOL"))
#: Initializers whose data is at least this many bytes stay in the file (shape constants and
#: the like are parsed with the model).
MIN_BYTES = 1024

#: Field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class _Unfollowed(Exception):
    """The bytes are not protobuf the scanner follows (the whole-file parser decides)."""


def parse_without_weights(path: Path) -> "onnx.ModelProto | None":
    """The model in ``path`` with its large main-graph initializers left in the file (marked as
    external data in ``path`` itself); None where the file is not protobuf the scanner follows
    or holds no such initializer (parse it whole: its errors are protobuf's)."""
    if sys.byteorder != "little":   # raw_data is little-endian: arrays would need swapping
        return None
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            parts, left = _model_parts(data, path.name)
    except (_Unfollowed, OSError, ValueError):  # (ValueError: a file mmap cannot map, e.g. empty)
        return None
    if not left:
        return None
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(b"".join(parts))
    except Exception:
        return None
    return proto


def _model_parts(data, location: str) -> tuple[list[bytes], int]:
    """The model's bytes, its graphs' large initializers without their data; how many were so."""
    parts, left = [], 0
    for number, wire, start, value, end in _fields(data, 0, len(data)):
        if number == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
            graph, count = _graph_bytes(data, value, end, location)
            parts.append(field_key(_MODEL_GRAPH) + varint(len(graph)) + graph)
            left += count
        else:
            parts.append(data[start:end])
    return parts, left


def _graph_bytes(data, start: int, end: int, location: str) -> tuple[bytes, int]:
    parts, left = [], 0
    for number, wire, field, value, stop in _fields(data, start, end):
        tensor = _tensor_bytes(data, value, stop, location) \
            if number == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED else None
        if tensor is None:
            parts.append(data[field:stop])
        else:
            parts.append(field_key(_GRAPH_INITIALIZER) + varint(len(tensor)) + tensor)
            left += 1
    return b"".join(parts), left


def _tensor_bytes(data, start: int, end: int, location: str) -> "bytes | None":
    """The initializer at ``data[start:end]`` without its raw_data, marked as external data at
    its place in the file; None to keep it as it is (small, not numpy's, or unusual)."""
    raw = [(field, value, stop) for number, wire, field, value, stop in _fields(data, start, end)
           if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED]
    if len(raw) != 1 or raw[0][2] - raw[0][1] < MIN_BYTES:
        return None
    field, value, stop = raw[0]
    header = onnx.TensorProto()
    try:
        header.ParseFromString(data[start:field] + data[stop:end])
    except Exception:
        return None
    if header.data_type not in NUMPY_TYPES or header.data_location == onnx.TensorProto.EXTERNAL \
            or header.HasField("segment") or _other_data(header) \
            or _nbytes(header) != stop - value:
        return None
    header.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", location), ("offset", str(value)), ("length", str(stop - value))):
        header.external_data.add(key=key, value=entry)
    return header.SerializeToString()


def _other_data(tensor: onnx.TensorProto) -> bool:
    return any(len(getattr(tensor, name)) for name in (
        "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"))


def _nbytes(tensor: onnx.TensorProto) -> int:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


def _fields(data, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field of ``data[start:end]``."""
    pos = start
    while pos < end:
        key, value = _read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            stop = _read_varint(data, value, end)[1]
        elif wire == _FIXED64:
            stop = value + 8
        elif wire == _FIXED32:
            stop = value + 4
        elif wire == _LENGTH_DELIMITED:
            length, value = _read_varint(data, value, end)
            stop = value + length
        else:  # groups (deprecated) and invalid wire types
            raise _Unfollowed
        if number == 0 or stop > end:
            raise _Unfollowed
        yield number, wire, pos, value, stop
        pos = stop


def _read_varint(data, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise _Unfollowed


# -- reading ------------------------------------------------------------------------------------
def is_direct(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` (a main-graph initializer) is read by `read_array` from its file: its
    data is external and of a type numpy holds (on a little-endian host: the file's order)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type in NUMPY_TYPES \
        and sys.byteorder == "little"


def read_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """The values of ``tensor`` (`is_direct`; its location already checked to lie inside
    ``base_dir``) read from its file into a new writable array. Raises ``ValueError`` naming the
    tensor when the file holds fewer bytes than its shape needs or its length disagrees."""
    info = onnx.external_data_helper.ExternalDataInfo(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.empty(tuple(int(d) for d in tensor.dims), dtype=dtype)
    if info.length and info.length != array.nbytes:
        raise ValueError(f"initializer {tensor.name!r}: external data length {info.length} is not "
                         f"the {array.nbytes} bytes its shape {list(array.shape)} needs")
    into, read = memoryview(array.reshape(-1)).cast("B"), 0
    with open(base_dir / info.location, "rb") as handle:
        handle.seek(info.offset or 0)
        while read < array.nbytes:
            count = handle.readinto(into[read:])
            if not count:
                break
            read += count
    if read != array.nbytes:
        raise ValueError(f"initializer {tensor.name!r}: its external data holds {read} of the "
                         f"{array.nbytes} bytes its shape {list(array.shape)} needs")
    return array


def as_graph_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose `is_direct` initializers are graph inputs of their type and
    shape (what ONNX's checker can check without reading their files)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    direct = [t for t in graph.initializer if is_direct(t)]
    if not direct:
        return copy
    inputs = {value.name for value in graph.input}
    kept = [t for t in graph.initializer if not is_direct(t)]
    for tensor in direct:
        if tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return copy
