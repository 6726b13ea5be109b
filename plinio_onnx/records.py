"""The typed, versioned records a search pass leaves in ``graph.metadata`` for its method and finalizer.

A searchable graph is a complete checkpoint: besides its ``ai.plinio`` nodes it carries one JSON
record per search pass, under a fixed metadata key. This module is the only place that reads or
writes them; everyone else holds the dataclasses below.

* ``plinio.pit`` — `PITRecord`: passes.pit writes it (passes.mps adds members under PIT + MPS);
  methods.pit / mps / supernet and passes.prune read it.
* ``plinio.mps`` — `MPSRecord`: passes.mps → methods.mps and passes.quantize (its writers and the
  zero-bit slicing).
* ``plinio.supernet`` — `SuperNetRecord`: passes.supernet → methods.supernet and passes.pick.
* ``plinio.odimo`` — `ODiMORecord`: passes.odimo → methods.odimo and passes.odimo_split.
* ``mps.bit_widths`` — `BitWidths`: what the quantized export chose; it stays in the deployable
  file (cost.bits reads it), so it is not a search record and keeps its unversioned shape.

Every ``plinio.*`` record holds its schema ``version``. A record from an older version is upgraded
when read (`PITRecord` and `MPSRecord` version 1 had no ``version`` key; a PIT group's mask
parameter was one name or a list); one from a newer version is refused with a clear error. To
change a record's shape: bump its ``VERSION`` and add the step from the previous version to its
``_upgrade``, so every checkpoint written before still loads. The
nested entries of a channel group are the analysis' own dataclasses
(`plinio_onnx.analysis.channels`), so what the pass analysed is what the finalizer slices.
"""
from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .analysis.channels import (ChannelCut, ChannelGroup, Consumer, GroupedConv, Member, Permutation,
                                Producer, ReshapeWidth)
from .errors import PlinioOnnxError

__all__ = ["ActivationQuantizer", "BitWidths", "Branch", "ChannelCut", "ChoiceRecord", "Consumer", "GroupRecord",
           "AcceleratorRecord", "GroupedConv", "LayerBits", "MPSRecord", "MappedLayer", "Member", "ODiMORecord", "PITRecord", "Permutation", "Producer",
           "QuantizedLayer", "Record", "RecordError", "ReshapeWidth", "SkippedGroup", "SkippedLayer",
           "SkippedPlace", "SuperNetRecord", "TimeMaskRecord", "search_records"]

R = TypeVar("R", bound="Record")


class RecordError(PlinioOnnxError):
    """A metadata record is malformed or comes from a newer plinio-onnx."""


def _dump(value: Any) -> Any:
    """JSON-ready data of a record entry (a dataclass's fields, in order)."""
    return vars(value)


class Record(abc.ABC):
    """A versioned record stored as JSON under ``KEY`` in a graph's metadata."""

    KEY: ClassVar[str]
    VERSION: ClassVar[int]

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The record as JSON, with its schema ``version`` first."""
        return json.dumps({"version": self.VERSION, **vars(self)}, default=_dump)

    @classmethod
    def from_json(cls: type[R], text: str, *, source: str | None = None) -> R:
        """Parse (and upgrade) a record; malformed or newer ones raise `RecordError`."""
        return cls._read(text, source)[0]

    @classmethod
    def _read(cls: type[R], text: str, source: str | None) -> tuple[R, int]:
        """The record and the schema version it was written with."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise RecordError(f"the {cls.KEY} metadata record is not JSON ({err})", file=source) from None
        if not isinstance(data, dict):
            raise RecordError(f"the {cls.KEY} metadata record is not a JSON object", file=source)
        version = data.pop("version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise RecordError(f"the {cls.KEY} record has schema version {version!r}, newer than the "
                              f"{cls.VERSION} this plinio-onnx reads: update plinio-onnx to load this "
                              "searchable graph", file=source)
        try:
            return cls._parse(cls._upgrade(data, version)), version
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"the {cls.KEY} metadata record (version {version}) is malformed: "
                              f"{type(err).__name__} {err}", file=source) from None

    @classmethod
    def _upgrade(cls, data: dict, version: int) -> dict:
        """``data`` of schema ``version`` in the shape of the current one."""
        return data

    @classmethod
    @abc.abstractmethod
    def _parse(cls: type[R], data: dict) -> R:
        """The record of current-schema ``data`` (each record type reads its own fields)."""

    # -- graph metadata -----------------------------------------------------------------------
    @classmethod
    def of(cls: type[R], graph) -> R | None:
        """The record ``graph`` holds (None: the pass did not run on it). A record of an older
        schema is upgraded, in ``graph`` too, so that the graph saves the current version."""
        text = graph.metadata.get(cls.KEY)
        if text is None:
            return None
        record, version = cls._read(text, graph.source)
        if version != cls.VERSION:
            record.store(graph)
        return record

    @classmethod
    def present(cls, graph) -> bool:
        """Whether ``graph`` holds this record (without reading it)."""
        return cls.KEY in graph.metadata

    def store(self, graph) -> None:
        """Write this record into ``graph.metadata`` (replacing the one there)."""
        graph.metadata[self.KEY] = self.to_json()

    @classmethod
    def discard(cls, graph) -> None:
        """Remove this record from ``graph`` (a finalizing pass has consumed it)."""
        graph.metadata.pop(cls.KEY, None)


def _entries(kind: type, items) -> list:
    return [kind(**item) for item in items]


# ==============================================================================================
# PIT
# ==============================================================================================
@dataclass
class GroupRecord(ChannelGroup):
    """A channel group as a pass recorded it: the analysis' group and, when PIT searches it, the
    names of its mask parameters (``alpha``): one for the whole group when ``atoms`` is empty,
    else one per atom, in atom order. MPS records its 0-bit groups with no ``alpha``.
    ``block``: channels per mask entry (PIT's ``channel_multiple``; the entries of a parameter
    over C channels are `plinio_onnx.functions.pit_keep.block_index`'s)."""

    alpha: list[str] = field(default_factory=list)
    block: int = 1

    @classmethod
    def of(cls, group: ChannelGroup, alpha: list[str] | None = None, block: int = 1) -> "GroupRecord":
        return cls(**vars(group), alpha=list(alpha or []), block=int(block))

    @classmethod
    def parse(cls, data: dict) -> "GroupRecord":
        return cls(id=int(data["id"]), size=int(data["size"]),
                   producers=_entries(Producer, data["producers"]),
                   consumers=_entries(Consumer, data["consumers"]),
                   members=_entries(Member, data["members"]), depthwise=list(data["depthwise"]),
                   reshapes=_entries(ReshapeWidth, data["reshapes"]),
                   permutations=_entries(Permutation, data["permutations"]),
                   cuts=_entries(ChannelCut, data["cuts"]), atoms=[list(a) for a in data["atoms"]],
                   unprunable=list(data["unprunable"]), outputs=list(data["outputs"]),
                   alpha=list(data["alpha"]),
                   block=int(data.get("block", 1)))  # (MPS's 0-bit groups: never blocked, not written before)


def _upgrade_group_v1(group: dict) -> dict:
    """Version 1 wrote ``alpha`` as one name or a list, omitted it on MPS groups, and older
    files lacked the later analysis fields."""
    alpha = group.get("alpha", [])
    consumers = [{"groups": 1, "channels": None, **c} for c in group["consumers"]]
    return {"members": [], "depthwise": [], "reshapes": [], "permutations": [], "cuts": [], "atoms": [],
            "unprunable": [], "outputs": [], **group, "consumers": consumers,
            "alpha": [alpha] if isinstance(alpha, str) else list(alpha)}


@dataclass
class TimeMaskRecord:
    """A Conv1d's receptive-field (``beta``) and dilation (``gamma``) mask parameters."""

    node: str
    kernel: int
    beta: str
    gamma: str
    search_time: bool
    search_dilation: bool
    dilation: int
    pads: list[int]


@dataclass
class SkippedGroup:
    group: str
    size: int
    reason: str


@dataclass
class PITRecord(Record):
    """What the PIT pass leaves for `plinio_onnx.methods.pit` and `plinio_onnx.passes.prune`.

    ``layer_inputs``: layer → [(group id, features per channel, group channels read or None)];
    ``layer_output``: producer → group id; ``layer_output_part``: producer of part of a group →
    (group id, its channels); ``layer_rows``: attention MatMul → [(group id, channels or None)];
    ``group_sizes``: every analysed group's size (searched or not)."""

    KEY: ClassVar[str] = "plinio.pit"
    VERSION: ClassVar[int] = 3

    threshold: float
    groups: list[GroupRecord]
    time: list[TimeMaskRecord]
    skipped: list[SkippedGroup]
    layer_inputs: dict[str, list[tuple[int, int, list[int] | None]]]
    layer_output: dict[str, int]
    group_sizes: list[int]
    layer_output_part: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    layer_rows: dict[str, list[tuple[int, list[int] | None]]] = field(default_factory=dict)
    grouped: dict[str, GroupedConv] = field(default_factory=dict)

    def group_alpha(self) -> dict[int, list[str]]:
        """Group id → its mask parameter names, for every searched group."""
        return {group.id: group.alpha for group in self.groups}

    def mask_parameters(self) -> list[str]:
        """Every architecture parameter of PIT: channel masks, then the time / dilation masks."""
        return ([name for group in self.groups for name in group.alpha]
                + [name for entry in self.time for name in (entry.beta, entry.gamma)])

    @classmethod
    def _upgrade(cls, data: dict, version: int) -> dict:
        if version < 2:
            data = dict(data)
            data.pop("group_alpha", None)  # derived from the groups since version 2
            data["groups"] = [_upgrade_group_v1(g) for g in data["groups"]]
            data["layer_inputs"] = {k: [list(e) + [None] * (3 - len(e)) for e in v]
                                    for k, v in data["layer_inputs"].items()}
            data = {"layer_output_part": {}, "layer_rows": {}, "grouped": {}, **data}
        if version < 3:  # version 3: channel blocks (``block``; before, one entry per channel)
            data = {**data, "groups": [{"block": 1, **g} for g in data["groups"]]}
        return data

    @classmethod
    def _parse(cls, data: dict) -> "PITRecord":
        return cls(threshold=float(data["threshold"]),
                   groups=[GroupRecord.parse(g) for g in data["groups"]],
                   time=_entries(TimeMaskRecord, data["time"]), skipped=_entries(SkippedGroup, data["skipped"]),
                   layer_inputs={k: [tuple(e) for e in v] for k, v in data["layer_inputs"].items()},
                   layer_output={k: int(v) for k, v in data["layer_output"].items()},
                   group_sizes=[int(s) for s in data["group_sizes"]],
                   layer_output_part={k: tuple(v) for k, v in data["layer_output_part"].items()},
                   layer_rows={k: [tuple(e) for e in v] for k, v in data["layer_rows"].items()},
                   grouped={k: GroupedConv(**v) for k, v in data["grouped"].items()})


# ==============================================================================================
# MPS
# ==============================================================================================
@dataclass
class QuantizedLayer:
    """A layer whose weight precision is searched (``alpha``: logits [P] or [P, channels])."""

    node: str
    op: str
    weight: str              # the float weight initializer
    weight_quant: str        # its MPSWeightQuant node
    alpha: str
    bits: list[int]          # candidate weight bit-widths (0: the channel is pruned)
    per_channel: bool        # one precision per output channel
    axis: int                # output-channel axis of the weight (-1: none)
    scale_axis: int          # axis of the per-channel scales (-1: per tensor)
    reduce_axes: list[int]
    channels: int
    activation: str          # the tensor whose quantizer feeds the layer
    bias_quant: str | None   # its MPSBiasQuant node, if the bias is quantized
    bias: str | None


@dataclass
class ActivationQuantizer:
    """An activation tensor's quantizer, shared by the ``layers`` reading it."""

    tensor: str
    node: str
    output: str
    scale: str
    alpha: str
    clip: str
    bits: list[int]
    signed: bool
    layers: list[str]


@dataclass
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass
class MPSRecord(Record):
    """What the MPS pass leaves for `plinio_onnx.methods.mps` and the quantized writers.
    ``groups``: with the 0-bit choice, the channel groups a 0-bit layer produces or carries
    (no ``alpha``); ``temperature``: the name of the shared temperature buffer."""

    KEY: ClassVar[str] = "plinio.mps"
    VERSION: ClassVar[int] = 2

    w_precisions: list[int]
    a_precisions: list[int]
    per_channel: bool
    weight_scale: str
    sampling: str
    temperature: str
    layers: list[QuantizedLayer]
    activations: list[ActivationQuantizer]
    skipped: list[SkippedLayer]
    folded_bn: list[str] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)

    def logits(self) -> list[str]:
        """Every architecture parameter of MPS: weight, then activation precision logits."""
        return [layer.alpha for layer in self.layers] + [act.alpha for act in self.activations]

    @classmethod
    def _upgrade(cls, data: dict, version: int) -> dict:
        if version < 2:
            data = {"folded_bn": [], **data, "groups": [_upgrade_group_v1(g) for g in data.get("groups", [])]}
        return data

    @classmethod
    def _parse(cls, data: dict) -> "MPSRecord":
        return cls(w_precisions=list(data["w_precisions"]), a_precisions=list(data["a_precisions"]),
                   per_channel=bool(data["per_channel"]), weight_scale=data["weight_scale"],
                   sampling=data["sampling"], temperature=data["temperature"],
                   layers=_entries(QuantizedLayer, data["layers"]),
                   activations=_entries(ActivationQuantizer, data["activations"]),
                   skipped=_entries(SkippedLayer, data["skipped"]), folded_bn=list(data["folded_bn"]),
                   groups=[GroupRecord.parse(g) for g in data["groups"]])


@dataclass
class LayerBits:
    """A quantized layer's chosen precisions in an exported model. ``weight_bits``: one int for
    a per-layer precision, else the bits of every exported output channel."""

    weight_bits: int | list[int]
    input_bits: int
    input_signed: bool
    pruned_channels: int = 0          # channels that chose 0 bits
    removed_channels: list[int] = field(default_factory=list)  # output channels sliced out
    bias_bits: int | None = None      # 32 for a quantized bias


@dataclass
class BitWidths:
    """The precisions an exported quantized model uses (``mps.bit_widths`` in its metadata, kept
    in the deployable file for the user and `plinio_onnx.cost.bits`; not a search record)."""

    KEY: ClassVar[str] = "mps.bit_widths"

    format: str
    layers: dict[str, LayerBits] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)  # tensor → {bits, signed}

    def to_json(self) -> str:
        layers = {}
        for node, entry in self.layers.items():
            plain = {"weight_bits": entry.weight_bits, "input_bits": entry.input_bits,
                     "input_signed": entry.input_signed}
            if entry.bias_bits is not None:
                plain["bias_bits"] = entry.bias_bits
            plain.update(pruned_channels=entry.pruned_channels, removed_channels=entry.removed_channels)
            layers[node] = plain
        return json.dumps({"format": self.format, "layers": layers, "activations": self.activations})

    @classmethod
    def of(cls, graph) -> "BitWidths | None":
        text = graph.metadata.get(cls.KEY)
        if text is None:
            return None
        try:
            data = json.loads(text)
            return cls(format=data["format"], activations=dict(data["activations"]),
                       layers={node: LayerBits(**entry) for node, entry in data["layers"].items()})
        except (KeyError, TypeError, ValueError) as err:
            raise RecordError(f"the {cls.KEY} metadata record is malformed: {type(err).__name__} {err}",
                              file=graph.source) from None

    def store(self, graph) -> None:
        graph.metadata[self.KEY] = self.to_json()


# ==============================================================================================
# ODiMO
# ==============================================================================================
@dataclass
class AcceleratorRecord:
    """One accelerator as the ODiMO pass saw it (its latency model lives in the method)."""

    name: str
    weight_bits: int
    act_bits: int
    dense_only: bool = False     # runs only dense (groups = 1) layers


@dataclass
class MappedLayer:
    """A layer whose output channels are mapped onto ``accelerators`` (names, in the order of the
    rows of its MPS logits); ``per_channel``: one accelerator per channel (else one per layer)."""

    node: str
    accelerators: list[str]
    per_channel: bool
    channel_axis: int            # the output's channel axis (Conv/Gemm: 1, MatMul: −1)


@dataclass
class ODiMORecord(Record):
    """What the ODiMO pass leaves for `plinio_onnx.methods.odimo` and the export split
    (`plinio_onnx.passes.odimo_split`); the quantizers themselves are in the `MPSRecord`."""

    KEY: ClassVar[str] = "plinio.odimo"
    VERSION: ClassVar[int] = 1

    accelerators: list[AcceleratorRecord]
    layers: list[MappedLayer]

    @classmethod
    def _parse(cls, data: dict) -> "ODiMORecord":
        return cls(accelerators=_entries(AcceleratorRecord, data["accelerators"]),
                   layers=_entries(MappedLayer, data["layers"]))


# ==============================================================================================
# SuperNet
# ==============================================================================================
@dataclass
class Branch:
    name: str
    output: str          # the tensor the branch writes (stacked into the Choice)
    nodes: list[str]     # its nodes


@dataclass
class ChoiceRecord:
    """One searched place: a ``Choice`` node over ``branches`` (branch 0 is the original)."""

    id: int
    name: str
    node: str            # the Choice node
    logits: str
    temperature: str
    input: str
    output: str
    kind: str            # "layer" or "region"
    op: str | None       # the layer's op (a region: None)
    branches: list[Branch]


@dataclass
class SkippedPlace:
    node: str
    reason: str


@dataclass
class SuperNetRecord(Record):
    """What the SuperNet pass leaves for `plinio_onnx.methods.supernet` and `passes.pick`."""

    KEY: ClassVar[str] = "plinio.supernet"
    VERSION: ClassVar[int] = 1

    sampling: str
    temperatures: list[str]
    choices: list[ChoiceRecord]
    skipped: list[SkippedPlace]

    def logits(self) -> list[str]:
        """Every architecture parameter of SuperNet: one logit vector per Choice."""
        return [choice.logits for choice in self.choices]

    @classmethod
    def _parse(cls, data: dict) -> "SuperNetRecord":
        choices = [ChoiceRecord(**dict(c, branches=_entries(Branch, c["branches"]))) for c in data["choices"]]
        return cls(sampling=data["sampling"], temperatures=list(data["temperatures"]), choices=choices,
                   skipped=_entries(SkippedPlace, data["skipped"]))


def search_records(graph) -> list[Record]:
    """Every search record ``graph`` holds (an empty list: it is not a searchable graph)."""
    return [record for kind in (SuperNetRecord, PITRecord, MPSRecord, ODiMORecord) if (record := kind.of(graph)) is not None]

