"""The pass interface: what every graph pass declares, and how passes run in sequence.

After onnx-ir's pass infrastructure (our own code): a pass is a small object whose `call`
returns a `PassResult` — the graph and whether the pass changed it. Calling the pass (``p(graph)``)
checks its contract around `call`:

* ``in_place``: an `InPlacePass` edits the graph it is given and returns that very graph; a
  `FunctionalPass` leaves its input untouched and returns a new graph. A pass that breaks its
  declaration raises `PassContractError`.
* `requires(graph)` / `ensures(graph)`: cheap pre- and postconditions; they raise (any error),
  and the failure comes out as `PreconditionError` / `PostconditionError` naming the pass.

`Sequential` runs passes in order; when one fails it says which passes had run before it. The
public functions of `plinio_onnx.passes` (``pit``, ``mps``, ``supernet``, …) are thin wrappers
that build the pass from their options and return its graph.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from plinio_onnx.errors import PassError, PlinioOnnxError
from plinio_onnx.graph import Graph

__all__ = ["ConsumingPass", "FunctionalPass", "InPlacePass", "Pass", "PassContractError", "PassResult", "PostconditionError",
           "PreconditionError", "Sequential"]


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the resulting ``graph`` and whether the pass ``modified`` it."""

    graph: Graph
    modified: bool


class PreconditionError(PassError):
    """A pass's `requires` failed: the graph is not what the pass accepts."""


class PostconditionError(PassError):
    """A pass's `ensures` failed: the pass did not deliver what it guarantees."""


class PassContractError(PassError):
    """A pass broke its declared contract (in place vs. a new graph)."""


class Pass(abc.ABC):
    """One graph transformation; options go to the constructor, the graph to the call."""

    #: True: edits its input and returns it; False: returns a new graph, its input untouched.
    in_place: bool

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, graph: Graph) -> None:
        """Precondition: raise when ``graph`` is not what this pass accepts."""

    def ensures(self, graph: Graph) -> None:
        """Postcondition: raise when the result does not hold what this pass guarantees."""

    @abc.abstractmethod
    def call(self, graph: Graph) -> PassResult:
        """Transform ``graph`` (in place or into a new graph, as declared)."""

    def __call__(self, graph: Graph) -> PassResult:
        _checked(self, self.requires, graph, PreconditionError, "precondition")
        result = self.call(graph)
        if not isinstance(result, PassResult):
            raise PassContractError(f"pass {self.name} returned {type(result).__name__}, not a PassResult",
                                    file=graph.source)
        if self.in_place and result.graph is not graph:
            raise PassContractError(f"pass {self.name} is declared in place but returned a new graph",
                                    file=graph.source)
        if not self.in_place and (result.graph is graph or result.graph.gs is graph.gs):
            raise PassContractError(f"pass {self.name} is declared functional but returned its input graph",
                                    file=graph.source)
        _checked(self, self.ensures, result.graph, PostconditionError, "postcondition")
        return result


class InPlacePass(Pass):
    """A pass that edits the graph it is given (and returns it)."""

    in_place = True


class FunctionalPass(Pass):
    """A pass that returns a new graph and leaves its input unchanged."""

    in_place = False


class ConsumingPass(InPlacePass):
    """A finalizing pass that consumes one search record (`plinio_onnx.records`): on a graph
    without it, it changes nothing; otherwise it `apply`-s the record and removes it."""

    record: ClassVar[type]

    def call(self, graph: Graph) -> PassResult:
        info = self.record.of(graph)
        if info is None:
            return PassResult(graph, False)
        self.apply(graph, info)
        self.record.discard(graph)
        return PassResult(graph, True)

    @abc.abstractmethod
    def apply(self, graph: Graph, info: Any) -> None:
        """Edit ``graph`` in place as its record ``info`` says."""


def _checked(pass_: Pass, check, graph: Graph, error: type[PassError], what: str) -> None:
    try:
        check(graph)
    except PlinioOnnxError as err:
        raise error(f"{what} of pass {pass_.name} failed: {err.message}", file=err.file or graph.source,
                    node=err.node, op=err.op) from err
    except Exception as err:  # a check is plain code: any failure is the condition failing
        raise error(f"{what} of pass {pass_.name} failed: {type(err).__name__}: {err}",
                    file=graph.source) from err


class Sequential(Pass):
    """Passes run one after another; modified when any of them modified the graph. In place only
    when every pass is. A failure names the pass and those that ran before it (as a note on the
    error, so its one-line message stays the pass's own)."""

    def __init__(self, passes: Sequence[Pass], *, name: str = "Sequential") -> None:
        self.passes = list(passes)
        self._name = name
        self.in_place = all(p.in_place for p in self.passes)

    @property
    def name(self) -> str:
        return self._name

    def call(self, graph: Graph) -> PassResult:
        modified, ran = False, []
        for step in self.passes:
            try:
                result = step(graph)
            except Exception as err:
                where = f"{self.name}: pass {step.name} failed after " + (", ".join(ran) or "no other pass")
                if isinstance(err, PlinioOnnxError):
                    err.add_note(where)
                    err.passes_run = tuple(ran)
                    raise
                raise PassError(f"{where}: {type(err).__name__}: {err}", file=graph.source) from err
            ran.append(step.name)
            graph, modified = result.graph, modified or result.modified
        return PassResult(graph, modified)
