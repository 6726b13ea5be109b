"""Op handlers, one module per family; importing this package fills the registry."""
from . import elementwise, nn, quantize, reduce, tensor  # noqa: F401
from ... import functions as _functions  # noqa: F401  (ai.plinio handlers)
from ...functions import pit as _pit  # noqa: F401
from ...functions import supernet as _supernet  # noqa: F401
from ...functions import mps as _mps  # noqa: F401
