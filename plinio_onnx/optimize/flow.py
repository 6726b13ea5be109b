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

Every completed epoch is checkpointed in ``checkpoint_dir`` (default ``OUT.ckpt/``;
`plinio_onnx.optimize.checkpoint`): the ONNX graphs (the searchable one in the search phase),
optimizer state as ``.npz`` and a small ``state.json``; rerunning the same command resumes from
the last completed epoch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
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
from ..load import load
from ..sync import sync
from ..to_torch import to_torch
from .checkpoint import Checkpoint, fingerprint
from .config import OptimizeConfig, Recipe
from .data import Problem, ort_outputs, prepare, task_scores
from .lock import RunLock
from .methods import Method, method_of_checkpoint
from .plain import train_plain
from .progress import Progress
from .report import Report, layer_rows
from .search_phase import search
from .training import Run, choose_threads, evaluate

__all__ = ["baseline", "export_searchable", "optimize"]


def optimize(model: "str | os.PathLike", data: "str | os.PathLike | dict[str, np.ndarray]",
             config: OptimizeConfig | None = None, /, **options) -> Report:
    """Optimize ``model`` on ``data`` and write the deployable result to ``output``.

    The options are `OptimizeConfig`'s, given as keywords (``output=`` is required) or as a
    config (keywords then override its fields), e.g.
    ``optimize("m.onnx", "d.npz", output="small.onnx", target_params="50%")``.
    Returns the `Report`, also written as ``OUT.report.json`` / ``OUT.report.md``.
    """
    config = replace(config, **options) if config is not None else OptimizeConfig(**options)
    previous = torch.get_num_threads()
    try:
        return _optimize(model, data, config)
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Base:
    """The input model's costs, and the run's cost target."""

    params: int
    macs: int
    cost: float             # in the cost model of the run (the target's kind with a target)
    target: float | None    # absolute
    min_cost: float | None  # the cheapest architecture the method reaches (with a target)


def _optimize(model: "str | os.PathLike", data, config: OptimizeConfig) -> Report:
    started = time.perf_counter()
    method = config.search_method
    model_path, output = Path(model), Path(config.output)
    _check_output(model_path, output, config)
    torch.manual_seed(config.seed)
    recipe = config.recipe_with_overrides
    problem = prepare(model_path, data, config.labels, config.seed, recipe.test_fraction, recipe.val_fraction)
    base = _base_costs(problem.base, config, method)
    torch.set_num_threads(choose_threads(config.threads, base.macs, recipe.batch_size))
    if recipe.warmup_epochs is None:
        recipe = replace(recipe, warmup_epochs=0 if problem.task.kind == "distill" else 100)
    report_json, report_md, folder = config.output_files()
    with RunLock(folder / "lock" if folder else output.parent / f".{output.name}.lock"):
        remove_stale_temporaries(output.parent, {output.name, report_json.name, report_md.name})
        ckpt, bar = _open_checkpoint(config, model_path, data, problem, recipe, base.target)
        run = Run(recipe, problem.task, problem.train, problem.val, ckpt, bar, config.seed, config.callback)
        try:
            warmed, final, phases = _phases(run, method, problem.base, config, base)
        finally:
            bar.stop()
        _save_output(final, model_path, output, config, base.target)
        report = _report(config, method, model_path, problem, base, warmed, final, phases, ckpt, started)
        report.write(report_json, report_md)
    if not config.quiet:
        report.print()
    return report


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


def _base_costs(graph: Graph, config: OptimizeConfig, method: Method) -> _Base:
    """The input model's costs and the absolute target; an impossible target fails here."""
    params, macs = cost_total(graph, params_cost), cost_total(graph, macs_cost)
    kind = config.target_kind
    cost = float(cost_total(graph, config.cost_fn)) if kind is None else float(params if kind == "params" else macs)
    target = config.target_value(cost)
    min_cost = None
    if target is not None:
        min_cost = method.build(graph, config.cost_fn).min_cost(config.cost_fn)
        if min_cost is not None and target < min_cost - 1e-6:
            raise PlinioOnnxError(f"target {kind} {target:,.0f} is below the smallest architecture "
                                  f"{method.name} can reach ({min_cost:,.0f} {kind}: one channel "
                                  "per searched layer, unsearched layers whole)")
    return _Base(params, macs, cost, target, min_cost)


def _open_checkpoint(config: OptimizeConfig, model_path: Path, data, problem: Problem, recipe: Recipe,
                     target: float | None) -> tuple[Checkpoint, Progress]:
    """The run's checkpoint (resumed when the same command made it) and progress display."""
    folder = config.output_files()[2]
    ckpt = Checkpoint(folder, fingerprint(model_path, data, problem.arrays, config.fingerprint(recipe, target)))
    ckpt.open()
    dropped = ckpt.keep_budgets({"warmup": recipe.warmup_epochs, "search": recipe.search_epochs,
                                 "finetune": recipe.finetune_epochs})
    ckpt.resumed = bool(ckpt.state["phases"])
    bar = Progress(config.progress and not config.quiet, notes=not config.quiet)
    if dropped:
        bar.note(f"epoch budget changed: redoing {', '.join(dropped)}")
    if ckpt.discarded:
        bar.note(f"[yellow]checkpoint in {folder} was made by another command; starting over[/yellow]")
    elif ckpt.resumed:
        bar.note(f"resuming from {folder}")
    return ckpt, bar


def _phases(run: Run, method: Method, graph: Graph, config: OptimizeConfig, base: _Base
            ) -> tuple[Graph, Graph, dict]:
    """Warm-up, search, export and fine-tune: (the warmed-up graph, the final graph, phase summaries)."""
    warmed, warm_info = train_plain(run, "warmup", graph, run.recipe.warmup_epochs)
    searched, search_info = search(run, method, warmed, config.cost_fn, config.strength, base.target, base.cost)
    exported = searched.export(int4=config.int4)
    if method.finetune_export:
        final, fine_info = train_plain(run, "finetune", exported, run.recipe.finetune_epochs)
    else:
        final, fine_info = exported, {"epochs": 0, "note": "trained during the search (quantized)"}
    return warmed, final, {"warmup": warm_info, "search": search_info, "finetune": fine_info}


def _save_output(final: Graph, model_path: Path, output: Path, config: OptimizeConfig, target: float | None) -> None:
    final_cost = float(cost_total(final, config.cost_fn))
    if target is not None and final_cost > target + 1e-6:
        raise PlinioOnnxError(f"internal error: the exported model's {config.target_kind} ({final_cost:,.0f}) "
                              f"exceed the target ({target:,.0f}); nothing was written")
    final.source = str(model_path)   # save() then refuses to overwrite the input model
    final.save(output)


def _report(config: OptimizeConfig, method: Method, model_path: Path, problem: Problem, base: _Base,
            warmed: Graph, final: Graph, phases: dict, ckpt: Checkpoint, started: float) -> Report:
    """The report: costs and test metrics (in ONNX Runtime) before and after, layers, phases."""
    model, output = str(model_path), str(Path(config.output))
    report_json, report_md, folder = config.output_files()

    def ort_scores(proto: onnx.ModelProto, source: str) -> dict[str, float]:
        outs = ort_outputs(proto, problem.input_names, problem.test_inputs, source=source)
        return task_scores(problem.task, [torch.from_numpy(o) for o in outs], problem.test.target)

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
    return Report(
        model=model, output=output, method=method.name, task=problem.task.kind, metric=problem.task.metric,
        cost=config.cost_name, target=target, strength=search_info.get("strength"),
        splits={"train": len(problem.train), "val": len(problem.val), "test": len(problem.test)},
        before={"params": int(base.params), "macs": int(base.macs), "test": before_test},
        after={"params": int(cost_total(final, params_cost)), "macs": int(cost_total(final, macs_cost)),
               "test": after_test},
        layers=layer_rows(problem.base, final), architecture=search_info.pop("architecture", {}),
        phases=phases, seed=config.seed, resumed=ckpt.resumed, seconds=time.perf_counter() - started, files=files,
        notes=[problem.shapes_note] if problem.shapes_note else [])


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
    problem = prepare(model, data, labels, seed, recipe.test_fraction, recipe.val_fraction)
    task = problem.task
    graph = problem.base.copy()
    module = to_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    run = Run(recipe, task, problem.train, problem.val, Checkpoint(None, ""), Progress(False), seed)

    def test_metric() -> dict:
        sync(graph, module)
        outs = ort_outputs(graph.to_onnx(), problem.input_names, problem.test_inputs, source=None)
        return task_scores(task, [torch.from_numpy(o) for o in outs], problem.test.target)

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
