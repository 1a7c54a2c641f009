"""normfield: mean-field predictions and JAX measurements of per-layer gradient norms of
randomly initialized Transformers, for any placement of their normalization layers."""

from normfield.arch import Arch, Init
from normfield.placements import PLACEMENTS
from normfield.profile import GradProfile

__all__ = ["Arch", "Init", "PLACEMENTS", "GradProfile"]
__version__ = "0.1.0"
