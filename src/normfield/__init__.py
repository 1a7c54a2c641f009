"""normfield: mean-field predictions and JAX measurements of per-layer gradient norms of
randomly initialized Transformers, for any placement of their normalization layers.

Public API::

    predict_grad_norms(depth, placement="pre", **arch_fields) -> GradProfile   # theory
    predict(arch) -> GradProfile
    predict_activations(depth, placement="pre", **arch_fields) -> dict
    measure_grad_norms(arch, seeds=16, key=0, precision="float32") -> GradProfile  # probe
"""

from normfield.arch import Arch, Init
from normfield.placements import PLACEMENTS
from normfield import presets
from normfield.probe.measure import NonFiniteGradientError, measure_grad_norms
from normfield.profile import GradProfile
from normfield.theory.predict import predict, predict_activations, predict_grad_norms

__all__ = ["Arch", "Init", "PLACEMENTS", "GradProfile", "measure_grad_norms",
           "NonFiniteGradientError", "predict", "predict_grad_norms", "predict_activations",
           "presets"]
__version__ = "0.1.0"
