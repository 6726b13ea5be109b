"""Progress of an `optimize` run: a rich progress bar per phase on stderr."""
from __future__ import annotations

__all__ = ["Progress"]


class Progress:
    """A rich progress bar per phase on stderr (only on a terminal), and notes on stderr (on a
    terminal or not, so logs keep "resuming from …"); ``notes`` defaults to ``enabled``."""

    def __init__(self, enabled: bool, notes: bool | None = None) -> None:
        self.enabled = enabled
        self.notes = enabled if notes is None else notes
        self.progress = None
        self.task = None
        if enabled or self.notes:
            from rich.console import Console
            self.console = Console(stderr=True)
            self.enabled = enabled and self.console.is_terminal

    def start(self, description: str, total: int, done: int = 0) -> None:
        """A new bar for a phase of ``total`` epochs, ``done`` of them already completed."""
        if not self.enabled:
            return
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress
        self.stop()
        self.progress = RichProgress(TextColumn("[bold]{task.description:<9}"), BarColumn(bar_width=28),
                                     TextColumn("epoch {task.fields[epoch]}/{task.total:.0f}"),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(description, total=max(total, 1), completed=done,
                                           epoch=done, info="")

    def step(self, completed: float) -> None:
        """Within an epoch: ``completed`` epochs (fractional)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=completed)

    def epoch(self, epoch: int, info: str) -> None:
        """Epoch ``epoch`` is complete; ``info``: its validation figures."""
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, epoch=epoch, info=info)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def note(self, message: str) -> None:
        """A line of rich markup on stderr (unless notes are off)."""
        if self.notes:
            self.console.print(message, soft_wrap=True, highlight=False)   # one line in logs
