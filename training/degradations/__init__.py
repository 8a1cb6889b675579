"""Online Real-ESRGAN degradation for training (kernels, noise, JPEG, parameter sets)."""

from .params import PRESETS, DegradationParams, get_preset
from .pipeline import DegradedBatch, RealESRGANDegrader

__all__ = ["PRESETS", "DegradationParams", "DegradedBatch", "RealESRGANDegrader", "get_preset"]
