"""Errors that name the place: the file, the node and its op, and what to do."""
from __future__ import annotations


class PlinioOnnxError(Exception):
    """Base error of plinio-onnx; its message is one readable line.

    ``file``, ``node`` and ``op`` locate the problem; the CLI prints ``str(error)`` and nothing
    more, so the message must stand on its own.
    """

    def __init__(self, message: str, *, file: str | None = None, node: str | None = None,
                 op: str | None = None) -> None:
        self.message = message
        self.file = file
        self.node = node
        self.op = op
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.node is not None or self.op is not None:
            where.append(f"node {self.node!r} ({self.op})" if self.node is not None else f"op {self.op}")
        return (": ".join(where) + ": " if where else "") + self.message


class ModelLoadError(PlinioOnnxError):
    """The file is missing, is not ONNX, is truncated, or fails the checker."""


class UnsafeExternalDataError(ModelLoadError):
    """External data points outside the model's folder."""


class UnsupportedOpError(PlinioOnnxError):
    """The model uses ops the loader has no handler for; lists every one of them."""

    def __init__(self, problems: list[tuple[str, str, str]], *, file: str | None = None) -> None:
        # problems: (node name, op type, reason)
        self.problems = problems
        listed = "; ".join(f"{name!r} ({op}): {why}" for name, op, why in problems)
        ops = sorted({op for _, op, _ in problems})
        super().__init__(f"{len(problems)} unsupported node(s) [{', '.join(ops)}]: {listed}", file=file)


class PassError(PlinioOnnxError):
    """A pass's precondition or postcondition failed."""


class RegularizerError(PlinioOnnxError):
    """A regularizer was given inconsistent costs, targets or strengths."""


class SettingError(PlinioOnnxError, ValueError):
    """A search setting out of its range: a non-positive temperature, an unknown sampling."""


class NonFiniteError(PlinioOnnxError):
    """NaN or infinity in weights, data, outputs or a loss; the message says where."""


class DataError(PlinioOnnxError):
    """A data file the tool cannot use (not an .npz, wrong arrays, wrong shapes)."""


class CheckpointError(PlinioOnnxError):
    """A checkpoint folder the tool cannot use: damaged files, or held by another run."""


class OutputError(PlinioOnnxError):
    """An output path the tool cannot write."""
