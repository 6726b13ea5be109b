"""Paired timing: measure two step functions alternately in one run, report the ratio of medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def paired_ratio(candidate: Callable[[], None], baseline: Callable[[], None], *,
                 rounds: int = 15, steps: int = 5, warmup: int = 3,
                 clock: Callable[[], float] = time.perf_counter) -> dict:
    """Alternate ``rounds`` blocks of ``steps`` calls of each; ratio = median(candidate)/median(baseline).

    Alternating (A B A B …) spreads the noise of a shared machine over both sides. ``clock``:
    wall time by default; `time.thread_time` counts only the CPU time of the calling thread (for
    single-threaded work that runs in it: the time other processes took the core is not counted).
    """
    for _ in range(warmup):
        candidate()
        baseline()
    times_c, times_b = [], []
    for r in range(rounds):
        order = (candidate, baseline) if r % 2 == 0 else (baseline, candidate)
        for fn in order:
            start = clock()
            for _ in range(steps):
                fn()
            elapsed = (clock() - start) / steps
            (times_c if fn is candidate else times_b).append(elapsed)
    med_c, med_b = statistics.median(times_c), statistics.median(times_b)
    return {"candidate_ms": med_c * 1e3, "baseline_ms": med_b * 1e3, "ratio": med_c / med_b}


def sgd_training_step(module, x, y):
    """A closure running one classification training step (SGD with momentum) of ``module``."""
    import torch

    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    module.train()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step
