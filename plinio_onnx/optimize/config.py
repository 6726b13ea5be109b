"""The options of one `optimize` run, spelled once: `OptimizeConfig` (validated on construction)
and the training `Recipe`. `po.optimize`, the ``optimize`` command line (its flags and help come
from the fields' metadata) and the checkpoint's fingerprint all read them from here.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cost import BY_NAME
from ..errors import PlinioOnnxError
from .data import TASKS
from .methods import Method, get_method

__all__ = ["OptimizeConfig", "Recipe", "cli_arguments", "parse_amount"]


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters of the three phases (defaults: PLiNIO's, tuned on digits)."""

    warmup_epochs: int | None = None        # None: 100 (0 in distillation mode)
    search_epochs: int = 100
    finetune_epochs: int = 100
    patience: int = 10                      # warm-up / fine-tune early stopping
    search_patience: int = 15               # once the target is met (or from the start)
    batch_size: int = 32
    # warm-up and fine-tune (SGD)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # search (Adam on weights, Adam on architecture parameters)
    lr_net: float = 1e-3
    weight_decay_net: float = 1e-4
    lr_nas: float | None = None             # None: 1 / (reach · steps in the search) in [5e-4, 1e-2]
    nas_reach: float = 0.3                  # fraction of the search in which α can cross 0.5
    # target control
    ramp: float = 0.4                       # the moving target reaches the target at 40 % of the search
    lambda_up: float = 1.01                 # per step while the discrete cost is above the moving target
    lambda_down: float = 0.99               # per step while it is below `relax` · the moving target
    relax: float = 0.97
    lambda_init: float = 1.0                # first λ, relative to the reference loss
    settle: bool = True                     # after the ramp, anneal both learning rates (cosine)
    floor: float = 0.95                     # never fall below floor · the moving target (0: off)
    margin: float = 0.97                    # the hinge aims at margin · the moving target
    # splits
    test_fraction: float = 0.2
    val_fraction: float = 0.2


def parse_amount(value: "int | float | str | None", base: float, *, what: str) -> float | None:
    """``1234``, ``"1234"``, ``"1.2e4"``, ``"12k"`` or ``"50%"`` (of ``base``) → an absolute number."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([%kKmMgG]?)", text)
        if not match:
            raise PlinioOnnxError(f"{what}: {value!r} is not a number or a percentage like '50%'")
        number = float(match.group(1))
        unit = match.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise PlinioOnnxError(f"{what}: a percentage must be in (0, 100], got {value!r}")
            number = base * number / 100.0
        elif unit:
            number *= {"k": 1e3, "m": 1e6, "g": 1e9}[unit]
    if not math.isfinite(number) or number <= 0:
        raise PlinioOnnxError(f"{what}: must be positive, got {value!r}")
    return number


def _option(default: Any = None, *flags: str, help: str | None = None, metavar: str | None = None,
            type: Callable | None = None, required: bool = False, action: str | None = None) -> Any:
    """A config field; ``flags``: its command-line flags (none: not on the command line), with
    argparse's ``help``, ``metavar``, ``type``, ``required`` and ``action``."""
    cli = None
    if flags:
        cli = {key: value for key, value in (("help", help), ("metavar", metavar), ("type", type),
                                             ("required", required or None), ("action", action))
               if value is not None}
        cli["flags"] = flags
    if default is MISSING:
        return field(metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})


@dataclass(frozen=True)
class OptimizeConfig:
    """What `optimize` does with a model and its data (see `plinio_onnx.optimize.flow`).

    ``method``: "pit", "mps", "qat", "pit+mps", "supernet", "supernet+pit" or "odimo". ``cost``: the cost
    model of the regularizer (a name of `plinio_onnx.cost` or a callable on a `LayerSpec`; with a
    target, the target's kind). ``strength`` and ``target_params`` / ``target_macs`` are mutually
    exclusive; a target is an absolute number or a percentage string of the input model's cost.
    ``epochs`` is the search budget; ``warmup_epochs`` / ``finetune_epochs`` those of the other
    phases (0 skips a phase). ``checkpoint_dir=False`` disables checkpoints.
    ``callback(phase, epoch, info)`` is called after every completed (and checkpointed) epoch.
    ``threads``: torch CPU threads during the run (default: 1 for small models or a busy machine,
    else the idle cores). Invalid combinations raise `PlinioOnnxError` on construction.
    """

    output: "str | os.PathLike" = _option(MISSING, "-o", "--output", metavar="OUT.onnx", required=True,
                                          help="output .onnx file")
    method: str = _option("pit", "--method", metavar="NAME",
                          help="search method: pit (default), mps, qat, pit+mps, supernet, supernet+pit, odimo")
    cost: "str | Callable | None" = _option(
        None, "--cost", metavar="NAME",
        help="cost model of the regularizer: params (default), macs, ops, params_no_bias; with a "
             "target, the target's kind")
    strength: float | None = _option(None, "--strength", type=float, metavar="S",
                                     help="regularization strength S in loss = task + S*cost "
                                          "(default: initial task loss / cost)")
    target_params: "int | float | str | None" = _option(
        None, "--target-params", metavar="N",
        help="parameter budget: a number (12000, 12k) or a percentage of the input model (50%%)")
    target_macs: "int | float | str | None" = _option(
        None, "--target-macs", metavar="N",
        help="MAC budget: a number (1.5M) or a percentage of the input model (25%%)")
    epochs: int | None = _option(None, "--epochs", type=int, metavar="N",
                                 help="search epochs (default 100, early stopping)")
    warmup_epochs: int | None = _option(
        None, "--warmup-epochs", type=int, metavar="N",
        help="warm-up epochs (default 100 with early stopping; 0 skips it; distillation: 0)")
    finetune_epochs: int | None = _option(
        None, "--finetune-epochs", type=int, metavar="N",
        help="fine-tune epochs after export (default 100 with early stopping; 0 skips it)")
    labels: str = _option("auto", "--labels", metavar="MODE",
                          help="auto (default), classification, regression or distill (match the input "
                               "model's outputs; the default without y)")
    batch_size: int | None = _option(None, "--batch-size", type=int, metavar="N", help="batch size (default 32)")
    seed: int = _option(0, "--seed", type=int, metavar="N",
                        help="seed of the splits and the shuffling (default 0)")
    checkpoint_dir: "str | os.PathLike | None | bool" = _option(
        None, "--checkpoint-dir", metavar="DIR", help="checkpoint folder (default: OUT.ckpt next to the output)")
    threads: int | None = _option(None, "--threads", type=int, metavar="N",
                                  help="torch CPU threads (default: 1 for small models or a busy machine, "
                                       "else the idle cores)")
    quiet: bool = _option(False, "--quiet", action="store_true", help="no progress bars and no summary")
    progress: bool = _option(True)
    recipe: Recipe | None = _option()
    callback: "Callable[[str, int, dict], None] | None" = _option()

    def __post_init__(self) -> None:
        recipe = self.recipe_with_overrides
        for key in ("search_epochs", "finetune_epochs"):
            if getattr(recipe, key) < 0:
                raise PlinioOnnxError(f"{key.replace('_', ' ')} must not be negative")
        if recipe.batch_size < 1:
            raise PlinioOnnxError("batch size must be at least 1")
        if recipe.warmup_epochs is not None and recipe.warmup_epochs < 0:
            raise PlinioOnnxError("warm-up epochs must not be negative")
        method = self.search_method
        if self.labels not in TASKS:
            raise PlinioOnnxError(f"unknown labels mode {self.labels!r}; choose from {', '.join(TASKS)}")
        if Path(self.output).suffix != ".onnx":
            raise PlinioOnnxError("the output file name must end in .onnx", file=str(self.output))
        self._check_cost(method)

    def _check_cost(self, method: Method) -> None:
        if self.target_params is not None and self.target_macs is not None:
            raise PlinioOnnxError("give at most one of --target-params and --target-macs")
        kind = self.target_kind
        if self.strength is not None and kind:
            raise PlinioOnnxError(f"--strength and --target-{kind} are mutually exclusive")
        if self.strength is not None and (not math.isfinite(float(self.strength)) or float(self.strength) < 0):
            raise PlinioOnnxError(f"--strength must be a non-negative number, got {self.strength!r}")
        if kind and self.cost is not None and self.cost != kind:
            raise PlinioOnnxError(f"--cost {self.cost if isinstance(self.cost, str) else 'callable'} conflicts "
                                  f"with --target-{kind}; the target decides the cost")
        if kind and not method.supports_targets:
            raise PlinioOnnxError(f"--target-{kind} does not apply to --method {method.name}; "
                                  "use --strength (or the default)")
        if (isinstance(self.cost, str) or self.cost is None) and self.cost_name not in BY_NAME \
                and self.cost_name not in method.costs:
            choices = sorted(set(BY_NAME) | set(method.costs))
            raise PlinioOnnxError(f"unknown cost model {self.cost_name!r}; choose from {', '.join(choices)}")

    # -- what the options mean ----------------------------------------------------------------
    @property
    def search_method(self) -> Method:
        return get_method(self.method)

    @property
    def recipe_with_overrides(self) -> Recipe:
        """The recipe with ``epochs``, ``warmup_epochs``, ``finetune_epochs`` and ``batch_size``
        applied (``warmup_epochs`` may still be None: decided by the task)."""
        overrides = {key: value for key, value in (("search_epochs", self.epochs), ("warmup_epochs", self.warmup_epochs),
                                                   ("finetune_epochs", self.finetune_epochs),
                                                   ("batch_size", self.batch_size)) if value is not None}
        return replace(self.recipe or Recipe(), **overrides)

    @property
    def target_kind(self) -> str | None:
        """"params", "macs" or None (no target)."""
        return "params" if self.target_params is not None else "macs" if self.target_macs is not None else None

    @property
    def target_given(self) -> "int | float | str | None":
        """The target as given (a number or a percentage string)."""
        return self.target_params if self.target_kind == "params" else self.target_macs

    @property
    def cost_name(self) -> str:
        """The cost model's name ("custom" for a callable)."""
        if self.target_kind:
            return self.target_kind
        if isinstance(self.cost, str):
            return self.cost
        return "custom" if self.cost is not None else self.search_method.default_cost

    @property
    def cost_fn(self) -> Callable:
        """The cost model itself."""
        if not (isinstance(self.cost, str) or self.cost is None):
            return self.cost
        make = self.search_method.costs.get(self.cost_name)
        return make() if make is not None else BY_NAME[self.cost_name]

    def target_value(self, base_cost: float) -> float | None:
        """The absolute target (a percentage is of ``base_cost``, the input model's cost)."""
        if not self.target_kind:
            return None
        return parse_amount(self.target_given, base_cost, what=f"--target-{self.target_kind}")

    def output_files(self) -> tuple[Path, Path, Path | None]:
        """(report .json, report .md, checkpoint folder or None) for the output path."""
        output = Path(self.output)
        stem = output.with_suffix("") if output.suffix == ".onnx" else output
        if self.checkpoint_dir is False:
            folder = None
        else:
            folder = Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{stem}.ckpt")
        return Path(f"{stem}.report.json"), Path(f"{stem}.report.md"), folder

    def fingerprint(self, recipe: Recipe, target: float | None) -> dict:
        """The options a checkpoint must have been made with to be resumed (epoch budgets may
        change: a phase whose budget changed is redone)."""
        return {"method": self.search_method.name, "cost": self.cost_name, "strength": self.strength,
                "target_kind": self.target_kind, "target": target, "labels": self.labels, "seed": self.seed,
                "batch_size": recipe.batch_size,
                "recipe": {k: v for k, v in asdict(recipe).items() if not k.endswith("_epochs")}}


def cli_arguments() -> list[tuple[tuple[str, ...], dict]]:
    """(flags, argparse keyword arguments) of every option on the command line, in order;
    each argument's ``dest`` is its field's name and its default the field's default."""
    out = []
    for f in fields(OptimizeConfig):
        cli = f.metadata.get("cli")
        if cli is None:
            continue
        kwargs = {key: value for key, value in cli.items() if key != "flags"}
        kwargs["dest"] = f.name
        if f.default is not MISSING:
            kwargs["default"] = f.default
        out.append((cli["flags"], kwargs))
    return out


def config_from_cli(values: dict) -> OptimizeConfig:
    """The config of parsed command-line ``values`` (an argparse namespace's ``vars``)."""
    return OptimizeConfig(**{f.name: values[f.name] for f in fields(OptimizeConfig)
                             if f.metadata.get("cli") is not None and f.name in values})
