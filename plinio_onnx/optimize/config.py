"""The options of one `optimize` run, spelled once: `OptimizeConfig` (validated on construction)
and the training `Recipe`. `po.optimize`, the ``optimize`` command line (its flags and help come
from the fields' metadata) and the checkpoint's fingerprint all read them from here.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cost import BY_NAME
from ..errors import PlinioOnnxError
from .data import TASKS
from .distributed import check_device_name
from .methods import Method, default_channel_multiple, get_method
from .targets import (COST_OF_TARGET, HARDWARE_COSTS, MEMORY_COST, REGULARIZERS, TARGET_KINDS, method_target_kinds,
                      parse_amount)

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

    ``method``: "pit", "mps", "qat", "pit+mps", "supernet", "supernet+pit" or "odimo". ``cost``:
    the cost model of the regularizer (a name of `plinio_onnx.cost`, a cost of the method's own
    (ODiMO's "latency"), "latency" / "energy" of the
    ``hardware`` profile, "peak_memory", or a callable on a `LayerSpec`; with targets, the first
    target's). Targets — ``target_params``, ``target_macs``, ``target_size`` (bytes),
    ``target_latency`` (on ``hardware``), ``target_memory`` (peak activation bytes) — are met
    together (`plinio_onnx.optimize.targets`); each is an absolute number or a percentage string
    of the input model's cost (a size also ``"25%int8"``). ``regularizer``: "constraint" (the
    default with targets), "duccio" or "linear" (the default without; ``strength``, which
    excludes targets).
    ``epochs`` is the search budget; ``warmup_epochs`` / ``finetune_epochs`` those of the other
    phases (0 skips a phase). ``checkpoint_dir=False`` disables checkpoints.
    ``callback(phase, epoch, info)`` is called after every completed (and checkpointed) epoch
    (under torchrun on every rank, with the same ``info``).
    ``threads``: torch CPU threads during the run (default: 1 for small models or a busy machine,
    else the idle cores). ``device``: "auto", "cpu", "cuda" or "cuda:N"; ``amp``: mixed precision
    in the forward pass. Neither is part of a checkpoint's fingerprint: a run searched on one
    device (or number of processes) resumes on another.
    ``measure_latency``: time the input and the output model in ONNX
    Runtime (and OpenVINO) after the run, for the report (`plinio_onnx.optimize.measure`).
    ``latency_rounds``: with a latency target on a measured profile (and ``measure_latency``), the
    most rounds of searching on against a tighter target while the search's choice measures over
    the target in the runtime (`plinio_onnx.optimize.latency_loop`).
    Invalid combinations raise `PlinioOnnxError` on construction.
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
    target_size: "int | float | str | None" = _option(
        None, "--target-size", metavar="N",
        help="model size budget in bytes (weights at their bit-widths, 32-bit biases): a number "
             "(20k), a percentage of the float model (25%%) or of the uniform int8 model (25%%int8)")
    target_latency: "int | float | str | None" = _option(
        None, "--target-latency", metavar="N",
        help="latency budget on --hardware (in the profile's unit) or a percentage of the input model (60%%)")
    target_memory: "int | float | str | None" = _option(
        None, "--target-memory", metavar="N",
        help="peak activation memory budget in bytes (float32 activations; a quantizing method's chosen "
             "bit-widths, 8 elsewhere) or a percentage of the input model (50%%)")
    hardware: str | None = _option(
        None, "--hardware", metavar="NAME",
        help="hardware profile of the latency cost (gap8, ne16, diana, mpic, simd-mcu, ort-cpu, FILE.py:NAME)")
    regularizer: str | None = _option(
        None, "--regularizer", metavar="NAME",
        help="linear (strength*cost; the default without targets), constraint (adaptive strengths against "
             "moving targets; the default with targets) or duccio (strengths from the warm-up loss, ramped)")
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
    batch_size: int | None = _option(None, "--batch-size", type=int, metavar="N",
                                     help="batch size (default 32); under torchrun, per process")
    channel_multiple: int | None = _option(
        None, "--channel-multiple", type=int, metavar="N",
        help="PIT keeps every pruned layer's channels a multiple of N (pit, pit+mps, supernet+pit; "
             "default 8: pruned models stay on ONNX Runtime's fast kernels; 1: channel by channel)")
    seed: int = _option(0, "--seed", type=int, metavar="N",
                        help="seed of the splits and the shuffling (default 0)")
    checkpoint_dir: "str | os.PathLike | None | bool" = _option(
        None, "--checkpoint-dir", metavar="DIR", help="checkpoint folder (default: OUT.ckpt next to the output)")
    threads: int | None = _option(None, "--threads", type=int, metavar="N",
                                  help="torch CPU threads (default: 1 for small models or a busy machine, "
                                       "else the idle cores)")
    device: str = _option("auto", "--device", metavar="DEV",
                          help="where the search computes: auto (default: a CUDA GPU when torch sees one, "
                               "else the CPU), cpu, cuda or cuda:N; under torchrun, cuda is each rank's GPU")
    amp: bool = _option(False, "--amp", action="store_true",
                        help="automatic mixed precision for the forward pass (float16 with gradient "
                             "scaling on CUDA, bfloat16 on the CPU); costs and architecture parameters "
                             "stay float32/float64")
    int4: str = _option("off", "--int4", metavar="MODE",
                        help="QDQ weights of layers that chose <= 4 bits: off (default: int8 containers, "
                             "read by every compiler), auto (INT4 where the model's opset is >= 21), on "
                             "(INT4, raising the opset to 21)")
    quiet: bool = _option(False, "--quiet", action="store_true", help="no progress bars and no summary")
    measure_latency: bool = _option(True, "--no-measure", action="store_false",
                                    help="do not time the input and the output in ONNX Runtime (and OpenVINO "
                                         "when installed) for the report")
    latency_rounds: int = _option(
        2, "--latency-rounds", type=int, metavar="N",
        help="with --target-latency on a measured profile (ort-cpu, openvino-cpu): measure the search's "
             "choice in that runtime and, while it measures over the target, search on against a tighter "
             "predicted target, at most N rounds (default 2; 0: trust the prediction)")
    progress: bool = _option(True)
    recipe: Recipe | None = _option()
    callback: "Callable[[str, int, dict], None] | None" = _option()

    def __post_init__(self) -> None:
        recipe = self.recipe_with_overrides
        for key in ("search_epochs", "finetune_epochs"):
            if getattr(recipe, key) < 0:
                raise PlinioOnnxError(f"{key.replace('_', ' ')} must not be negative")
        if isinstance(self.latency_rounds, bool) or not isinstance(self.latency_rounds, (int, np.integer)) \
                or self.latency_rounds < 0:
            raise PlinioOnnxError(f"--latency-rounds must be a non-negative integer, got {self.latency_rounds!r}")
        if recipe.batch_size < 1:
            raise PlinioOnnxError("batch size must be at least 1")
        if recipe.warmup_epochs is not None and recipe.warmup_epochs < 0:
            raise PlinioOnnxError("warm-up epochs must not be negative")
        self._check_channel_multiple(get_method(self.method))
        method = self.search_method
        if self.labels not in TASKS:
            raise PlinioOnnxError(f"unknown labels mode {self.labels!r}; choose from {', '.join(TASKS)}")
        if Path(self.output).suffix != ".onnx":
            raise PlinioOnnxError("the output file name must end in .onnx", file=str(self.output))
        if self.int4 not in ("off", "auto", "on"):
            raise PlinioOnnxError(f"--int4 {self.int4!r}: choose from off, auto, on")
        self._check_cost(method)
        check_device_name(self.device)

    def _check_channel_multiple(self, method: Method) -> None:
        value = self.channel_multiple
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PlinioOnnxError(f"--channel-multiple must be a positive integer (1: channel by channel), "
                                  f"got {value!r}")
        if value > 1 and not method.searches_channels:
            raise PlinioOnnxError(f"--channel-multiple applies to methods that search channels (pit, pit+mps, "
                                  f"supernet+pit), not to --method {method.name}")

    def _check_cost(self, method: Method) -> None:
        targets = self.targets
        regularizer = self.regularizer_name
        if regularizer not in REGULARIZERS:
            raise PlinioOnnxError(f"unknown regularizer {self.regularizer!r}; choose from {', '.join(REGULARIZERS)}")
        if self.strength is not None and targets:
            raise PlinioOnnxError(f"--strength and --target-{next(iter(targets))} are mutually exclusive")
        if self.strength is not None and (not math.isfinite(float(self.strength)) or float(self.strength) < 0):
            raise PlinioOnnxError(f"--strength must be a non-negative number, got {self.strength!r}")
        if regularizer == "linear" and targets:
            raise PlinioOnnxError(f"--regularizer linear takes no target (--target-{next(iter(targets))}): it "
                                  "weighs one cost with --strength; use --regularizer constraint or duccio")
        if regularizer != "linear" and not targets:
            raise PlinioOnnxError(f"--regularizer {regularizer} needs at least one target "
                                  f"({', '.join('--target-' + k for k in TARGET_KINDS)})")
        if targets and self.cost is not None and self.cost_name_given not in {COST_OF_TARGET[k] for k in targets}:
            raise PlinioOnnxError(f"--cost {self.cost_name_given} conflicts with "
                                  f"{', '.join('--target-' + k for k in targets)}; the targets decide the costs")
        for kind in targets:
            if kind not in method_target_kinds(method):
                allowed = method_target_kinds(method)
                raise PlinioOnnxError(f"--target-{kind} does not apply to --method {method.name}"
                                      + (f" (it searches nothing that moves it; targets: "
                                         f"{', '.join('--target-' + k for k in allowed)})" if allowed else
                                         "; use --strength (or the default)"))
        if self.hardware and "latency" in method.costs:
            raise PlinioOnnxError(f"--hardware does not apply to --method {method.name}: its latency is the "
                                  "model of the accelerators it maps onto (DIANA's digital and analog units)")
        needs_hardware = any(kind in targets or self.cost_name == kind
                             for kind in HARDWARE_COSTS if kind not in method.costs)
        if needs_hardware and not self.hardware:
            raise PlinioOnnxError("--target-latency and --cost latency|energy need --hardware NAME "
                                  "(a hardware profile: gap8, ne16, diana, mpic, simd-mcu, ...)")
        known = set(BY_NAME) | set(HARDWARE_COSTS) | {MEMORY_COST} | set(method.costs)
        if (isinstance(self.cost, str) or self.cost is None) and self.cost_name not in known:
            raise PlinioOnnxError(f"unknown cost model {self.cost_name!r}; choose from {', '.join(sorted(known))}")

    # -- what the options mean ----------------------------------------------------------------
    @property
    def search_method(self) -> Method:
        """The method, building its models with `resolved_channel_multiple`."""
        return get_method(self.method).with_channel_multiple(self.resolved_channel_multiple)

    @property
    def resolved_channel_multiple(self) -> int:
        """``channel_multiple``; when it is None, the hardware profile's, or without one
        `default_channel_multiple`."""
        if self.channel_multiple is not None:
            return int(self.channel_multiple)
        if self.hardware:
            from ..hardware import channel_multiple_of   # the profile's, known without measuring
            return channel_multiple_of(self.hardware)
        return default_channel_multiple()

    @property
    def recipe_with_overrides(self) -> Recipe:
        """The recipe with ``epochs``, ``warmup_epochs``, ``finetune_epochs`` and ``batch_size``
        applied (``warmup_epochs`` may still be None: decided by the task)."""
        overrides = {key: value for key, value in (("search_epochs", self.epochs), ("warmup_epochs", self.warmup_epochs),
                                                   ("finetune_epochs", self.finetune_epochs),
                                                   ("batch_size", self.batch_size)) if value is not None}
        return replace(self.recipe or Recipe(), **overrides)

    @property
    def targets(self) -> dict[str, "int | float | str"]:
        """The targets given, by kind ("params", "macs", "size", "latency", "memory"), as given
        (numbers or percentage strings), in that order."""
        given = {"params": self.target_params, "macs": self.target_macs, "size": self.target_size,
                 "latency": self.target_latency, "memory": self.target_memory}
        return {kind: value for kind, value in given.items() if value is not None}

    @property
    def target_kind(self) -> str | None:
        """The first target's kind (the run's primary cost), or None (no target)."""
        return next(iter(self.targets), None)

    @property
    def target_given(self) -> "int | float | str | None":
        """The first target as given (a number or a percentage string)."""
        return self.targets.get(self.target_kind) if self.target_kind else None

    @property
    def regularizer_name(self) -> str:
        """"linear", "constraint" or "duccio": as given, else constraint with targets, linear without."""
        if self.regularizer is not None:
            return str(self.regularizer).lower()
        return "constraint" if self.targets else "linear"

    @property
    def cost_name_given(self) -> str:
        return self.cost if isinstance(self.cost, str) else "custom"

    @property
    def cost_name(self) -> str:
        """The primary cost model's name ("custom" for a callable): with targets, the first
        target's cost."""
        if self.target_kind:
            return COST_OF_TARGET[self.target_kind]
        if isinstance(self.cost, str):
            return self.cost
        return "custom" if self.cost is not None else self.search_method.default_cost

    @property
    def cost_fn(self) -> Callable:
        """The primary cost model itself, when it needs no hardware profile or model (else see
        `plinio_onnx.optimize.targets.cost_ref`)."""
        if isinstance(self.cost, str) or self.cost is None:
            make = self.search_method.costs.get(self.cost_name)   # a method's own (ODiMO's latency)
            if make is not None:
                return make()
            if self.cost_name not in BY_NAME:
                raise PlinioOnnxError(f"cost {self.cost_name!r} is resolved by the optimize flow "
                                      "(plinio_onnx.optimize.targets.cost_ref)")
            return BY_NAME[self.cost_name]
        return self.cost

    def target_value(self, base_cost: float) -> float | None:
        """The absolute first target (a percentage is of ``base_cost``, the input model's cost)."""
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

    def fingerprint(self, recipe: Recipe, target: "float | dict[str, float] | None") -> dict:
        """The options a checkpoint must have been made with to be resumed (epoch budgets may
        change: a phase whose budget changed is redone). ``target``: the absolute targets by kind
        (or the one target's value). One params or MACs target under the default regularizer
        hashes as earlier releases did, so their checkpoints resume."""
        targets = target if isinstance(target, dict) else ({self.target_kind: target} if self.target_kind else {})
        first = targets.get(self.target_kind) if self.target_kind else None
        options = {"method": self.search_method.name, "cost": self.cost_name, "strength": self.strength,
                   "target_kind": self.target_kind, "target": first, "labels": self.labels, "seed": self.seed,
                   "batch_size": recipe.batch_size,
                   "recipe": {k: v for k, v in asdict(recipe).items() if not k.endswith("_epochs")}}
        legacy = (len(targets) <= 1 and set(targets) <= {"params", "macs"} and self.regularizer is None
                  and not self.hardware)
        if not legacy:
            options.update(targets=dict(targets), regularizer=self.regularizer_name, hardware=self.hardware)
        # A channel multiple given (other than 1) needs a checkpoint made with it; without one, a
        # checkpoint resumes with the channel blocks its PIT record holds (those of earlier
        # releases: channel by channel), so the fingerprints they wrote still match.
        if self.channel_multiple not in (None, 1):
            options["channel_multiple"] = int(self.channel_multiple)
        return options


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
