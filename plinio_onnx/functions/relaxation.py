"""Relaxed discrete choices, shared by MPS (a precision per quantizer) and SuperNet (a branch per
Choice): logits α over the options (dim 0), weights θ over them, one vocabulary of samplings
and one temperature API.

Samplings (training-mode θ; in eval, θ is always one-hot(argmax α), the first maximum winning
as ONNX ``ArgMax`` and torch agree — what you evaluate is what is exported):

* ``"softmax"``: θ = softmax(α / T) (``"soft"``, MPS's former spelling, is accepted).
* ``"hard"``: one-hot(argmax α) forward, softmax(α / T) gradient (straight-through).
* ``"gumbel"``: θ = gumbel_softmax(α, τ = T), fresh noise every step.
* ``"gumbel_hard"``: one-hot of the Gumbel sample forward, its soft gradient.
* `FIXED` (a run-time state that no graph stores, not a relaxation: a frozen MPS search): the
  argmax, as in eval.

A cost reads the same relaxation without noise (`cost_weights`: Gumbel costs its softmax).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import host
from ..errors import SettingError

SOFTMAX, HARD, GUMBEL, GUMBEL_HARD = "softmax", "hard", "gumbel", "gumbel_hard"
#: The samplings a search may train with.
SAMPLINGS = (SOFTMAX, GUMBEL, GUMBEL_HARD, HARD)
#: The argmax in training too (`plinio_onnx.methods.mps.MPS.freeze`).
FIXED = "fixed"
#: Former spellings, accepted wherever a sampling is read (arguments, graphs, spec files).
ALIASES = {"soft": SOFTMAX}
_NOISE_FREE = {GUMBEL: SOFTMAX, GUMBEL_HARD: HARD}


def is_sampling(name: object) -> bool:
    """Whether ``name`` (str or bytes) spells a sampling of `SAMPLINGS` (or an alias of one)."""
    if isinstance(name, bytes):
        name = name.decode()
    return isinstance(name, str) and (name in SAMPLINGS or name in ALIASES)


def sampling_mode(name: "str | bytes") -> str:
    """The sampling ``name`` spells, in this module's vocabulary; `SettingError` when unknown."""
    if isinstance(name, bytes):
        name = name.decode()
    if not is_sampling(name):
        raise SettingError(f"unknown sampling {name!r}; choose from {SAMPLINGS}")
    return ALIASES.get(name, name)


def check_temperature(value: float) -> float:
    """``value`` as a float; `SettingError` unless it is a positive number."""
    if not value > 0:
        raise SettingError(f"the temperature must be positive (got {value})")
    return float(value)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """one-hot(argmax α) over dim 0 (the first maximum), in α's dtype."""
    return F.one_hot(logits.argmax(0), logits.shape[0]).movedim(-1, 0).to(logits.dtype)


def relaxed_weights(logits: torch.Tensor, temperature: "torch.Tensor | float", sampling: str) -> torch.Tensor:
    """The training-mode θ over dim 0 of ``logits`` for a sampling of `SAMPLINGS`."""
    if sampling in (GUMBEL, GUMBEL_HARD):
        if isinstance(temperature, torch.Tensor) and not host.runs_on_host(temperature):
            return _gumbel_softmax(logits, temperature, sampling == GUMBEL_HARD)
        return F.gumbel_softmax(logits, tau=float(temperature), hard=sampling == GUMBEL_HARD, dim=0)
    soft = torch.softmax(logits / temperature, dim=0)
    if sampling == HARD:
        return one_hot_argmax(logits) + (soft - soft.detach())
    return soft


def _gumbel_softmax(logits: torch.Tensor, temperature: torch.Tensor, hard: bool) -> torch.Tensor:
    """``F.gumbel_softmax(logits, tau=T, hard=hard, dim=0)`` with T a tensor (``tau`` must be a
    number: reading it would wait for a device): the same noise draw, the same ops."""
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
    soft = ((logits + gumbels) / temperature).softmax(0)
    if not hard:
        return soft
    one_hot = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(
        0, soft.max(0, keepdim=True)[1], 1.0)
    return one_hot - soft.detach() + soft


def choice_weights(logits: torch.Tensor, temperature: "torch.Tensor | float", sampling: str,
                   training: bool) -> torch.Tensor:
    """θ of a forward: one-hot argmax in eval (and `FIXED`), `relaxed_weights` in training."""
    if not training or sampling == FIXED:
        return one_hot_argmax(logits)
    return relaxed_weights(logits, temperature, sampling)


def cost_weights(logits: torch.Tensor, temperature: "torch.Tensor | float", sampling: str,
                 training: bool) -> torch.Tensor:
    """θ of a cost: the forward's choice without noise (Gumbel costs its softmax)."""
    return choice_weights(logits, temperature, _NOISE_FREE.get(sampling, sampling), training)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(α / T) in numpy (float64), for reports."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / float(temperature)
    z = np.exp(z - z.max())
    return z / z.sum()


class Temperature:
    """The temperature T of a model's relaxed choices, held in one-element buffers of its module
    (so a checkpoint saves it): ``tensor(name)`` reads the buffer of each of ``names`` (none:
    nothing relaxed, T reads ``default``)."""

    def __init__(self, tensor: Callable[[str], torch.Tensor], names: list[str], default: float = 1.0) -> None:
        self.tensor, self.names, self.default = tensor, list(names), default

    @property
    def value(self) -> float:
        return float(self.tensor(self.names[0])) if self.names else self.default

    def as_tensor(self) -> "torch.Tensor | float":
        """T as the buffer itself (no host read: the value a device's step divides by), or
        ``default`` when nothing is relaxed."""
        return self.tensor(self.names[0]) if self.names else self.default

    def set(self, value: float) -> None:
        value = check_temperature(value)
        with torch.no_grad():
            for name in self.names:
                self.tensor(name).fill_(value)


class Annealed:
    """The temperature API of a searchable model with relaxed choices (MPS, SuperNet): the model
    sets ``relaxation_temperature`` (a `Temperature`)."""

    relaxation_temperature: Temperature

    @property
    def temperature(self) -> float:
        """The softmax temperature T of every relaxed choice (a buffer: set it to anneal)."""
        return self.relaxation_temperature.value

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.relaxation_temperature.set(value)

    def set_temperature(self, value: float) -> None:
        """Set T (positive; `SettingError` otherwise); it is saved with the searchable graph."""
        self.relaxation_temperature.set(value)

    def anneal(self, factor: float, minimum: float = 1e-3) -> float:
        """Multiply the temperature by ``factor`` (not below ``minimum``); returns the new T."""
        self.temperature = max(self.temperature * factor, minimum)
        return self.temperature
