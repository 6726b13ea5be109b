"""The warm-up and fine-tune phases: plain training (SGD) with early stopping on the validation
loss, checkpointed every epoch; the model as it was competes as "epoch 0"."""
from __future__ import annotations

import time

import torch

from ..graph import Graph
from ..sync import sync
from ..to_torch import to_torch
from .checkpoint import load_optimizer, optimizer_arrays, parameter_names
from .training import Run, state_of, values_from_graph

__all__ = ["train_plain"]


def train_plain(run: Run, phase: str, graph: Graph, epochs: int) -> tuple[Graph, dict]:
    """Train a copy of ``graph`` for at most ``epochs`` epochs; returns the graph with the best
    validation loss's values and the phase's summary. A finished phase is read back from the
    checkpoint, an unfinished one continues from its last epoch."""
    rec = run.ckpt.phase(phase)
    if rec.get("done"):
        return run.ckpt.load_graph(rec["result_file"]), rec["info"]
    return _PlainPhase(run, phase, graph, epochs, rec).train()


class _PlainPhase:
    """One warm-up or fine-tune: the module, its optimizer and the best epoch so far."""

    def __init__(self, run: Run, phase: str, graph: Graph, epochs: int, rec: dict) -> None:
        self.run = run
        self.phase = phase
        self.epochs = epochs
        self.t0 = time.perf_counter()
        self.graph = run.ckpt.load_graph(rec["current_file"]) if rec else graph.copy()
        self.module = run.place(to_torch(self.graph))
        r = run.recipe
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=r.lr, momentum=r.momentum,
                                         weight_decay=r.weight_decay)
        self.names = parameter_names(self.module)
        if rec:
            self._resume(rec)
        else:
            self._start()

    def _resume(self, rec: dict) -> None:
        ckpt = self.run.ckpt
        load_optimizer(self.optimizer, ckpt.load_arrays(rec["optim_file"]), self.names)
        self.best_state = values_from_graph(self.module, ckpt.load_graph(rec["best_file"]))
        self.epoch, self.best_epoch = rec["epoch"], rec["best_epoch"]
        self.best_loss, self.best_scores = rec["best_loss"], rec["best_scores"]
        self.initial = rec["initial"]
        self.elapsed = rec.get("seconds", 0.0)
        self.rec = rec

    def _start(self) -> None:
        self.initial = self.run.evaluate(self.module)
        self.epoch, self.best_epoch = 0, 0
        self.best_loss, self.best_scores = self.initial["loss"], self.initial
        self.best_state = state_of(self.module)
        self.elapsed = 0.0
        self.rec = {"initial": self.initial,
                    "best_file": self.run.ckpt.save_graph(self.graph, f"{self.phase}-e0000.onnx")}

    def train(self) -> tuple[Graph, dict]:
        run = self.run
        run.bar.start(self.phase, self.epochs, self.epoch)
        stopped = "budget"
        while self.epoch < self.epochs:
            if self.epoch - self.best_epoch >= run.recipe.patience:
                stopped = "early"
                break
            self.epoch += 1
            self._train_one_epoch()
        self.module.load_state_dict(self.best_state)
        sync(self.graph, self.module)
        metric = run.task.metric
        info = {"epochs": self.epoch, "best_epoch": self.best_epoch, "val_loss": self.best_loss,
                "val_metric": self.best_scores[metric], "initial_val_loss": self.initial["loss"],
                "initial_val_metric": self.initial[metric], "stopped": stopped if self.epochs else "skipped",
                "seconds": self.elapsed + time.perf_counter() - self.t0}
        result_file = run.ckpt.save_graph(self.graph, f"{self.phase}.result.onnx")
        run.commit(self.phase, {"done": True, "result_file": result_file, "info": info, "budget": self.epochs})
        run.bar.stop()
        return self.graph, info

    def _train_one_epoch(self) -> None:
        run, phase, epoch = self.run, self.phase, self.epoch
        run.train_epoch(phase, self.module, [self.optimizer], epoch, self.epochs)
        scores = run.evaluate(self.module)
        improved = scores["loss"] < self.best_loss
        if improved:
            self.best_epoch, self.best_loss, self.best_scores = epoch, scores["loss"], scores
            self.best_state = state_of(self.module)
        sync(self.graph, self.module)
        current_file = run.ckpt.save_graph(self.graph, f"{phase}-e{epoch:04d}.onnx")
        if improved:
            self.rec["best_file"] = current_file
        optim_file = run.ckpt.save_arrays(optimizer_arrays(self.optimizer, self.names), f"{phase}-e{epoch:04d}.optim.npz")
        self.rec.update(epoch=epoch, best_epoch=self.best_epoch, best_loss=self.best_loss,
                        best_scores=self.best_scores, current_file=current_file, optim_file=optim_file,
                        seconds=self.elapsed + time.perf_counter() - self.t0)
        run.commit(phase, self.rec)
        run.bar.epoch(epoch, run.info(scores))
        run.epoch_done(phase, epoch, {"val": scores})
