"""What each compiler accepts: the documented exceptions to "compiles and matches ONNX Runtime".

`README.md`'s table "What each compiler accepts" states the same; the tests assert both ways:
a case listed here must fail with the compiler's own message (so the table cannot go stale),
every other case must compile and match ONNX Runtime, and the README must quote each message
(`test_readme_table.py`).
"""
from __future__ import annotations

# (compiler, case id) → a piece of the compiler's own error message
COMPILER_REFUSALS: dict[tuple[str, str], str] = {
    ("tvm", "digits_cnn-qat4-qdq-int4_on"): "unknown dtype `(numpy.int8, [('int4', 'i1')])`",
    ("iree", "digits_cnn-qat4-qdq-int4_on"): "failed to legalize operation 'torch.operator' that was explicitly "
                                             "marked illegal",
}
