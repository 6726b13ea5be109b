"""Graph passes: each module is one small transformation `Graph -> Graph`.

Installed as ``plinio_onnx.passes``.
"""
from .canonicalize import canonicalize
from .pit import pit
from .prune import prune_channels

__all__ = ["canonicalize", "pit", "prune_channels"]
from .supernet import supernet  # noqa: E402
from .pick import pick_branches  # noqa: E402
__all__ += ["supernet", "pick_branches"]
from .mps import fold_batchnorm, mps  # noqa: E402
from .quantize import fold_quantizers  # noqa: E402
__all__ += ["fold_batchnorm", "fold_quantizers", "mps"]
