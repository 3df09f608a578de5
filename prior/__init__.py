"""Synthetic learning-curve priors: pure, seeded, vectorised samplers."""

from prior.basis import BASES, Basis, ParamPrior
from prior.core import (
    DOMHAN_COMPONENTS,
    LCPFN_COMPONENTS,
    PRIORS,
    CurveBatch,
    CurvePrior,
    get_prior,
    sample_cutoffs,
)

__all__ = [
    "BASES",
    "DOMHAN_COMPONENTS",
    "LCPFN_COMPONENTS",
    "PRIORS",
    "Basis",
    "CurveBatch",
    "CurvePrior",
    "ParamPrior",
    "get_prior",
    "sample_cutoffs",
]
