"""curvecast's PFN: the model, its output distribution and the inference API."""

from pfn.bar import BarDistribution
from pfn.errors import CurvecastError, CurveError, ModelNotFoundError, WeightsIntegrityError
from pfn.model import PFN, PFNConfig
from pfn.predictor import Curve, Posterior, Predictor

__all__ = [
    "PFN",
    "BarDistribution",
    "Curve",
    "CurveError",
    "CurvecastError",
    "ModelNotFoundError",
    "PFNConfig",
    "Posterior",
    "Predictor",
    "WeightsIntegrityError",
]
