"""On-device fine-tuning: ONNX Runtime training artifacts for an exported model.

`training_artifacts` writes what ONNX Runtime's on-device training API
(`onnxruntime.training.api`: ``CheckpointState``, ``Module``, ``Optimizer``) loads:
``training_model.onnx`` (forward, loss and gradients), ``eval_model.onnx`` (forward and loss),
``optimizer_model.onnx`` (AdamW or SGD) and ``checkpoint`` (the parameters). The forward graph is
the deployable model made trainable by `plinio_onnx.training_graph.prepare_for_training`
(BatchNormalization statistics frozen, QDQ quantizers as fake-quant); a searchable checkpoint is
finalized first. The training and eval models return the loss and then the model's outputs, so
an application reads its predictions from the same call; ``Module.export_model_for_inferencing``
writes the fine-tuned inference model.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import PlinioOnnxError
from .graph import IR_VERSION, PLINIO_DOMAIN, Graph
from .load import load
from .training_graph import TrainingGraph, prepare_for_training

#: The loss names accepted, and ORT's loss block for each; the label input they add.
LOSSES = {"cross_entropy": ("CrossEntropyLoss", "labels"), "mse": ("MSELoss", "target"),
          "bce_with_logits": ("BCEWithLogitsLoss", "target"), "l1": ("L1Loss", "target")}
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD"}
#: What ONNX Runtime writes into the artifact folder.
ARTIFACT_NAMES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
_MAX_OPSET = 21


@dataclass(frozen=True)
class TrainingArtifacts:
    """Where the artifacts are, and what trains.

    ``outputs``: the model's outputs (give them to ``Module.export_model_for_inferencing``);
    the training and eval models return ``(loss, *outputs)`` and take the model's inputs and
    then ``label_input``; the loss reads ``loss_output``.
    """

    directory: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    quantized: bool
    outputs: tuple[str, ...]
    loss: str
    loss_output: str
    label_input: str


def training_artifacts(model: "str | os.PathLike | onnx.ModelProto | Graph",
                       directory: "str | os.PathLike", *, loss: str = "cross_entropy",
                       optimizer: str = "adamw", loss_output: str | None = None,
                       frozen: tuple[str, ...] = ()) -> TrainingArtifacts:
    """Write ONNX Runtime on-device training artifacts for ``model`` into ``directory``.

    ``model``: a deployable model or a searchable checkpoint (finalized first), as a path,
    ``ModelProto`` or `Graph`. ``loss``: ``cross_entropy`` (logits N×C, int64 labels N),
    ``mse``, ``bce_with_logits`` or ``l1`` (a float target shaped like the output), applied to
    ``loss_output`` (default: the first graph output). ``optimizer``: ``adamw`` or ``sgd``.
    ``frozen``: weights that should not train. The folder is written as a whole (into a temporary
    sibling, then renamed); an existing folder is replaced only if it holds nothing but earlier
    artifacts.
    """
    if loss not in LOSSES:
        raise PlinioOnnxError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        raise PlinioOnnxError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    directory = Path(directory)
    _check_destination(directory, model)
    graph = deployable_graph(model)
    if graph.opset > _MAX_OPSET:
        raise PlinioOnnxError(f"opset {graph.opset} is above {_MAX_OPSET}, the newest written",
                              file=graph.source)
    prepared = prepare_for_training(graph, frozen=tuple(frozen))
    outputs = tuple(o.name for o in prepared.model.graph.output)
    loss_output = loss_output or outputs[0]
    if loss_output not in outputs:
        raise PlinioOnnxError(f"no graph output named {loss_output!r} (outputs: {', '.join(outputs)})",
                              file=graph.source)
    if not prepared.trainable:
        raise PlinioOnnxError("the model has no float weight that could train", file=graph.source)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _generate(prepared.model, staging, prepared, loss, optimizer, loss_output, outputs, graph.source)
        _settle(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TrainingArtifacts(directory, *(directory / name for name in ARTIFACT_NAMES),
                             trainable=prepared.trainable, frozen=prepared.frozen,
                             quantized=prepared.quantized, outputs=outputs, loss=loss,
                             loss_output=loss_output, label_input=LOSSES[loss][1])


def deployable_graph(model: "str | os.PathLike | onnx.ModelProto | Graph") -> Graph:
    """``model`` as a deployable `Graph`: a searchable checkpoint is finalized (as
    ``plinio-onnx export`` does), a deployable model is loaded as it is."""
    graph = load(model)
    if not _is_searchable(graph):
        return graph
    from .optimize import export_searchable  # the optimize flow is heavy; import it only here
    with tempfile.TemporaryDirectory(prefix="plinio-onnx-export-") as tmp:
        source = Path(model) if isinstance(model, (str, os.PathLike)) else graph.save(Path(tmp) / "searchable.onnx")
        exported, _ = export_searchable(source, Path(tmp) / "deployable.onnx")
    return Graph(exported.gs, source=graph.source, metadata=exported.metadata)


def _is_searchable(graph: Graph) -> bool:
    return any(node.domain == PLINIO_DOMAIN for node in graph.nodes)


def _check_destination(directory: Path, model: object) -> None:
    """The folder may be new, empty, or hold earlier artifacts only; never the input model."""
    if directory.exists() and not directory.is_dir():
        raise PlinioOnnxError("the artifact destination exists and is not a folder", file=str(directory))
    if isinstance(model, (str, os.PathLike)) and Path(model).exists() and directory.exists() \
            and Path(model).resolve().parent == directory.resolve():
        raise PlinioOnnxError("refusing to write the artifacts into the input model's folder; "
                              "choose another folder", file=str(directory))
    if directory.exists():
        others = sorted(p.name for p in directory.iterdir() if p.name not in ARTIFACT_NAMES)
        if others:
            raise PlinioOnnxError(f"the folder holds files that are not training artifacts "
                                  f"({', '.join(others[:5])}); choose a new or empty folder",
                                  file=str(directory))


def _generate(model: onnx.ModelProto, folder: Path, prepared: TrainingGraph, loss: str, optimizer: str,
              loss_output: str, outputs: tuple[str, ...], source: str | None) -> None:
    """Run ORT's artifact generation into ``folder``; its failures as one located error."""
    from onnxruntime.training import artifacts

    try:
        with _native_stderr_discarded():
            artifacts.generate_artifacts(
                model, requires_grad=list(prepared.trainable), frozen_params=list(prepared.frozen),
                loss=getattr(artifacts.LossType, LOSSES[loss][0]),
                optimizer=getattr(artifacts.OptimType, OPTIMIZERS[optimizer]),
                artifact_directory=folder, loss_input_names=[loss_output],
                additional_output_names=list(outputs))
    except Exception as err:  # ORT raises RuntimeError with a C++ location; keep its point
        raise _located(err, source) from None
    for name in ARTIFACT_NAMES[:3]:
        _check_versions(folder / name, source)


@contextlib.contextmanager
def _native_stderr_discarded():
    """ORT's gradient builder logs every graph transformer at info level on the process's
    stderr, whatever the default severity; its failures come back as exceptions anyway."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _located(err: Exception, source: str | None) -> PlinioOnnxError:
    text = " ".join(str(err).split())
    missing = re.search(r"gradient builder has not been registered: (\S+) for node (.*)$", text)
    if missing:
        op, node = missing.group(1), missing.group(2).strip()
        return PlinioOnnxError("ONNX Runtime training cannot differentiate this op; freeze the "
                               "weights before it (frozen=...) or replace the op",
                               file=source, node=node, op=op)
    # drop the C++ location and signature ORT puts before its own words
    reason = re.sub(r"^\S+\.(?:cc|h):\d+ .*?\) (?:const )?", "", text)
    return PlinioOnnxError("ONNX Runtime cannot build the training graph: " + reason[-400:], file=source)


def _check_versions(path: Path, source: str | None) -> None:
    """Artifacts keep IR 10 and the input's opset (ORT copies both); checked, not assumed."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if model.ir_version != IR_VERSION or opset > _MAX_OPSET:
        raise PlinioOnnxError(f"ONNX Runtime wrote IR {model.ir_version} / opset {opset} into "
                              f"{path.name}; expected IR {IR_VERSION}, opset ≤ {_MAX_OPSET}", file=source)


def _settle(staging: Path, directory: Path) -> None:
    """Move the finished folder into place in one rename (earlier artifacts set aside first)."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.rmdir(old)
        os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
