"""`MPS`: the PLiNIO-style entry point for mixed-precision search (and QAT) on an ONNX model.

    model = po.MPS("model.onnx", cost="size")            # weights/activations at 2, 4 or 8 bits
    model.calibrate(x_batch)                              # optional: activation clips from data
    loss = criterion(model(x), y) + strength * model.cost
    model.export("mixed.onnx")                            # QDQ; format="qonnx" for QONNX

``po.MPS(..., w_precisions=(8,), a_precisions=(8,))`` is plain int8 QAT; ``pit=True`` searches
PIT channel masks together with the precisions (BN folded → PIT masks → quantizers), and the
cost then sees both (pruned channels and their bit-widths).
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Iterable

import numpy as np
import onnx
import torch

from plinio_onnx.functions import mps as fn
from plinio_onnx.functions import relaxation
from plinio_onnx.passes.mps import DEFAULT_PRECISIONS, LAYER_OPS, TEMPERATURE, fold_batchnorm, mps
from plinio_onnx.passes.pit import check_channel_multiple
from plinio_onnx.passes.pit import pit as pit_pass
from plinio_onnx.records import MPSRecord, PITRecord

from ..cost import LayerSpec
from ..errors import PlinioOnnxError
from ..graph import Graph
from ..to_torch.fuse_pit_masks import fuse_pit_masks
from ..to_torch.pack_parameters import pack_read_parameters
from .mps_bits import BatchedBits
from .pit_channels import PITChannels
from .searchable import CostFn, SearchableModel, as_graph

METHODS = ("mps", "qat", "pit+mps")


class MPS(relaxation.Annealed, SearchableModel):
    """Mixed-precision search on an ONNX model (PLiNIO's MPS; see `plinio_onnx.passes.mps`).

    ``model``: a path, ``onnx.ModelProto`` or `Graph`; a graph already searchable by MPS (a
    checkpoint from `searchable_graph().save(...)`) resumes as it is, and a graph already holding
    PIT masks (from `plinio_onnx.passes.pit`) is searched jointly. ``cost``: a cost model or its
    name; the bit-level ones are ``"size"`` (bytes), ``"size_bits"``, ``"params_bit"``,
    ``"bitops"`` (`plinio_onnx.cost.bits`); any other (``"params"``, ``"macs"``) costs the
    effective architecture as PIT does. ``pit``: also search PIT channel masks (True, or a dict of
    `plinio_onnx.passes.pit` options); ``channel_multiple`` N: PIT searches channels in blocks of N
    (with ``pit`` only). The other arguments are those of `plinio_onnx.passes.mps`.

    Eval mode evaluates the argmax precisions (and binarized PIT masks): exactly what `export`
    writes. In training the choice follows ``sampling`` (`plinio_onnx.functions.relaxation`:
    "softmax" — "soft" is accepted —, "hard", "gumbel", "gumbel_hard") at the temperature
    `temperature` (`set_temperature`, `anneal`). ``pit``: the `PITChannels` of the PIT masks
    (None without).
    """

    #: PIT masks, where the graph holds them, train fused (a module without any is left as it
    #: is); the quantizers' precision logits train as one packed parameter.
    module_passes = (fuse_pit_masks,
                     functools.partial(pack_read_parameters, readers=(fn.ActQuantizer, fn.WeightQuantizer),
                                       position=1, name="choice_logits"))

    def __init__(self, model: "str | os.PathLike | onnx.ModelProto | Graph", *,
                 cost: "CostFn | str" = "size", w_precisions: Iterable[int] = DEFAULT_PRECISIONS,
                 a_precisions: Iterable[int] = DEFAULT_PRECISIONS, per_channel: bool = True,
                 weight_scale: str = "per_channel", zero_bit: bool = False, sampling: str = "softmax",
                 temperature: float = 1.0, include: Iterable[str] | None = None,
                 exclude: Iterable[str] | None = None, op_types: Iterable[str] = LAYER_OPS,
                 clip_init: float = 6.0, fold_bn: bool = True, pit: "bool | dict" = False,
                 channel_multiple: int = 1) -> None:
        graph = as_graph(model)
        if check_channel_multiple(channel_multiple) > 1 and not pit:
            raise PlinioOnnxError("channel_multiple applies to PIT's channel masks: use it with pit=True "
                                  "(the 0-bit precision prunes channel by channel)", file=graph.source)
        if not MPSRecord.present(graph):
            if pit and not PITRecord.present(graph):
                if fold_bn:
                    fold_batchnorm(graph)
                options = dict(pit) if isinstance(pit, dict) else {}
                options.setdefault("include", include)
                options.setdefault("exclude", exclude)
                # A grouped Conv left uneven is exported as one Conv per group, around its quantizer.
                options.setdefault("grouped_convs", False)
                options.setdefault("channel_multiple", channel_multiple)
                graph = pit_pass(graph, **options)
            graph = mps(graph, w_precisions=w_precisions, a_precisions=a_precisions, per_channel=per_channel,
                        weight_scale=weight_scale, zero_bit=zero_bit, sampling=sampling,
                        temperature=temperature, include=include, exclude=exclude, op_types=op_types,
                        clip_init=clip_init, fold_bn=fold_bn)
        super().__init__(graph, cost)
        self.info = MPSRecord.of(graph)
        self.sampling = relaxation.sampling_mode(self.info.sampling)
        self._layers = {layer.node: layer for layer in self.info.layers}
        self._activations = {act.tensor: act for act in self.info.activations}
        pit_record = PITRecord.of(graph)
        self.pit = PITChannels(self.module, pit_record) if pit_record is not None else None
        self._nas_names = frozenset(self.info.logits() + (pit_record.mask_parameters() if pit_record else []))
        self.relaxation_temperature = relaxation.Temperature(
            self.tensor, [TEMPERATURE] if TEMPERATURE in self._onnx_to_attr else [], float("nan"))
        self._quantizers = {name: module for name, module in self.module.named_modules()
                            if isinstance(module, fn.ActQuantizer)}
        self._bit_tables: dict[tuple, torch.Tensor] = {}

    def _is_nas_parameter(self, onnx_name: str) -> bool:
        return onnx_name in self._nas_names

    def freeze(self) -> None:
        """Fix the current argmax precisions for fine-tuning: training then runs exactly the
        discrete network that eval runs and `export` writes (and computes only it), and the
        logits stop training. `nas_parameters` stays the same set, now without gradients."""
        self.sampling = relaxation.FIXED
        for module in self.module.modules():
            if isinstance(module, (fn.ActQuantizer, fn.WeightQuantizer)):
                module.sampling = relaxation.FIXED
        for param in self.nas_parameters():
            param.requires_grad_(False)

    # -- calibration --------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, *inputs: torch.Tensor, grid: int = 40) -> dict[str, list[float]]:
        """Set every activation clip from data: run ``inputs`` through the model with activations
        unquantized, then pick for each precision the clip (among ``grid`` fractions of the largest
        magnitude seen) with the smallest quantization MSE. Returns the clips by tensor."""
        was_training = self.training
        self.eval()
        for q in self._quantizers.values():
            q.calibrating, q.observed = True, []
        try:
            self.module(*inputs)
        finally:
            for q in self._quantizers.values():
                q.calibrating = False
            self.train(was_training)
        result = {}
        by_clip = {id(self.tensor(act.clip)): act for act in self.info.activations}
        for q in self._quantizers.values():
            act = by_clip.get(q.clip_id)
            if act is None or not q.observed:
                continue
            x = torch.cat(q.observed)
            q.observed = []
            top = float(x.abs().max()) if q.signed else float(x.clamp_min(0).max())
            if top <= 0:
                continue
            clip = self.tensor(act.clip)
            for p, bits in enumerate(q.bits):
                candidates = torch.linspace(top / grid, top, grid)
                errors = [float(((fn.act_fake_quant(x, c.reshape(1), bits, q.signed)[0] - x) ** 2).mean())
                          for c in candidates]
                clip[p] = candidates[int(np.argmin(errors))]
            result[act.tensor] = clip.tolist()
        return result

    # -- effective precisions -----------------------------------------------------------------
    def _theta(self, alpha: torch.Tensor) -> torch.Tensor:
        return relaxation.cost_weights(alpha, self.tensor(TEMPERATURE), self.sampling, self.training)

    def weight_bits(self, node: str) -> torch.Tensor | None:
        """Expected (eval: chosen) bits per weight of layer ``node``, averaged over its (kept)
        channels; None when the layer is not quantized."""
        layer = self._layers.get(node)
        if layer is None:
            return None
        theta = self._theta(self.tensor(layer.alpha)).to(torch.float64)
        expected = self._bit_table(layer.bits, theta.device) @ theta   # Σ_p b_p·θ_p (per channel)
        if expected.dim() == 0:
            return expected
        keep = self.pit.output_keep(node) if self.pit is not None else None
        if keep is not None and keep.numel() == expected.numel():
            keep = keep.detach().to(torch.float64)
            return (expected * keep).sum() / keep.sum().clamp_min(1.0)
        return expected.mean()

    def input_bits(self, node: str) -> torch.Tensor | None:
        """Expected (eval: chosen) bits of layer ``node``'s input activation."""
        layer = self._layers.get(node)
        if layer is None:
            return None
        act = self._activations[layer.activation]
        theta = self._theta(self.tensor(act.alpha)).to(torch.float64)
        return self._bit_table(act.bits, theta.device) @ theta

    def _bit_table(self, bits, device: torch.device) -> torch.Tensor:
        """The bit-widths as a float64 tensor, made once (the cost reads them every step)."""
        key = (tuple(bits), device)
        table = self._bit_tables.get(key)
        if table is None:
            table = self._bit_tables[key] = torch.tensor(key[0], dtype=torch.float64, device=device)
        return table

    def effective_spec(self, spec: LayerSpec) -> LayerSpec:
        if self.pit is not None:
            spec = self.pit.effective_spec(spec)
        if spec.name not in self._layers:
            return spec
        return spec.with_(weight_bits=self.weight_bits(spec.name), input_bits=self.input_bits(spec.name))

    def effective_specs(self) -> list[LayerSpec]:
        """Every layer's `effective_spec`, the bit-widths of all layers computed together
        (`BatchedBits`; with PIT masks, or logits that are not packed: layer by layer)."""
        batched = self._batched_bits() if self.pit is None else None
        if batched is None:
            return super().effective_specs()
        bits = batched(self.module.get_parameter(batched.packed), self.tensor(TEMPERATURE), self.sampling,
                       self.training)
        out = []
        for spec in self.specs:
            if spec.name in bits:
                spec = copy.copy(spec)   # (`LayerSpec.with_` without dataclasses.replace's cost)
                spec.weight_bits, spec.input_bits = bits[spec.name]
            out.append(spec)
        return out

    def _batched_bits(self) -> BatchedBits | None:
        if "_batched" not in self.__dict__:
            self.__dict__["_batched"] = BatchedBits.plan(self.module, self.info.layers, self._activations,
                                                         self._onnx_to_attr.__getitem__)
        return self.__dict__["_batched"]

    # -- reporting ----------------------------------------------------------------------------
    @torch.no_grad()
    def chosen_precisions(self) -> dict[str, dict]:
        """The argmax architecture: per layer, weight bits (int or per-channel list) and input bits."""
        out = {}
        for node, layer in self._layers.items():
            bits = fn.chosen_weight_bits(self.tensor(layer.alpha).cpu().numpy(), layer.bits)
            act = self._activations[layer.activation]
            a_bits = int(np.asarray(act.bits)[int(np.argmax(self.tensor(act.alpha).cpu().numpy()))])
            out[node] = {"weight_bits": bits.tolist() if np.ndim(bits) else int(bits), "input_bits": a_bits,
                         "input_signed": bool(act.signed)}
        return out

    def architecture(self) -> dict:
        """A JSON-able description of the chosen architecture (precisions, and PIT channels)."""
        arch = {"precisions": self.chosen_precisions()}
        if self.pit is not None:
            arch["kept_channels"] = self.pit.kept_channels_record()
        return arch

    def summary(self) -> str:
        """A readable table of the argmax architecture: every layer's input and weight bits, its
        size and bit-operations, and the totals (what `export` writes)."""
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        from ..cost import bits as bit_costs
        from ..cost import macs, params

        was_training = self.training
        self.eval()
        table = Table(title="MPS architecture (argmax precisions)")
        columns = ["layer", "op", "in bits", "weight bits"] + (["out ch."] if self.pit else []) + \
            ["params", "size (B)", "MACs", "bit-ops"]
        for col in columns:
            table.add_column(col, justify="left" if col in ("layer", "op", "weight bits") else "right")
        chosen = self.chosen_precisions()
        try:
            with torch.no_grad():
                for spec in self.specs:
                    eff = self.effective_spec(spec)
                    entry = chosen.get(spec.name)
                    if entry is None:
                        in_bits, w_bits = "float", "float"
                    else:
                        in_bits = f"{'s' if entry['input_signed'] else 'u'}{entry['input_bits']}"
                        w_bits = _histogram(entry["weight_bits"])
                    channels = [f"{_int(eff.out_channels)}/{spec.out_channels}"] if self.pit else []
                    table.add_row(spec.name, spec.op, in_bits, w_bits, *channels, f"{_int(params(eff)):,}",
                                  f"{float(bit_costs.size(eff)):,.1f}", f"{_int(macs(eff)):,}",
                                  f"{_int(bit_costs.bitops(eff)):,}")
                table.add_row("total", "", "", "", *([""] if self.pit else []), f"{_int(self.cost_of(params)):,}",
                              f"{float(self.cost_of(bit_costs.size)):,.1f}", f"{_int(self.cost_of(macs)):,}",
                              f"{_int(self.cost_of(bit_costs.bitops)):,}", style="bold")
        finally:
            self.train(was_training)
        buffer = StringIO()
        Console(file=buffer, width=140).print(table)
        skipped = self.info.skipped
        if skipped:
            buffer.write("not quantized: " + "; ".join(f"{s.node} ({s.reason})" for s in skipped[:20]) + "\n")
        buffer.write(f"temperature {self.temperature:g}, sampling {self.sampling}\n")
        return buffer.getvalue()

    def export(self, path: "str | os.PathLike | None" = None, *, format: str = "qdq", **options) -> Graph:
        """Finalize into a deployable quantized graph (``format="qdq"`` or ``"qonnx"``); save it
        when ``path`` is given. Channels that chose 0 bits are sliced out wherever that leaves
        the output unchanged (`plinio_onnx.passes.quantize`)."""
        return super().export(path, format=format, **options)


    # -- search hooks (`SearchHooks`: what `plinio_onnx.optimize` asks) -----------------------
    default_cost = "size"
    supports_targets = False  # bit-level costs: a strength, not a params/MACs target
    finetune_export = False   # the weights train quantized during the search

    @classmethod
    def search_metadata_keys(cls, **options) -> tuple[str, ...]:
        return (MPSRecord.KEY,)

    @property
    def nas_lr_floor(self) -> float:
        return 1e-2

    def before_search(self, inputs) -> None:
        """Activation clips from a batch of training data."""
        self.calibrate(*inputs)

    def after_search_epoch(self, epoch: int, epochs: int) -> None:
        # 0.9 per epoch over a 10-epoch search, the same total cooling spread over a longer one:
        # a fixed 0.9 per epoch saturates the softmax within ~30 epochs (T < 0.05), its
        # gradients vanish and a long search stops moving the precisions halfway to its target.
        self.anneal(0.9 ** (10 / max(epochs, 10)))

    def enforce_target(self, cost, target: float) -> bool:
        """Greedy fallback: move the weight choice nearest to its next lower precision (the
        smallest logit gap) one step down, until the discrete cost is ≤ ``target``."""
        was_training = self.training
        self.eval()   # the argmax precisions: the exported model's cost
        try:
            with torch.no_grad():
                while float(self.cost_of(cost)) > target:
                    if not self._lower_one_weight_choice():
                        return False
                return True
        finally:
            self.train(was_training)

    def _lower_one_weight_choice(self) -> bool:
        best = None
        for layer in self.info.layers:
            bits = np.asarray(layer.bits)
            logits = self.tensor(layer.alpha).detach().cpu().numpy().reshape(len(bits), -1)
            for channel, chosen in enumerate(logits.argmax(0)):
                lower = np.flatnonzero(bits < bits[chosen])
                if lower.size:
                    step = lower[np.argmax(bits[lower])]
                    gap = logits[chosen, channel] - logits[step, channel]
                    if best is None or gap < best[0]:
                        best = (gap, layer.alpha, len(bits), channel, chosen, step)
        if best is None:
            return False
        _, name, count, channel, chosen, step = best
        logits = self.tensor(name).view(count, -1)
        logits[step, channel] = logits[chosen, channel] + 1e-3
        return True


# -- the CLI's entry point --------------------------------------------------------------------
def build_searchable(method: str, graph: Graph, cost: "CostFn | str" = "size", **options) -> SearchableModel:
    """The searchable model of ``method`` on ``graph``: "mps" (mixed precision, 2/4/8 bits),
    "qat" (uniform int8: one precision, nothing to search) or "pit+mps" (PIT channel masks and
    mixed precision jointly). ``options`` go to `MPS` (e.g. ``w_precisions``, ``per_channel``).
    A graph that is already searchable (a checkpoint) resumes as it is."""
    method = method.lower()
    if method == "mps":
        return MPS(graph, cost=cost, **options)
    if method == "qat":
        options.setdefault("w_precisions", (8,))
        options.setdefault("a_precisions", (8,))
        return MPS(graph, cost=cost, **options)
    if method == "pit+mps":
        options.setdefault("pit", True)
        return MPS(graph, cost=cost, **options)
    raise PlinioOnnxError(f"unknown quantization method {method!r}; choose from {METHODS}")


def _histogram(bits) -> str:
    if isinstance(bits, int):
        return str(bits)
    values, counts = np.unique(np.asarray(bits), return_counts=True)
    return " ".join(f"{int(v)}b×{int(c)}" for v, c in sorted(zip(values, counts), key=lambda vc: -vc[0]))


def _int(value) -> int:
    return int(round(float(value)))
