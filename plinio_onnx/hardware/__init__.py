"""Hardware profiles (``po.hardware``): latency and energy models of deployment targets.

    profile = po.hardware.get("gap8")               # or "ne16", "diana", "mpic", "simd-mcu"
    model = po.PIT("model.onnx", cost=profile.cost("latency"))
    po.cost.total(po.load("model.onnx"), profile.cost())   # modelled cycles of the whole model

Your own target: ``HardwareProfile("my-mcu", latency=fn, channel_multiple=8)`` (a function of a
`plinio_onnx.cost.LayerSpec`; `SimdMcu` is a parametrised template), or ``FILE.py:NAME`` where a
name is asked for (``plinio-onnx inspect MODEL --hardware my_target.py:PROFILE``).
``for_model("ort-cpu", MODEL)`` (or ``"openvino-cpu"``) measures the model's layers in that
runtime on this CPU instead (`plinio_onnx.hardware.measured`; a table per model, cached beside
it; ``plinio-onnx profile MODEL --hardware ort-cpu`` makes it ahead of time); ``for_model`` takes
the analytical names too.
"""
from . import measured, rounding
from .diana import diana_latency
from .model_profile import channel_multiple_of, for_model, is_measured, nchwc_block
from .gap8 import gap8_latency
from .measured import LatencyTable, measured_profile, ort_cpu_profile
from .mpic import mpic_energy, mpic_latency
from .ne16 import ne16_latency
from .profile import AtPrecision, HardwareProfile, load_profile
from .registry import Registry, get, names
from .report import hardware_costs
from .simd import SimdMcu

__all__ = ["AtPrecision", "HardwareProfile", "LatencyTable", "Registry", "SimdMcu", "channel_multiple_of", "diana_latency",
           "for_model",
           "gap8_latency", "get", "hardware_costs", "is_measured", "load_profile", "measured", "measured_profile",
           "mpic_energy", "mpic_latency", "names", "nchwc_block", "ne16_latency", "ort_cpu_profile", "rounding"]
