"""The typed metadata records: round trips, old checkpoints upgraded and exported, newer refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import plinio_onnx as po
from plinio_onnx.data import random_inputs
from plinio_onnx.records import (GroupRecord, MPSRecord, PITRecord, RecordError, SuperNetRecord,
                                 search_records)

from _util import MODELS, run_ort, run_torch

CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints_v0"
OLD = {  # fixture → (how to resume it, the records it holds)
    "digits_pit.onnx": (po.PIT, (PITRecord,)),
    "digits_mps.onnx": (po.MPS, (MPSRecord,)),
    "digits_pit_mps.onnx": (po.MPS, (MPSRecord, PITRecord)),
    "digits_supernet.onnx": (po.SuperNet, (SuperNetRecord,)),
    "digits_supernet_pit.onnx": (po.SuperNet, (SuperNetRecord, PITRecord)),
}


def _raw(path: Path) -> dict[str, dict]:
    return {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("name", sorted(OLD))
def test_unversioned_checkpoints_load_upgrade_and_export(name):
    path = CHECKPOINTS / name
    method, kinds = OLD[name]
    raw = _raw(path)
    assert "version" not in raw.get("plinio.pit", {}) and "version" not in raw.get("plinio.mps", {})
    graph = po.load(path)
    assert sorted(type(r).__name__ for r in search_records(graph)) == sorted(k.__name__ for k in kinds)
    if PITRecord in kinds:   # version 1 wrote a group's mask parameter as a name or a list
        record = PITRecord.of(graph)
        old_groups = raw["plinio.pit"]["groups"]
        assert [g.alpha for g in record.groups] == [[g["alpha"]] if isinstance(g["alpha"], str) else g["alpha"]
                                                    for g in old_groups]
        assert record.group_alpha() == {int(k): ([v] if isinstance(v, str) else v)
                                        for k, v in raw["plinio.pit"]["group_alpha"].items()}
    model = method(graph)
    model.eval()
    feeds = random_inputs(graph, batch=4, seed=3)
    expected = run_torch(model, feeds, [t.name for t in graph.gs.inputs])[0]
    exported = model.export()
    assert not any(k.startswith("plinio.") for k in exported.metadata)
    got = run_ort(exported.to_onnx(), feeds)[0]
    # float exports match to rounding; quantized ones within one output quantization step
    tolerance = 1e-4 if MPSRecord not in kinds else 0.51 * float(np.max(np.abs(expected))) / 7
    assert np.max(np.abs(expected - got)) <= tolerance * max(1.0, float(np.max(np.abs(expected))))
    # the checkpoint written now holds the current versions
    again = _raw_of(model.searchable_graph())
    for kind in kinds:
        assert again[kind.KEY]["version"] == kind.VERSION


def _raw_of(graph: po.Graph) -> dict[str, dict]:
    return {key: json.loads(value) for key, value in graph.metadata.items()}


@pytest.mark.parametrize("kind", [PITRecord, MPSRecord, SuperNetRecord])
def test_records_from_a_newer_schema_are_refused(kind):
    graph = po.load(CHECKPOINTS / ("digits_pit_mps.onnx" if kind is not SuperNetRecord else "digits_supernet.onnx"))
    data = json.loads(graph.metadata[kind.KEY])
    data["version"] = kind.VERSION + 1
    graph.metadata[kind.KEY] = json.dumps(data)
    with pytest.raises(RecordError, match=f"{kind.KEY}.*schema version {kind.VERSION + 1}.*update plinio-onnx"):
        kind.of(graph)
    with pytest.raises(po.PlinioOnnxError, match="newer"):
        {PITRecord: po.PIT, MPSRecord: po.MPS, SuperNetRecord: po.SuperNet}[kind](graph)


def test_malformed_records_are_refused_with_the_key():
    graph = po.passes.pit(po.load(MODELS / "digits_cnn.onnx"))
    graph.metadata["plinio.pit"] = "{not json"
    with pytest.raises(RecordError, match="plinio.pit metadata record is not JSON"):
        PITRecord.of(graph)
    data = json.loads(po.passes.pit(po.load(MODELS / "digits_cnn.onnx")).metadata["plinio.pit"])
    del data["groups"]
    graph.metadata["plinio.pit"] = json.dumps(data)
    with pytest.raises(RecordError, match="malformed.*groups"):
        PITRecord.of(graph)


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2_tiny", "tcn", "densenet_tiny"])
def test_records_round_trip_and_have_one_shape(name):
    graph = po.load(MODELS / f"{name}.onnx")
    searchable = po.passes.mps(po.passes.pit(graph, grouped_convs=False), zero_bit=True)
    for record in search_records(searchable):
        assert type(record).from_json(record.to_json()) == record
    pit = PITRecord.of(searchable)
    assert pit.groups and all(isinstance(g, GroupRecord) and isinstance(g.alpha, list) and g.alpha
                              and (len(g.alpha) == len(g.atoms) if g.atoms else len(g.alpha) == 1)
                              for g in pit.groups)
    assert all(len(entry) == 3 for entries in pit.layer_inputs.values() for entry in entries)
    # MPS groups carry no mask parameter: the channels are cut where 0 bits leave them unused
    assert all(g.alpha == [] for g in MPSRecord.of(searchable).groups)


def test_architecture_parameters_are_what_the_records_name():
    model = po.MPS(MODELS / "digits_cnn.onnx", pit=True)
    named = set(MPSRecord.of(model.graph).logits()) | set(PITRecord.of(model.graph).mask_parameters())
    trainable = {n for n in model.module.initializer_names.values() if model.tensor(n).requires_grad}
    assert {n for n in trainable if model._is_nas_parameter(n)} == named & trainable
    assert sum(p.numel() for p in model.nas_parameters()) == sum(model.tensor(n).numel() for n in named & trainable)
    with torch.no_grad():
        assert all(n.endswith((".pit_alpha", ".mps_w_alpha", ".mps_a_alpha", ".pit_beta", ".pit_gamma"))
                   for n in named)
