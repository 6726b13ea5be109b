"""Hardware latency/energy models against PLiNIO's published formulas, computed by hand.

Every expected number below is worked out from the formula of the cited PLiNIO file
(eml-eda/plinio, plinio/cost/*.py) with the layer's numbers written in; none calls the code
under test.
"""
from __future__ import annotations

import pytest
import torch

import plinio_onnx as po
from plinio_onnx.cost import LayerSpec
from plinio_onnx.errors import PlinioOnnxError
from plinio_onnx.hardware import (HardwareProfile, Registry, SimdMcu, diana_latency, gap8_latency, mpic_energy,
                                  mpic_latency, ne16_latency)


def conv(c_in, c_out, k, out_hw, *, bias=True, w=None, a=None) -> LayerSpec:
    return LayerSpec(name="conv", op="Conv", kind="conv", in_channels=c_in, out_channels=c_out,
                     kernel_size=k * k, bias=bias, output_positions=out_hw[0] * out_hw[1],
                     weight_bits=w, input_bits=a, extra={"kernel_shape": [k, k], "output_shape": list(out_hw)})


def depthwise(c, k, out_hw, *, bias=True, w=None, a=None) -> LayerSpec:
    return LayerSpec(name="dw", op="Conv", kind="conv", in_channels=c, out_channels=c, kernel_size=k * k,
                     groups=c, depthwise=True, bias=bias, output_positions=out_hw[0] * out_hw[1],
                     weight_bits=w, input_bits=a, extra={"kernel_shape": [k, k], "output_shape": list(out_hw)})


def linear(c_in, c_out, *, bias=True, w=None, a=None) -> LayerSpec:
    return LayerSpec(name="fc", op="Gemm", kind="linear", in_channels=c_in, out_channels=c_out, bias=bias,
                     weight_bits=w, input_bits=a)


# -- GAP8 (gap8_latency.py) -------------------------------------------------------------------
# conv:   ⌈out_x/2⌉·⌈out_y/8⌉ · (k²·C_in·2 + ⌈C_out/4⌉·(5 + ⌈k²·C_in/4⌉·14 + 10))
# dw:     4·⌈C_out/4⌉·out_x·out_y·k²
# linear: ⌈C_in/2⌉·⌈C_out/4⌉
@pytest.mark.parametrize("spec, expected", [
    (conv(16, 32, 3, (8, 8)), 4 * 1 * (288 + 8 * (5 + 36 * 14 + 10))),        # 4·4440 = 17760
    (conv(3, 10, 3, (5, 12)), 3 * 2 * (54 + 3 * (5 + 7 * 14 + 10))),          # 6·393 = 2358
    (conv(37, 5, 1, (4, 4)), 2 * 1 * (74 + 2 * (5 + 10 * 14 + 10))),         # 2·384 = 768
    (depthwise(32, 3, (8, 8)), 4 * 8 * 8 * 8 * 9),                            # 18432
    (depthwise(10, 3, (5, 5)), 4 * 3 * 5 * 5 * 9),                            # 2700
    (linear(64, 10), 32 * 3),                                                 # 96
    (linear(33, 7), 17 * 2),                                                  # 34
])
def test_gap8_equals_plinio_formulas(spec, expected):
    assert gap8_latency(spec) == expected
    assert gap8_latency(spec.with_(weight_bits=4, input_bits=2)) == expected  # bit-independent


def test_gap8_is_differentiable_in_effective_channels():
    c_out = torch.tensor(32.0, dtype=torch.float64, requires_grad=True)
    value = gap8_latency(conv(16, c_out, 3, (8, 8)))
    value.backward()
    assert float(value.detach()) == 17760
    # straight-through: ∂⌈C/4⌉/∂C = 1/4, so ∂/∂C_out = iterations · (5 + 36·14 + 10)/4 = 4·519/4
    assert float(c_out.grad) == 519


# -- NE16 (ne16_latency.py, Ne16PerfModel) ----------------------------------------------------
# Per 3×3 pass: load 6 + 25·⌈128/256⌉ = 31, weight offset 6 (dw: 6 + k), matrix-vector 6 + k·w,
# index 2, norm-quant 9 + ⌈4k/4⌉, stream-out 3 + 9·⌈256/256⌉ + 1 = 13. A 1×1 (not dw) pass:
# load 10 + 9 = 19, matrix-vector 6 + k. Dense iteration(k) = ⌈K_i/16⌉·(load + 6 + mv(k) + 2)
# + nq(k) + 13; dw iteration(k) = load + wo(k) + mv(k) + 2 + nq(k) + 13. Output channels in
# bodies of 32 (dw 16) plus a remainder; ⌈H/3⌉·⌈W/3⌉ spatial tiles.
@pytest.mark.parametrize("spec, expected", [
    # 3×3, 16→32, 3×3 out, 8 bit: iteration(k) = (31+6+6+8k+2) + 9+k+13 = 67+9k; 1·(67+288)
    (conv(16, 32, 3, (3, 3), w=8, a=8), 355),
    # 3×3, 40→50, 8×5 out, 4 bit: n_in 3, it(k) = 3·(45+4k)+22+k = 157+13k; 1 body + rem 18;
    # 6 tiles · (573 + 391)
    (conv(40, 50, 3, (8, 5), w=4, a=8), 6 * (573 + 391)),
    # the same at 2 bit: it(k) = 3·(45+2k)+22+k = 157+7k; 6 · (381 + 283)
    (conv(40, 50, 3, (8, 5), w=2, a=8), 6 * (381 + 283)),
    # 1×1, 64→64, 4×4 out, 8 bit: n_in 4, it(k) = 4·(19+6+6+k+2)+22+k = 154+5k; 2 bodies, 4 tiles
    (conv(64, 64, 1, (4, 4), w=8, a=8), 4 * 2 * 314),
    # dw 3×3, 40 channels, 6×6 out: it(k) = 31+(6+k)+(6+8k)+2+(9+k)+13 = 67+10k; 2 bodies of 16
    # + rem 8, 4 tiles: 4·(2·227 + 147)
    (depthwise(40, 3, (6, 6), w=8, a=8), 4 * (2 * 227 + 147)),
    # dw 3×3, 16 channels, 3×3 out, 4 bit: it(k) = 31+(6+k)+(6+4k)+2+(9+k)+13 = 67+6k; one body of 16
    (depthwise(16, 3, (3, 3), w=4, a=8), 67 + 6 * 16),
    # linear 64→40, 8 bit: n_in 4, it(k) = 4·(33+k)+22+k = 154+5k; one body of 32 + rem 8
    (linear(64, 40, w=8, a=8), (154 + 5 * 32) + (154 + 5 * 8)),
    # linear 100→10 (a 1×1 conv on 1×1), 2 bit (1×1 is not bit-serial): n_in 7,
    # it(k) = 7·(33+k)+22+k = 253+8k; no body, rem 10
    (linear(100, 10, w=2, a=8), 333),
    (linear(100, 10, w=0, a=8), 0),                      # 0-bit weights: the layer is gone
    # a float layer counts as 8-bit weights
    (conv(16, 32, 3, (3, 3)), 355),
])
def test_ne16_equals_plinio_formulas(spec, expected):
    assert ne16_latency(spec) == expected


def test_ne16_runs_other_kernels_as_3x3_and_1x1_passes():
    # Ne16PerfModel_generalized: 5×5 = 1 pass 3×3 + (2·5 + 2·5 − 4) = 16 passes 1×1.
    # 16→32, 3×3 out, 8 bit: 3×3 pass 355 (above); 1×1 pass it(k) = (19+6+6+k+2)+9+k+13 = 55+2k → 119
    assert ne16_latency(conv(16, 32, 5, (3, 3), w=8)) == 355 + 16 * 119


# -- DIANA (diana_latency.py) -----------------------------------------------------------------
# digital (8 bit): ⌈(C_out/groups)/16⌉·C_in·⌈out_x/16⌉·out_y·k² + out_x·out_y·(C_out + C_in)/8
# analog (2 bit): 8·C_in·k² + ⌈C_out/512⌉·⌈C_in/128⌉·out_x·out_y/u · 70/(10⁹/260e6), with
# u the largest of 1, 2, 4, 8 with u·C_out ≤ 512 and (u + k − 1)·max(64, C_in)·k ≤ 1152.
@pytest.mark.parametrize("spec, expected", [
    (conv(16, 32, 3, (8, 8), w=8), 2 * 16 * 1 * 8 * 9 + 64 * 48 / 8),             # 2304 + 384
    (conv(3, 20, 3, (20, 10), w=8), 2 * 3 * 2 * 10 * 9 + 200 * 23 / 8),          # 1080 + 575
    (depthwise(32, 3, (8, 8), w=8), 1 * 32 * 1 * 8 * 9 + 64 * 64 / 8),           # 2304 + 512
    (depthwise(20, 3, (20, 10), w=8), 1 * 20 * 2 * 10 * 9 + 200 * 40 / 8),       # 3600 + 1000
    (linear(64, 10, w=8), 1 * 64 * 1 * 1 * 1 + 1 * 74 / 8),                      # 64 + 9.25
    (linear(300, 600, w=8), 38 * 300 * 1 * 1 * 1 + 1 * 900 / 8),                 # 11400 + 112.5
    (conv(16, 32, 3, (8, 8)), 2304 + 384),                                        # float: digital
    # u: (u+2)·64·3 ≤ 1152 → u = 4; 8·16·9 + 1·1·64/4 · 18.2
    (conv(16, 32, 3, (8, 8), w=2), 1152 + 16 * 70 / (1e9 / 260e6)),
    # C_out 600 > 512: no unrolling fits, u = 1; 8·256 + 2·2·16 · 18.2
    (conv(256, 600, 1, (4, 4), w=2), 2048 + 64 * 70 / (1e9 / 260e6)),
    # linear 64→10: u·64 ≤ 1152 → u = 8; 8·64 + 1/8 · 18.2
    (linear(64, 10, w=2), 512 + 0.125 * 70 / (1e9 / 260e6)),
])
def test_diana_equals_plinio_formulas(spec, expected):
    assert diana_latency(spec) == pytest.approx(expected, rel=1e-12)


def test_diana_splits_channels_between_its_units():
    # mean weight bits 5 = half the channels ternary: analog(16 channels) = 1152 + 16·18.2 (u = 4),
    # digital(16 channels) = 1·16·1·8·9 + 64·32/8 = 1408; in parallel: the larger
    assert diana_latency(conv(16, 32, 3, (8, 8), w=5)) == pytest.approx(1152 + 16 * 18.2, rel=1e-12)
    bits = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    value = diana_latency(conv(16, 32, 3, (8, 8), w=bits))
    value.backward()
    assert float(value.detach()) == pytest.approx(1152 + 16 * 18.2) and bits.grad is not None
    with pytest.raises(ValueError, match="DIANA runs"):
        diana_latency(conv(16, 32, 3, (8, 8), w=16))


# -- MPIC (mpic_latency.py, mpic_energy.py) ---------------------------------------------------
# cycles = ops · LUT[a][w], ops = C_out·(C_in·k² + 1)·out_x·out_y (dw: C·(k² + 1)·…, linear
# C_out·(C_in + 1)); LUT (cycles/MAC) a=2: w2 1/6.5, w4 1/4, w8 1/2.2; a=4: 1/3.9, 1/3.5, 1/2.1;
# a=8: 1/2.5, 1/2.3, 1/2.1; w=0: 0. Energy = cycles / 250e6 · mean(5.30, 5.39, 5.46, 5.38) mW.
@pytest.mark.parametrize("spec, expected", [
    (conv(16, 32, 3, (8, 8), w=8, a=8), 32 * 145 * 64 / 2.1),
    (conv(16, 32, 3, (8, 8), w=4, a=2), 32 * 145 * 64 / 4.0),
    (conv(16, 32, 3, (8, 8), w=2, a=4), 32 * 145 * 64 / 3.9),
    (conv(16, 32, 3, (8, 8)), 32 * 145 * 64 / 2.1),                     # float: 8×8 bits
    (conv(16, 24, 3, (8, 8), w=8, a=2, bias=False), 24 * 144 * 64 / 2.2),
    (depthwise(32, 3, (8, 8), w=2, a=8), 32 * 10 * 64 / 2.5),
    (depthwise(12, 3, (4, 4), w=4, a=4), 12 * 10 * 16 / 3.5),
    (linear(64, 10, w=8, a=2), 10 * 65 / 2.2),
    (linear(64, 10, w=0, a=8), 0.0),
])
def test_mpic_equals_plinio_formulas(spec, expected):
    assert mpic_latency(spec) == pytest.approx(expected, rel=1e-12)
    power = (5.30 + 5.39 + 5.46 + 5.38) / 4 * 1e-3
    assert mpic_energy(spec) == pytest.approx(expected / 250e6 * power, rel=1e-12)


def test_mpic_is_differentiable_in_bit_widths():
    w = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    value = mpic_latency(conv(16, 32, 3, (8, 8), w=w, a=a))
    value.backward()
    ops = 32 * 145 * 64
    # halfway between the w=4 and w=8 entries of the a=8 row
    assert float(value.detach()) == pytest.approx(ops * (1 / 2.3 + 1 / 2.1) / 2)
    assert float(w.grad) == pytest.approx(ops * (1 / 2.1 - 1 / 2.3) / 4)
    # a = 8 is the table's last row: constant beyond it, the slope of the a ∈ [4, 8] segment below
    row4 = (1 / 3.5 + 1 / 2.1) / 2
    assert float(a.grad) == pytest.approx(ops * ((1 / 2.3 + 1 / 2.1) / 2 - row4) / 4)


# -- the SIMD-MCU template --------------------------------------------------------------------
def test_simd_mcu_counts_blocked_macs_lanes_and_overheads():
    mcu = SimdMcu()  # 32-bit registers, blocks of 4 output channels, 4 cycles/output, 200/layer
    # 16→10 3×3 on 8×8 at 8 bit: 12 blocked channels · 144 · 64 MACs / 4 lanes + 10·64·4 + 200
    assert mcu(conv(16, 10, 3, (8, 8), w=8, a=8)) == 12 * 144 * 64 / 4 + 2560 + 200
    assert mcu(conv(16, 10, 3, (8, 8), w=4, a=4)) == 12 * 144 * 64 / 8 + 2560 + 200
    assert mcu(conv(16, 10, 3, (8, 8), w=2, a=8)) == 12 * 144 * 64 / 4 + 2560 + 200  # unpacked to 8
    assert mcu(depthwise(6, 3, (4, 4))) == 8 * 9 * 16 / 4 + 6 * 16 * 4 + 200      # float: 8 bit
    slow = SimdMcu(cycles_per_instruction=2.0, channel_block=1, output_cycles=0, layer_cycles=0,
                   energy_per_cycle=1e-9)
    assert slow(linear(64, 10, w=8, a=8)) == 640 / 4 * 2
    assert slow.energy(linear(64, 10, w=8, a=8)) == pytest.approx(320e-9)


# -- profiles ---------------------------------------------------------------------------------
def test_builtin_profiles_and_user_profiles():
    assert set(po.hardware.names()) >= {"gap8", "ne16", "diana", "mpic", "simd-mcu"}
    gap8 = po.hardware.get("gap8")
    assert gap8.latency is gap8_latency and gap8.channel_multiple == 4 and not gap8.has_energy
    mpic = po.hardware.get("mpic")
    assert mpic.has_energy and mpic.weight_bits == (2, 4, 8)
    # a float layer at the profile's precision; a quantized one at its own
    assert mpic.cost()(conv(16, 32, 3, (8, 8), w=4, a=2)) == pytest.approx(32 * 145 * 64 / 4.0)
    with pytest.raises(PlinioOnnxError, match="no energy model"):
        gap8.cost("energy")
    with pytest.raises(PlinioOnnxError, match="unknown hardware profile"):
        po.hardware.get("tpu-v9")

    mine = HardwareProfile("mine", latency=lambda spec: 2 * po.cost.macs(spec), channel_multiple=8)
    registry = Registry([mine])
    assert registry.get("mine") is mine and "gap8" in registry and "mine" not in Registry()
    assert mine.cost()(conv(16, 32, 3, (8, 8))) == 2 * 32 * 144 * 64
    with pytest.raises(PlinioOnnxError, match="channel_multiple"):
        HardwareProfile("bad", latency=len, channel_multiple=0)


def test_user_profile_from_a_file(tmp_path):
    path = tmp_path / "target.py"
    path.write_text("import plinio_onnx as po\n"
                    "PROFILE = po.hardware.HardwareProfile('board', latency=po.cost.macs, channel_multiple=8)\n"
                    "NOT_A_PROFILE = 3\n")
    assert po.hardware.get(f"{path}:PROFILE").name == "board"
    with pytest.raises(PlinioOnnxError, match="is not a"):
        po.hardware.get(f"{path}:NOT_A_PROFILE")
    with pytest.raises(PlinioOnnxError, match="no such file"):
        po.hardware.get(f"{tmp_path / 'missing.py'}:PROFILE")


# -- inspect --hardware -----------------------------------------------------------------------
def _small_cnn(path) -> None:
    """conv 3×3 16→32 (pad 1) on 8×8 → depthwise 3×3 32 → global average pool → flatten →
    linear 32→10, all with bias: the conv, depthwise and linear layers of the tests above."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    def init(name, *shape):
        return onnx.numpy_helper.from_array(np.full(shape, 0.01, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["a", "w2", "b2"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=32),
             helper.make_node("GlobalAveragePool", ["d"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [init("w1", 32, 16, 3, 3), init("b1", 32), init("w2", 32, 1, 3, 3), init("b2", 32),
                               init("w3", 10, 32), init("b3", 10)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("name, latency, energy", [
    ("gap8", 17760 + 18432 + 16 * 3, None),                         # linear 32→10: ⌈32/2⌉·⌈10/4⌉
    # ne16: 9 spatial tiles · 355; dw 9 · 2 · (67 + 160); linear n_in 2, 2·(33+k)+22+k at k = 10
    ("ne16", 9 * 355 + 9 * 2 * 227 + 118, None),
    # diana digital: 2304 + 384; dw 2304 + 512; linear 1·32·1·1·1 + 42/8
    ("diana", 2688 + 2816 + 32 + 42 / 8, None),
    # mpic: ops (conv 32·145·64, dw 32·10·64, linear 10·33) / 2.1 at 8×8 bits
    ("mpic", (296960 + 20480 + 330) / 2.1, (296960 + 20480 + 330) / 2.1 / 250e6 * 5.3825e-3),
])
def test_inspect_reports_modelled_latency_and_energy(tmp_path, capsys, name, latency, energy):
    import json

    from plinio_onnx.cli import main
    path = tmp_path / "small.onnx"
    _small_cnn(path)
    assert main(["inspect", str(path), "--hardware", name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["latency"] == pytest.approx(latency, rel=1e-12)
    assert [row["name"] for row in report["layers"]] == ["conv", "dw", "fc"]
    assert sum(row["latency"] for row in report["layers"]) == pytest.approx(latency, rel=1e-12)
    if energy is None:
        assert report["energy"] is None and "energy" not in report["layers"][0]
    else:
        assert report["energy"] == pytest.approx(energy, rel=1e-12)
    assert report["hardware"]["hardware"] == name and report["hardware"]["default_bits"] == 8


def test_inspect_with_a_user_profile_and_a_bad_name(tmp_path, capsys):
    from plinio_onnx.cli import main
    path = tmp_path / "small.onnx"
    _small_cnn(path)
    (tmp_path / "board.py").write_text("import plinio_onnx as po\n"
                                       "BOARD = po.hardware.HardwareProfile('board', latency=po.cost.macs)\n")
    assert main(["inspect", str(path), "--hardware", f"{tmp_path / 'board.py'}:BOARD"]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "board: latency in cycles" in out
    assert main(["inspect", str(path), "--hardware", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown hardware profile 'tpu'" in err and len(err.strip().splitlines()) == 1


# -- a user-defined profile drives the searches -----------------------------------------------
def _board_cycles(spec: LayerSpec):
    """8-channel blocks, 32 bits of MACs per cycle, 300 cycles per layer."""
    blocked = po.hardware.rounding.ceil_div(spec.out_channels, 8) * 8
    return po.cost.macs(spec.with_(out_channels=blocked)) * spec.weight_bits / 32 + 300


BOARD = HardwareProfile("board", latency=_board_cycles, channel_multiple=8, weight_bits=(2, 4, 8))


def test_user_profile_drives_pit():
    from _util import MODELS
    model = po.PIT(MODELS / "digits_cnn.onnx", cost=BOARD.cost())
    # digits CNN at 8 bits: conv1 1→16 3×3 on 8×8, conv2 16→32 3×3 on 8×8, conv3 32→32 3×3 on 4×4,
    # fc1 512→64, fc2 64→10 (blocked to 16): MACs / 4 + 300 each
    macs = 16 * 9 * 64 + 32 * 144 * 64 + 32 * 288 * 16 + 512 * 64 + 16 * 64
    assert float(model.cost.detach()) == macs / 4 + 5 * 300
    with torch.no_grad():
        model.tensor("/conv2/Conv.pit_alpha")[:12] = 0.2   # conv2 keeps 20 channels: 24 blocked
    cost = model.cost
    cost.backward()
    # conv2 24·144·64 and conv3 reads 20 of its inputs: 32·180·16
    pruned = 16 * 9 * 64 + 24 * 144 * 64 + 32 * 180 * 16 + 512 * 64 + 16 * 64
    assert float(cost.detach()) == pruned / 4 + 5 * 300
    grad = model.grad("/conv2/Conv.pit_alpha")
    assert grad is not None and float(grad.abs().sum()) > 0


def test_user_profile_drives_mps():
    from _util import MODELS
    model = po.MPS(MODELS / "digits_cnn.onnx", cost=BOARD.cost(), w_precisions=BOARD.weight_bits,
                   a_precisions=(8,))
    model.eval()  # the argmax precisions: 8 bits at the initial logits
    eight = float(model.cost.detach())
    logits = {layer.node: layer.alpha for layer in model.info.layers}["/conv2/Conv"]
    with torch.no_grad():
        alpha = model.tensor(logits)
        alpha.zero_()
        alpha[0] = 1.0                                  # conv2 at 2 bits (precisions 2, 4, 8)
    two = float(model.cost.detach())
    assert eight - two == pytest.approx(32 * 144 * 64 * (8 - 2) / 32)
    model.train()
    cost = model.cost
    cost.backward()
    grad = model.grad(logits)
    assert grad is not None and float(grad.abs().sum()) > 0


# -- built-in profiles in the searches --------------------------------------------------------
@pytest.mark.parametrize("model_name", ["dscnn", "tcn"])   # depthwise 2-D convs; 1-D convs
@pytest.mark.parametrize("profile", ["gap8", "ne16", "diana", "mpic", "simd-mcu"])
def test_builtin_profiles_count_the_graph_exactly_and_train_pit(model_name, profile):
    from _util import MODELS
    path = MODELS / f"{model_name}.onnx"
    cost = po.hardware.get(profile).cost()
    on_graph = sum(cost(spec) for spec in po.cost.layer_specs(po.load(path)))
    model = po.PIT(path, cost=cost)
    value = model.cost
    value.backward()
    assert float(value.detach()) == pytest.approx(on_graph, rel=1e-12)
    grads = [p.grad for p in model.nas_parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("profile", ["ne16", "diana", "mpic", "simd-mcu"])
def test_bit_dependent_profiles_train_mps(profile):
    from _util import MODELS
    hardware = po.hardware.get(profile)  # the bit-widths each runs (simd-mcu: the wider operand counts)
    model = po.MPS(MODELS / "dscnn.onnx", cost=hardware.cost(), w_precisions=hardware.weight_bits,
                   a_precisions=hardware.activation_bits)
    value = model.cost
    value.backward()
    grads = [p.grad for p in model.nas_parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()  # the initial argmax is 8 bits everywhere: the float model's cost at 8 bits
    on_graph = sum(po.hardware.get(profile).cost()(spec) for spec in po.cost.layer_specs(po.load(MODELS / "dscnn.onnx")))
    assert float(model.cost.detach()) == pytest.approx(on_graph, rel=1e-9)
