"""The op registry: one handler per ONNX op (and per ``ai.plinio`` function), by opset range.

A handler turns one ONNX node into torch calls at *build* time::

    @register("Relu")
    def relu(ctx: NodeContext):
        return ctx.call(torch.relu, ctx.input(0))

``since`` is the first opset whose semantics the handler implements; the loader picks, for a
graph of opset N, the handler with the largest ``since <= N``. A handler that meets an
attribute combination it cannot express raises `Unsupported` with the reason; the loader
collects every such node of the model before reporting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEFAULT_DOMAINS = ("", "ai.onnx")


class Unsupported(Exception):
    """Raised by a handler for a node whose attributes it cannot express; the message says why."""


@dataclass(frozen=True)
class OpHandler:
    domain: str
    op_type: str
    since: int
    build: Callable


_HANDLERS: dict[tuple[str, str], list[OpHandler]] = {}


def register(*op_types: str, since: int = 1, domain: str = "") -> Callable[[Callable], Callable]:
    """Register ``build`` for ``op_types`` from opset ``since`` on."""

    def decorate(build: Callable) -> Callable:
        for op_type in op_types:
            handlers = _HANDLERS.setdefault((domain, op_type), [])
            if any(h.since == since for h in handlers):
                raise ValueError(f"duplicate handler for {domain or 'ai.onnx'}::{op_type} since {since}")
            handlers.append(OpHandler(domain, op_type, since, build))
            handlers.sort(key=lambda h: h.since)
        return build

    return decorate


def lookup(domain: str, op_type: str, opset: int) -> OpHandler | None:
    """The handler for ``op_type`` at ``opset``, or None."""
    domain = "" if domain in DEFAULT_DOMAINS else domain
    found = None
    for handler in _HANDLERS.get((domain, op_type), ()):
        if handler.since <= opset:
            found = handler
    return found


def supported_ops(domain: str = "") -> list[str]:
    """Op types with at least one registered handler in ``domain``."""
    return sorted(op for (dom, op) in _HANDLERS if dom == domain)
