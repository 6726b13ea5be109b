"""plinio-onnx test zoo: reference models (``models.zoo``), ONNX export
(``models/export.py``) and the 8x8 digits dataset (``models.digits``)."""
