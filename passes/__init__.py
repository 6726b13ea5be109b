"""Graph passes: each module is one small transformation of a `plinio_onnx.Graph`.

Installed as ``plinio_onnx.passes``. Every pass follows `plinio_onnx.passes.infra` (in place or
functional, a `PassResult`, checked pre- and postconditions); the functions below are thin
wrappers that return the resulting graph. Search passes (pit, mps, odimo, supernet) insert
``ai.plinio`` functions and leave a typed record (`plinio_onnx.records`); finalizing passes
(pick, prune, the ODiMO split, quantize with its QDQ / QONNX writers and zero-bit slicing) run in the order
`plinio_onnx.finalize` writes.
"""
from .canonicalize import canonicalize
from .infra import FunctionalPass, InPlacePass, Pass, PassResult, Sequential
from .mps import FoldBatchNorm, MPSPass, fold_batchnorm, mps
from .odimo import ODiMOPass, odimo
from .odimo_split import SplitAccelerators, split_accelerators
from .pick import PickBranches, pick_branches
from .pit import PITPass, pit
from .prune import PruneChannels, prune_channels
from .quantize import FoldQuantizers, fold_quantizers
from .supernet import SuperNetPass, supernet
from .zero_bit import SliceZeroBitChannels

__all__ = ["FoldBatchNorm", "FoldQuantizers", "FunctionalPass", "InPlacePass", "MPSPass", "ODiMOPass", "PITPass", "Pass",
           "PassResult", "PickBranches", "PruneChannels", "Sequential", "SliceZeroBitChannels", "SplitAccelerators", "SuperNetPass",
           "canonicalize", "fold_batchnorm", "fold_quantizers", "mps", "odimo", "pick_branches", "pit",
           "prune_channels", "split_accelerators", "supernet"]
