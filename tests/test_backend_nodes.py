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
    **dict.fromkeys(["test_dequantizelinear_blocked", "test_quantizelinear_blocked_asymmetric",
                     "test_quantizelinear_blocked_symmetric"], "blocked quantization (opset 21)"),
    **dict.fromkeys(["test_dequantizelinear_e4m3fn", "test_dequantizelinear_e4m3fn_float16",
                     "test_dequantizelinear_e4m3fn_zero_point", "test_dequantizelinear_e5m2",
                     "test_quantizelinear_e4m3fn", "test_quantizelinear_e5m2"], "float8 quantization"),
}


#: The ops the loader claims (README: "How it is tested"). Collection reads this list, not the
#: registry, so a handler that disappears fails its tests instead of shrinking the collection.
CLAIMED_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BitShift Cast CastLike Ceil Celu Clip Compress Concat Constant ConstantOfShape Conv
    ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf
    Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Hardmax Identity
    InstanceNormalization IsInf IsNaN LRN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax LpPool MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonZero Not OneHot Or PRelu Pad
    Pow QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
    Trilu Unsqueeze Upsample Where Xor""".split())

#: The counts README reports (onnx 1.17's node tests): collected, and refused among them.
EXPECTED_COLLECTED = 981
EXPECTED_REFUSED = 66
#: Element types numpy has no dtype for (tests using them do not count towards the 95 %).
_NOT_NUMPY = {TensorProto.BFLOAT16, TensorProto.STRING, TensorProto.INT4, TensorProto.UINT4,
              TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
              TensorProto.FLOAT8E5M2FNUZ}


# -- collection -------------------------------------------------------------------------------
def _is_tensor(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type")


def numpy_representable(name: str) -> bool:
    """Whether every tensor type of the test's model has a numpy dtype."""
    graph = onnx.load(str(NODE_DIR / name / "model.onnx"), load_external_data=False).graph
    types = {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    types |= {t.data_type for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "value") and attr.type == onnx.AttributeProto.INT:
                types.add(attr.i)
            elif attr.type == onnx.AttributeProto.TENSOR:
                types.add(attr.t.data_type)
    return not types & _NOT_NUMPY


@lru_cache(maxsize=None)
def collect() -> dict[str, frozenset[str]]:
    """Collected test name → the op types of its model."""
    # Constant nodes never reach the loader: `load` turns them into initializers.
    supported = CLAIMED_OPS
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


def test_claimed_ops_have_handlers() -> None:
    missing = CLAIMED_OPS - set(supported_ops()) - {"Constant"}
    assert not missing, f"claimed ops without a handler: {sorted(missing)}"


def test_coverage_counts() -> None:
    """Every collected test matches or is a listed refusal (`test_node`), so these counts are
    what README reports; at least 95 % of the numpy-representable ones match."""
    collected = collect()
    refused = set(KNOWN_UNSUPPORTED)
    assert refused <= set(collected), f"stale refusals: {sorted(refused - set(collected))}"
    assert (len(collected), len(refused)) == (EXPECTED_COLLECTED, EXPECTED_REFUSED)
    # every claimed op is exercised (onnx 1.17 ships no GlobalLpPool node test)
    assert {op for ops in collected.values() for op in ops} == CLAIMED_OPS - {"GlobalLpPool"}
    representable = [name for name in collected if numpy_representable(name)]
    matched = [name for name in representable if name not in refused]
    assert len(matched) >= 0.95 * len(representable), (len(matched), len(representable))


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
    representable = [n for n in status if numpy_representable(n)]
    print(f"numpy-representable: {len(representable)}, matched "
          f"{sum(status[n] == 'matched' for n in representable)}")
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
