"""ONNX's own backend node tests, run through ``load`` → ``to_torch`` → the generated module.

A test is collected when every node of its model (main graph) is in the default domain and has a
registered handler, and all graph inputs/outputs are plain tensors (sequence/optional tests are
left out at collection). Each must either match the expected outputs, or be listed in
`KNOWN_UNSUPPORTED` and be refused with `UnsupportedOpError`/`ModelLoadError` — never a wrong number.

Coverage per op: ``python tests/test_backend_nodes.py --coverage``.
"""
from __future__ import annotations

import sys
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import plinio_onnx
import plinio_onnx.to_torch.ops  # noqa: F401  (fills the registry before collection)
from plinio_onnx.to_torch import supported_ops

NODE_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"

_F8 = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")


def _names(template: str, *fills: str) -> list[str]:
    return [template.format(f) for f in fills]


#: Collected tests that must be refused (UnsupportedOpError or ModelLoadError): test -> reason.
KNOWN_UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(["test_equal_string", "test_equal_string_broadcast",
                     "test_cast_FLOAT_to_STRING", "test_cast_STRING_to_FLOAT",
                     "test_castlike_FLOAT_to_STRING", "test_castlike_STRING_to_FLOAT",
                     "test_castlike_FLOAT_to_STRING_expanded",
                     "test_castlike_STRING_to_FLOAT_expanded"], "string tensors"),
    **dict.fromkeys(["test_cast_FLOAT16_to_INT4", "test_cast_FLOAT16_to_UINT4",
                     "test_cast_FLOAT_to_INT4", "test_cast_FLOAT_to_UINT4"],
                    "int4/uint4 have no torch dtype"),
    **dict.fromkeys(
        _names("test_cast_{}", *[f"{a}_to_{b}" for a in ("FLOAT", "FLOAT16") for b in _F8])
        + _names("test_cast_no_saturate_{}", *[f"{a}_to_{b}" for a in ("FLOAT", "FLOAT16")
                                               for b in _F8])
        + _names("test_cast_{}", *[f"{a}_to_{b}" for a in _F8 for b in ("FLOAT", "FLOAT16")])
        + _names("test_castlike_{}", *[f"FLOAT_to_{b}" for b in _F8],
                 *[f"{a}_to_FLOAT" for a in _F8])
        + _names("test_castlike_{}_expanded", *[f"FLOAT_to_{b}" for b in _F8],
                 *[f"{a}_to_FLOAT" for a in _F8]),
        "float8 types: torch cannot compute in them"),
    **dict.fromkeys(_names("test_{}_uint64", "bitshift_left", "bitshift_right", "max", "min", "mod"),
                    "uint64 arithmetic: torch has no CPU kernels for it"),
    # nn.py handlers (owned elsewhere): training-mode or extra outputs, unimplemented variants
    **dict.fromkeys(["test_batchnorm_epsilon_training_mode", "test_batchnorm_example_training_mode"],
                    "BatchNormalization training-mode outputs (running mean/var)"),
    **dict.fromkeys(_names("test_training_dropout{}", "", "_default", "_default_mask", "_mask",
                           "_zero_ratio", "_zero_ratio_mask"),
                    "Dropout in training mode (random) with a run-time ratio"),
    **dict.fromkeys(["test_dropout_default_ratio", "test_dropout_default_mask_ratio"],
                    "Dropout with a run-time ratio input"),
    **dict.fromkeys(_names("test_layer_normalization_{}", "2d_axis0", "2d_axis1",
                           "2d_axis_negative_1", "2d_axis_negative_2", "3d_axis0_epsilon",
                           "3d_axis1_epsilon", "3d_axis2_epsilon", "3d_axis_negative_1_epsilon",
                           "3d_axis_negative_2_epsilon", "3d_axis_negative_3_epsilon", "4d_axis0",
                           "4d_axis1", "4d_axis2", "4d_axis3", "4d_axis_negative_1",
                           "4d_axis_negative_2", "4d_axis_negative_3", "4d_axis_negative_4",
                           "default_axis"),
                    "LayerNormalization Mean/InvStdDev outputs"),
    **dict.fromkeys(["test_dequantizelinear_blocked", "test_quantizelinear_blocked_asymmetric",
                     "test_quantizelinear_blocked_symmetric"], "blocked quantization (opset 21)"),
    **dict.fromkeys(["test_dequantizelinear_e4m3fn", "test_dequantizelinear_e4m3fn_float16",
                     "test_dequantizelinear_e4m3fn_zero_point", "test_dequantizelinear_e5m2",
                     "test_quantizelinear_e4m3fn", "test_quantizelinear_e5m2"], "float8 quantization"),
    **dict.fromkeys(["test_maxpool_with_argmax_2d_precomputed_pads",
                     "test_maxpool_with_argmax_2d_precomputed_strides"], "MaxPool Indices output"),
    **dict.fromkeys(["test_averagepool_2d_dilations", "test_averagepool_3d_dilations_small",
                     *_names("test_averagepool_3d_dilations_large_count_include_pad_is_{}",
                             "0_ceil_mode_is_False", "0_ceil_mode_is_True",
                             "1_ceil_mode_is_False", "1_ceil_mode_is_True")],
                    "dilated AveragePool"),
    "test_lppool_2d_dilations": "dilated LpPool",
}


# -- collection -------------------------------------------------------------------------------
def _is_tensor(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type")


@lru_cache(maxsize=None)
def collect() -> dict[str, frozenset[str]]:
    """Collected test name → the op types of its model."""
    # Constant nodes never reach the loader: `load` turns them into initializers.
    supported = set(supported_ops()) | {"Constant"}
    found: dict[str, frozenset[str]] = {}
    for case in sorted(NODE_DIR.iterdir()):
        path = case / "model.onnx"
        if not path.is_file() or not (case / "test_data_set_0").is_dir():
            continue
        graph = onnx.load(str(path), load_external_data=False).graph
        if not all(_is_tensor(v) for v in list(graph.input) + list(graph.output)):
            continue
        if any(n.domain not in ("", "ai.onnx") or n.op_type not in supported for n in graph.node):
            continue
        found[case.name] = frozenset(n.op_type for n in graph.node)
    return found


def collected_by_op() -> dict[str, list[str]]:
    """Op type → the collected tests whose model uses it."""
    by_op: dict[str, list[str]] = defaultdict(list)
    for name, ops in collect().items():
        for op in ops:
            by_op[op].append(name)
    return dict(sorted(by_op.items()))


# -- running ----------------------------------------------------------------------------------
def _read(path: Path) -> np.ndarray:
    array = numpy_helper.to_array(onnx.load_tensor(str(path)))
    if array.dtype.fields:  # int4/uint4/float8 come as a structured view of their storage byte
        array = array.view(array.dtype.base)
    return array


def _to_torch(array: np.ndarray, elem_type: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))  # a writable copy
    if elem_type == TensorProto.BFLOAT16:  # stored as its uint16 bit pattern
        tensor = tensor.view(torch.bfloat16)
    return tensor


def _bfloat16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _compare(name: str, got: torch.Tensor, expected: np.ndarray, elem_type: int) -> None:
    rtol = 1e-4
    if elem_type == TensorProto.BFLOAT16:
        # ONNX leaves float->bfloat16 rounding open: its test data truncates, torch rounds to
        # nearest even; allow that one bfloat16 step (2**-7 relative) on values compared as floats.
        assert got.dtype == torch.bfloat16, f"{name}: dtype {got.dtype} != expected bfloat16"
        got, expected, rtol = got.float().numpy(), _bfloat16_bits_to_float(expected), 2.0**-7
    else:
        got = got.detach().numpy()
    assert got.shape == expected.shape, f"{name}: shape {got.shape} != expected {expected.shape}"
    assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype} != expected {expected.dtype}"
    if np.issubdtype(expected.dtype, np.floating):
        got64, exp64 = got.astype(np.float64), expected.astype(np.float64)
        assert np.array_equal(np.isnan(got64), np.isnan(exp64)), f"{name}: NaN positions differ"
        finite = np.isfinite(exp64)
        assert np.array_equal(got64[~finite & ~np.isnan(exp64)], exp64[~finite & ~np.isnan(exp64)]), \
            f"{name}: infinities differ"
        if finite.any():
            err = np.max(np.abs(got64[finite] - exp64[finite]))
            scale = max(1.0, float(np.max(np.abs(exp64[finite]))))
            assert err <= rtol * scale, f"{name}: max |got - expected| = {err:g} (scale {scale:g})"
    else:
        assert np.array_equal(got, expected), f"{name}: values differ"


def run_case(name: str) -> str:
    """Run one node test: "matched", or "refused" for `KNOWN_UNSUPPORTED`; raises otherwise."""
    case = NODE_DIR / name
    if name in KNOWN_UNSUPPORTED:
        with pytest.raises((plinio_onnx.UnsupportedOpError, plinio_onnx.ModelLoadError)):
            plinio_onnx.to_torch(plinio_onnx.load(case / "model.onnx"))
        return "refused"
    model = plinio_onnx.to_torch(plinio_onnx.load(case / "model.onnx")).eval()
    proto = onnx.load(str(case / "model.onnx"), load_external_data=False).graph
    data = case / "test_data_set_0"
    in_types = [v.type.tensor_type.elem_type for v in proto.input]
    out_types = [v.type.tensor_type.elem_type for v in proto.output]
    inputs = [_to_torch(_read(data / f"input_{i}.pb"), t) for i, t in enumerate(in_types)
              if (data / f"input_{i}.pb").exists()]
    expected = [_read(data / f"output_{j}.pb") for j in range(len(out_types))]
    with torch.no_grad():
        outputs = model(*inputs)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    assert len(outputs) == len(expected), f"{name}: {len(outputs)} outputs, expected {len(expected)}"
    for j, (got, want) in enumerate(zip(outputs, expected)):
        _compare(f"{name} output {j}", got, want, out_types[j])
    return "matched"


@pytest.mark.parametrize("name", sorted(collect()))
def test_node(name: str) -> None:
    run_case(name)


# -- coverage report --------------------------------------------------------------------------
def coverage() -> None:
    """Print, per op, the collected node tests that use it: matched, refused, failed."""
    status: dict[str, str] = {}
    failures = []
    for name in sorted(collect()):
        try:
            status[name] = run_case(name)
        except (Exception, pytest.fail.Exception) as err:  # pytest.raises fails with the latter
            status[name] = "failed"
            failures.append(f"{name}: {' '.join(str(err).split())[:300]}")
    by_op = collected_by_op()
    print(f"{'op':<24}{'collected':>10}{'matched':>9}{'refused':>9}{'failed':>8}")
    for op, names in by_op.items():
        c = Counter(status[n] for n in names)
        print(f"{op:<24}{len(names):>10}{c['matched']:>9}{c['refused']:>9}{c['failed']:>8}")
    print(f"\n{len(status)} tests collected over {len(by_op)} ops; {len(failures)} failed")
    stale = sorted(set(KNOWN_UNSUPPORTED) - set(collect()))
    if stale:
        print(f"KNOWN_UNSUPPORTED entries not collected: {', '.join(stale)}")
    for line in failures:
        print("FAILED", line)


if __name__ == "__main__":
    if "--coverage" in sys.argv:
        coverage()
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))
