"""SuperNet's function (DARTS-style layer selection, PLiNIO's ``plinio/methods/supernet/``).

``Choice(candidates, logits, temperature) -> y`` picks one of N shape-compatible branches.
``candidates`` is the branch outputs stacked on a new leading axis, ``[N, *branch_shape]`` (the
pass writes ``Unsqueeze`` + ``Concat`` in front of it, so one function serves every N);
``logits`` (α, shape ``[N]``) is the trainable architecture parameter; ``temperature`` (T, shape
``[1]``) is a buffer the search anneals (`plinio_onnx.SuperNet.set_temperature`).

* **ONNX body** (what ONNX Runtime computes for a *searchable* graph): the relaxation
  θ = softmax(α / T), y = Σ_i θ_i · candidates[i]. With one logit far above the others this is
  that branch's output (to float rounding); a finalized graph has no Choice left.
* **torch, training** (the ``sampling`` attribute, `plinio_onnx.functions.relaxation`):
  y = Σ θ_i · x_i with θ = softmax(α / T) (``"softmax"``, the default: the body's value),
  Gumbel-softmax (``"gumbel"``, ``"gumbel_hard"``) or one-hot argmax with the softmax's gradient
  (``"hard"``; **ours:** PLiNIO's hard mode has no gradient into α).

* **torch, eval**: y = candidates[argmax α] exactly (ties go to the first branch, the original
  layer), whatever the sampling: what you evaluate is the branch that finalize keeps
  (`plinio_onnx.passes.pick`). **ours:** PLiNIO's eval stays soft.

The other branches are still computed in eval (the generated module is straight-line code);
their values are discarded, so the eval output is bit-exactly the chosen branch's.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..graph import PLINIO_DOMAIN
from ..to_torch.context import NodeContext
from ..to_torch.registry import Unsupported, register
from . import make_function
from .relaxation import SAMPLINGS, SOFTMAX, is_sampling, relaxed_weights, sampling_mode

CHOICE = "Choice"


# -- ONNX body --------------------------------------------------------------------------------
def choice_function() -> onnx.FunctionProto:
    """y = ReduceSum(candidates · reshape(softmax(logits / T), [-1, 1, …, 1]), axis 0)."""
    def const(name: str, values) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values)))

    nodes = [
        helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["theta"], axis=0),
        # [-1, 1, ..., 1] with one 1 per branch-output axis: theta broadcasts over the branches.
        helper.make_node("Shape", ["candidates"], ["shape"]),
        helper.make_node("Shape", ["shape"], ["rank"]),
        const("one", np.array([1], np.int64)),
        helper.make_node("Sub", ["rank", "one"], ["inner_rank"]),
        helper.make_node("ConstantOfShape", ["inner_rank"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        const("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["minus_one", "ones"], ["theta_shape"], axis=0),
        helper.make_node("Reshape", ["theta", "theta_shape"], ["theta_b"]),
        helper.make_node("Mul", ["candidates", "theta_b"], ["weighted"]),
        const("axis0", np.array([0], np.int64)),
        helper.make_node("ReduceSum", ["weighted", "axis0"], ["y"], keepdims=0),
    ]
    return make_function(CHOICE, ["candidates", "logits", "temperature"], ["y"], nodes, ["sampling"])


def functions() -> list[onnx.FunctionProto]:
    return [choice_function()]


# -- numpy (finalize, reporting) --------------------------------------------------------------
def chosen(logits: np.ndarray) -> int:
    """The kept branch: argmax α, the first on ties (torch.argmax and np.argmax agree)."""
    return int(np.argmax(np.asarray(logits, dtype=np.float32).reshape(-1)))


# -- torch ------------------------------------------------------------------------------------
class ChoiceModule(torch.nn.Module):
    """The torch side of ``ai.plinio::Choice``; ``sampling`` may be changed between steps."""

    def __init__(self, sampling: str = SOFTMAX) -> None:
        super().__init__()
        self.sampling = sampling_mode(sampling)

    def forward(self, candidates: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return candidates[logits.argmax()]
        theta = relaxed_weights(logits, temperature, self.sampling).to(candidates.dtype)
        return torch.tensordot(theta, candidates, dims=1)

    def extra_repr(self) -> str:
        return f"sampling={self.sampling!r}"


@register(CHOICE, domain=PLINIO_DOMAIN)
def _choice_handler(ctx: NodeContext):
    sampling = ctx.attr("sampling", SOFTMAX)
    if not is_sampling(sampling):
        raise Unsupported(f"unknown sampling {sampling!r}; choose from {SAMPLINGS}")
    return ctx.module(ChoiceModule(sampling), ctx.input(0), ctx.input(1, trainable=True),
                      ctx.input(2, trainable=False))
