"""`to_torch`: the round-trip loader from a `Graph` to a trainable ``torch.nn.Module``."""
from . import ops  # noqa: F401  (fills the registry)
from .builder import OnnxModule, to_torch
from .context import NodeContext
from .fuse_pit_masks import fuse_pit_masks
from .registry import Unsupported, lookup, register, supported_ops

__all__ = ["OnnxModule", "NodeContext", "Unsupported", "fuse_pit_masks", "lookup", "register", "supported_ops",
           "to_torch"]
