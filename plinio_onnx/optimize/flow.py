"""The optimization flow behind ``plinio-onnx optimize``: warm-up → search → export → fine-tune.

PLiNIO's recommended recipe (``docs/methods.md``, "Training flow") on an ONNX model and an ``.npz``
dataset, with nothing but the model, the data, an output path and (optionally) a cost target::

    report = optimize("model.onnx", "data.npz", output="small.onnx", target_params="50%")

1. **Data** (`plinio_onnx.optimize.data`). ``x`` (or one array per graph input, named after it)
   and optional ``y``. The tool holds out its own splits with a fixed seed: a test split (20 %)
   that no phase ever sees, and a validation split (20 % of the rest) for early stopping and
   architecture selection; class labels are split stratified. The task is inferred
   (``labels="auto"``): classification when ``y`` is integer and the model outputs ``[N, K, ...]``
   with ``K > max(y)``, else regression (MSE); without ``y`` the pruned model is distilled from
   the input model's outputs (MSE).
2. **Warm-up** (`plinio_onnx.optimize.plain`). Plain training of the input model (SGD lr 0.01,
   momentum 0.9, wd 1e-4, early stopping on the validation loss; the untouched input model
   competes as "epoch 0", so an already trained model is not spoiled). Skipped in distillation
   mode, where the input model *is* the teacher.
3. **Search** (`plinio_onnx.optimize.search_phase`). The method's searchable model
   (``method="pit"``: `plinio_onnx.PIT`) with two Adam optimizers: weights (lr 1e-3, wd 1e-4)
   and architecture parameters (wd 0; lr 5e-4 or more, scaled so a mask can cross its threshold
   within a fraction of the epoch budget). Both step on every training batch with
   ``task loss + regularizer``:

   * ``strength=S``: ``S · cost`` (PLiNIO's regularizer); by default ``S = L0 / C0``, the
     warmed-up model's validation loss over its cost;
   * a target (``target_params`` / ``target_macs``, absolute or ``"50%"`` of the input model):
     ``λ · max(0, cost − 0.97·T) / target`` against a *moving* target ``T`` that goes
     geometrically from the input model's cost to the target over the first 40 % of the search
     (gradual pruning; `plinio_onnx.optimize.control`). ``λ`` (first value: the warmed-up
     validation loss) is raised geometrically on every step whose discrete cost — the exported
     model's — is above ``T`` and relaxed while it is below; masks move together under Adam, so
     when many cross the threshold at once, the ones nearest to it are re-kept until the cost is
     back at ``0.95·T`` (no collapse past the schedule, no budget left unused). After the ramp
     both learning rates anneal (cosine), so the architecture freezes and the weights converge.
     Among the epochs whose discrete cost meets the target, the one with the best validation
     metric is kept (its searchable graph is the checkpoint). Should none meet it, the model is
     forced onto the target (PIT: the channels with the smallest masks are pruned).

   Deliberate difference from PLiNIO's notebook: the architecture parameters step on the
   training batches too (not on the validation split), so the validation split stays an
   unbiased judge for early stopping and for picking the architecture.
4. **Export + fine-tune.** ``model.export()`` → the deployable graph, fine-tuned with the warm-up
   recipe, written atomically to ``output``.
5. **Report** (`plinio_onnx.optimize.report`). Cost (params, MACs) and the test metric before
   (warmed-up input model) and after (the written file, run in ONNX Runtime), the kept channels
   per layer, per-phase summaries; ``OUT.report.json`` and ``OUT.report.md`` next to the output.
   The input and the output file are timed alternately in ONNX Runtime (and OpenVINO when
   installed; `plinio_onnx.optimize.measure`, off with ``measure_latency=False``), and SVG plots
   of the layers before/after and of the search trajectory are drawn beside the report
   (`plinio_onnx.optimize.plots`).

Every completed epoch is checkpointed in ``checkpoint_dir`` (default ``OUT.ckpt/``;
`plinio_onnx.optimize.checkpoint`): the ONNX graphs (the searchable one in the search phase),
optimizer state as ``.npz`` and a small ``state.json``; rerunning the same command resumes from
the last completed epoch.

The run computes on ``device`` (`plinio_onnx.optimize.distributed`); under ``torchrun`` every
rank trains on its share of the batches with DistributedDataParallel and only rank 0 writes the
checkpoint, the output and the report (the other ranks return the same `Report`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any
from pathlib import Path

import numpy as np
import onnx
import torch

from ..cost import macs as macs_cost
from ..cost import params as params_cost
from ..cost import total as cost_total
from ..atomic import check_writable, remove_stale_temporaries
from ..errors import OutputError, PlinioOnnxError
from ..graph import Graph
from ..hardware import for_model, is_measured
from ..load import load
from ..sync import sync
from ..to_torch import to_torch
from .checkpoint import Checkpoint, dumps, fingerprint
from .config import OptimizeConfig, Recipe
from .data import Problem, split_ort_scores
from .distributed import Distributed, start
from .lock import RunLock
from .latency_loop import LatencyCheck, latency_check, measure_for, on_main, round_notes
from .latency_multiple import choose_multiple
from .monotone import monotone_table
from .measure import latency_target_notes, measure_latency
from .methods import Method, method_of_checkpoint
from .plain import train_plain
from .plots import PLOTS, write_plots
from .progress import Progress
from .bits_report import quantization_report
from .report import Report, layer_rows
from .search_phase import search
from .sources import DataSources, load_problem
from .targets import (COST_OF_TARGET, Budget, budgets, cost_ref, exported_cost, format_cost, graph_cost,
                      method_for_targets, within_target)
from .training import Run, choose_threads, evaluate

__all__ = ["baseline", "export_searchable", "optimize"]


def optimize(model: "str | os.PathLike", data: "str | os.PathLike | dict[str, np.ndarray] | None" = None,
             config: OptimizeConfig | None = None, /, *, train=None, val=None, test=None, **options) -> Report:
    """Optimize ``model`` on ``data`` and write the deployable result to ``output``.

    ``data``: an ``.npz``, a dict of arrays, or a folder of shards / memory-mapped ``.npy`` arrays
    (`plinio_onnx.optimize.shards`), split by the tool; or none, and ``train=`` / ``val=`` (and
    optionally ``test=``) torch ``Dataset`` or ``DataLoader`` objects (`plinio_onnx.optimize.datasets`).

    The options are `OptimizeConfig`'s, given as keywords (``output=`` is required) or as a
    config (keywords then override its fields), e.g.
    ``optimize("m.onnx", "d.npz", output="small.onnx", target_params="50%")``.
    Returns the `Report`, also written as ``OUT.report.json`` / ``OUT.report.md``.
    """
    config = replace(config, **options) if config is not None else OptimizeConfig(**options)
    previous = torch.get_num_threads()
    dist = start(config.device)
    try:
        return _optimize(model, DataSources(data, train, val, test), config, dist)
    finally:
        torch.set_num_threads(previous)
        dist.close()


@dataclass
class _Base:
    """The input model's costs, and the run's cost targets."""

    params: int
    macs: int
    cost: float             # in the primary cost model of the run (the first target's with targets)
    target: float | None    # the first target, absolute
    min_cost: float | None  # the cheapest architecture the method reaches (first target's cost)
    cost_ref: Any = None    # the primary cost model
    budgets: list[Budget] = field(default_factory=list)   # every target
    refs: dict = field(default_factory=dict)              # every target's cost model, by kind

    @property
    def targets(self) -> dict[str, float]:
        """The absolute targets by kind (empty: none)."""
        return {budget.kind: budget.value for budget in self.budgets}


def _optimize(model: "str | os.PathLike", data: DataSources, config: OptimizeConfig, dist: Distributed) -> Report:
    started = time.perf_counter()
    method = method_for_targets(config.search_method, config.targets)
    model_path, output = Path(model), Path(config.output)
    _check_output(model_path, output, config)
    dist.barrier()   # every rank has probed the folders before rank 0 tidies them
    torch.manual_seed(config.seed)
    recipe = config.recipe_with_overrides
    problem = load_problem(model_path, data, config.labels, config.seed, recipe.test_fraction, recipe.val_fraction)
    measure = measure_for(config, problem, model_path)
    base, method, multiple_note = _base_costs(problem.base, config, method, model_path,
                                              measure and on_main(dist, measure))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world) or 1)
    torch.set_num_threads(choose_threads(config.threads, base.macs, recipe.batch_size, local_processes))
    if recipe.warmup_epochs is None:
        recipe = replace(recipe, warmup_epochs=0 if problem.task.kind == "distill" else 100)
    report_json, report_md, folder = config.output_files()
    lock = RunLock(folder / "lock" if folder else output.parent / f".{output.name}.lock") if dist.is_main \
        else contextlib.nullcontext()
    with lock:
        if dist.is_main:
            remove_stale_temporaries(output.parent, {output.name, report_json.name, report_md.name,
                                                     *(f"{output.stem}.{kind}.svg" for kind in PLOTS)})
        ckpt, bar = _open_checkpoint(config, model_path, problem, recipe, base.targets or None, dist.is_main)
        dist.barrier()   # rank 0 has opened the checkpoint before anyone trains
        run = Run(recipe, problem.task, problem.train, problem.val, ckpt, bar, config.seed, config.callback,
                  dist=dist, amp=config.amp)
        try:
            check = latency_check(config, base.budgets, measure)
            warmed, searched, final, phases = _phases(run, method, problem.base, config, base, check)
        finally:
            bar.stop()
        _dump_state(dist, searched, final)
        devices = dist.gather(str(dist.device))

        def write() -> Report:
            _save_output(final, model_path, output, base, phases["search"])
            report = _report(config, method, model_path, problem, base, warmed, final, phases, ckpt, started)
            report.notes += [multiple_note] if multiple_note else []
            report.world_size, report.devices, report.amp = dist.world, devices, config.amp
            _measures_and_plots(report, config, model_path, output, problem)
            report.write(report_json, report_md)
            return report

        report = _on_main(dist, write)
    if not config.quiet and dist.is_main:
        report.print()
    return report


def _on_main(dist: Distributed, write) -> Report:
    """``write()`` on rank 0 (writing the output and its report); every rank returns the report
    (the other ranks rebuild it from its JSON form), or raises rank 0's error."""
    report, outcome = None, None
    try:
        if dist.is_main:
            report = write()
            outcome = ["ok", json.loads(dumps(report.to_json(), indent=None)) if dist.enabled else None]
    except Exception as err:
        dist.broadcast(["error", f"{type(err).__name__}: {err}"])
        raise
    status, value = dist.broadcast(outcome)
    if status == "error":
        raise PlinioOnnxError(f"rank 0 failed to write the output ({value})")
    return report if report is not None else Report(**value)


def _dump_state(dist: Distributed, searched, final: Graph) -> None:
    """This rank's final state (`Distributed.dump_state`, for comparing ranks): the chosen
    searchable model's state, its architecture (as JSON text) and the final graph's weights."""
    arrays = {f"search/{k}": v.detach().cpu().numpy() for k, v in searched.state_dict().items()}
    arrays.update({f"final/{k}": np.asarray(v.values) for k, v in final.initializers().items()})
    arrays["architecture"] = np.array(dumps(searched.architecture(), indent=None))
    dist.dump_state(arrays)


def _check_output(model_path: Path, output: Path, config: OptimizeConfig) -> None:
    if model_path.exists() and output.exists() and os.path.samefile(model_path, output):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(output))
    if output.is_dir():
        raise PlinioOnnxError("the output path is a folder", file=str(output))
    folder = config.output_files()[2]
    for what, place in (("output", output.parent), ("checkpoint", folder)):
        if place is None:
            continue
        if place.exists() and not place.is_dir():
            raise OutputError(f"the {what} folder is a file", file=str(place))
        try:   # now, not after all the training
            check_writable(place)
        except OSError as err:
            raise OutputError(f"cannot write the {what} folder ({err.strerror or err}); choose another "
                              f"{'-o' if what == 'output' else '--checkpoint-dir'}", file=str(place)) from None


def _base_costs(graph: Graph, config: OptimizeConfig, method: Method, model_path: Path,
                measure=None) -> tuple[_Base, Method, str | None]:
    """The input model's costs and the absolute targets (an impossible target fails here), the
    method (its channel multiple chosen for a latency target on a measured profile, when none
    was given: `plinio_onnx.optimize.latency_multiple`, with ``measure`` timing exports in the
    runtime) and the report's note on that choice."""
    params, macs = cost_total(graph, params_cost), cost_total(graph, macs_cost)
    profile = _hardware_profile(config, model_path) if config.hardware else None
    note = None
    if config.channel_multiple is None and "latency" in config.targets and is_measured(config.hardware) \
            and method.searches_channels:
        choice = choose_multiple(graph, method, config.targets, profile,
                                 lambda multiple: _hardware_profile(config, model_path, multiple), measure)
        method, profile, note = choice.method, choice.profile, choice.note
    if is_measured(config.hardware):
        # The search reads the table's monotone envelope (noise-robust); the block was chosen on
        # the table as measured (its off-block entries are what `block_penalty` judges).
        profile = dataclasses.replace(profile, latency=monotone_table(profile.latency))
    refs = {kind: cost_ref(COST_OF_TARGET[kind], method=method, profile=profile) for kind in config.targets}
    found = budgets(config.targets, graph, method, refs, profile)
    if found:
        first = found[0]
        return _Base(params, macs, first.base, first.value, first.min_reachable, first.ref, found, refs), method, note
    primary = cost_ref(config.cost_name, method=method, profile=profile, custom=config.cost)
    return _Base(params, macs, graph_cost(graph, primary), None, None, primary), method, note


def _hardware_profile(config: OptimizeConfig, model_path: Path, multiple: int | None = None):
    """``--hardware``'s profile for this model (on blocks of ``multiple``, default the config's);
    a measured one times the model's layers now when no table as fine is cached beside it (with
    a progress bar)."""
    bar = Progress(config.progress and not config.quiet)

    def progress(done: int, total: int, layer: str) -> None:
        if done == 0:
            bar.note(f"timing {model_path.name}'s layers in {config.hardware} on blocks of "
                     f"{multiple or config.resolved_channel_multiple} channels (once: the table is cached "
                     "beside the model)")
            bar.start("profile", total)
        bar.epoch(done, layer)

    try:
        return for_model(config.hardware, model_path, channel_multiple=multiple or config.resolved_channel_multiple,
                         progress=progress)
    finally:
        bar.stop()


def _open_checkpoint(config: OptimizeConfig, model_path: Path, problem: Problem, recipe: Recipe,
                     target: float | None, main: bool = True) -> tuple[Checkpoint, Progress]:
    """The run's checkpoint (resumed when the same command made it) and progress display (on
    rank 0 of a data-parallel run; the other ranks only read the checkpoint and stay quiet)."""
    folder = config.output_files()[2]
    ckpt = Checkpoint(folder, fingerprint(model_path, *problem.identity, config.fingerprint(recipe, target)),
                      writer=main)
    ckpt.open()
    dropped = ckpt.keep_budgets({"warmup": recipe.warmup_epochs, "search": recipe.search_epochs,
                                 "finetune": recipe.finetune_epochs})
    ckpt.resumed = bool(ckpt.state["phases"])
    bar = Progress(main and config.progress and not config.quiet, notes=main and not config.quiet)
    if dropped:
        bar.note(f"epoch budget changed: redoing {', '.join(dropped)}")
    if ckpt.discarded:
        bar.note(f"[yellow]checkpoint in {folder} was made by another command; starting over[/yellow]")
    elif ckpt.resumed:
        bar.note(f"resuming from {folder}")
    return ckpt, bar


def _phases(run: Run, method: Method, graph: Graph, config: OptimizeConfig, base: _Base,
            check: LatencyCheck | None = None):
    """Warm-up, search (measured against a latency target with ``check``), export and fine-tune:
    (the warmed-up graph, the chosen searchable model, the final graph, phase summaries)."""
    warmed, warm_info = train_plain(run, "warmup", graph, run.recipe.warmup_epochs)
    searched, search_info = search(run, method, warmed, base.cost_ref, config.strength, base.targets or None,
                                   base.cost, refs=base.refs, regularizer=config.regularizer_name, check=check)
    exported = searched.export(int4=config.int4)
    if method.finetune_export:
        final, fine_info = train_plain(run, "finetune", exported, run.recipe.finetune_epochs)
    else:
        final, fine_info = exported, {"epochs": 0, "note": "trained during the search (quantized)"}
    return warmed, searched, final, {"warmup": warm_info, "search": search_info, "finetune": fine_info}


def _save_output(final: Graph, model_path: Path, output: Path, base: _Base, search_info: dict) -> None:
    for budget in base.budgets:
        final_cost = exported_cost(final, budget.ref, search_info.get("costs", {}).get(budget.kind, 0.0))
        if not within_target(final_cost, budget.value):
            raise PlinioOnnxError(f"internal error: the exported model's {budget.kind} ({format_cost(final_cost)}) "
                                  f"exceeds the target ({format_cost(budget.value)}); nothing was written")
    final.source = str(model_path)   # save() then refuses to overwrite the input model
    final.save(output)


def _measures_and_plots(report: Report, config: OptimizeConfig, model_path: Path, output: Path,
                        problem: Problem) -> None:
    """What the report measures (the input and the output timed alternately in ONNX Runtime, and
    OpenVINO when installed; unless ``measure_latency`` is off) and draws (SVG files beside it)."""
    if config.measure_latency:
        sample = (problem.test or problem.val).head(8)[0]   # a few samples; the first feeds each model
        report.measured_latency = measure_latency(model_path, output, problem.input_names,
                                                  [t.cpu().numpy() for t in sample])
        report.notes += latency_target_notes(report.constraints, report.measured_latency, config.hardware)
    report.files.update(write_plots(report, output.with_suffix("")))


def _report(config: OptimizeConfig, method: Method, model_path: Path, problem: Problem, base: _Base,
            warmed: Graph, final: Graph, phases: dict, ckpt: Checkpoint, started: float) -> Report:
    """The report: costs and test metrics (in ONNX Runtime) before and after, layers, phases."""
    model, output = str(model_path), str(Path(config.output))
    report_json, report_md, folder = config.output_files()

    def ort_scores(proto: onnx.ModelProto, source: str) -> dict[str, float]:
        return split_ort_scores(proto, problem.test, problem.task, problem.input_names, source=source)

    before_test = ort_scores(warmed.to_onnx(), model)
    after_test = ort_scores(onnx.load(output), output)
    search_info = phases["search"]
    files = {"output": output, "report_json": str(report_json), "report_md": str(report_md)}
    if ckpt.enabled:
        files["checkpoint_dir"] = str(folder)
        if search_info.get("best_file"):
            files["searchable_checkpoint"] = str(folder / search_info["best_file"])
    target = None
    if base.target is not None:
        target = {"kind": config.target_kind, "value": base.target, "given": str(config.target_given),
                  "min_reachable": base.min_cost}
    constraints = []
    for budget in base.budgets:
        after = exported_cost(final, budget.ref, search_info.get("costs", {}).get(budget.kind, 0.0))
        constraints.append({**budget.to_json(), "target": budget.value, "before": budget.base, "after": after,
                            "met": within_target(after, budget.value)})
    return Report(
        model=model, output=output, method=method.name, task=problem.task.kind, metric=problem.task.metric,
        cost=config.cost_name, target=target, strength=search_info.get("strength"),
        splits={"train": len(problem.train), "val": len(problem.val), "test": len(problem.test) if problem.test is not None else 0},
        before={"params": int(base.params), "macs": int(base.macs), "test": before_test},
        after={"params": int(cost_total(final, params_cost)), "macs": int(cost_total(final, macs_cost)),
               "test": after_test},
        layers=layer_rows(problem.base, final), architecture=search_info.pop("architecture", {}),
        phases=phases, seed=config.seed, resumed=ckpt.resumed, seconds=time.perf_counter() - started, files=files,
        notes=[note for note in (problem.data_note, problem.shapes_note) if note]
        + round_notes(search_info.get("latency_rounds", []), config.hardware or "",
                      next((b.unit for b in base.budgets if b.kind == "latency"), "")),
        channel_multiple=method.options.get("channel_multiple"), constraints=constraints,
        regularizer=config.regularizer_name, quantization=quantization_report(problem.base, final))


def baseline(model: "str | os.PathLike", data, *, epochs: int, seed: int = 0, labels: str = "auto",
             batch_size: int | None = None, recipe: Recipe | None = None, threads: int | None = None) -> dict:
    """The unpruned model trained "the same way" for comparison (benchmarks).

    The warm-up recipe (SGD) for ``epochs`` epochs without early stopping, on the splits
    `optimize` makes for the same ``seed``. ``test_by_epoch[e]`` is the test metric (in ONNX
    Runtime) of the checkpoint with the best validation loss among epochs 0..e — what early
    stopping with that budget would deliver.
    """
    recipe = recipe or Recipe()
    if batch_size:
        recipe = replace(recipe, batch_size=batch_size)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    problem = load_problem(model, DataSources(data), labels, seed, recipe.test_fraction, recipe.val_fraction)
    task = problem.task
    graph = problem.base.copy()
    module = to_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    run = Run(recipe, task, problem.train, problem.val, Checkpoint(None, ""), Progress(False), seed)

    def test_metric() -> dict:
        sync(graph, module)
        return split_ort_scores(graph.to_onnx(), problem.test, task, problem.input_names, source=None)

    best_loss = evaluate(module, problem.val, task)["loss"]
    best_test = test_metric()
    by_epoch = [best_test[task.metric]]
    for epoch in range(1, epochs + 1):
        run.train_epoch("warmup", module, [optimizer], epoch, epochs)
        loss = evaluate(module, problem.val, task)["loss"]
        if loss < best_loss:
            best_loss, best_test = loss, test_metric()
        by_epoch.append(best_test[task.metric])
    return {"metric": task.metric, "test_by_epoch": by_epoch, "test": best_test,
            "params": cost_total(problem.base, params_cost), "macs": cost_total(problem.base, macs_cost)}


def export_searchable(searchable: "str | os.PathLike", output: "str | os.PathLike", **options) -> tuple[Graph, str]:
    """A searchable checkpoint (e.g. ``OUT.ckpt/search.best.onnx``) → the deployable model at
    ``output``; returns it and the method's name. ``options``: `plinio_onnx.finalize`'s
    (``format="qdq"|"qonnx"``, ``int4="off"|"auto"|"on"``)."""
    path, output = Path(searchable), Path(output)
    if output.suffix != ".onnx":
        raise PlinioOnnxError("the output file name must end in .onnx", file=str(output))
    if path.exists() and output.exists() and os.path.samefile(path, output):
        raise PlinioOnnxError("refusing to overwrite the input model; choose another output path",
                              file=str(output))
    graph = load(path)
    method = method_of_checkpoint(graph)
    if method is None:
        raise PlinioOnnxError("not a searchable checkpoint (no search metadata); give a file written by "
                              "'plinio-onnx optimize' (OUT.ckpt/search.best.onnx) or PIT.searchable_graph().save()",
                              file=str(path))
    return method.build(graph, "params").export(output, **options), method.name
