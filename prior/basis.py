"""Parametric learning-curve basis functions and their parameter priors (Domhan et al. 2015).

Each basis is a vectorised function ``f(x, p) -> (n, m)`` of the epochs ``x`` (shape ``(m,)``)
and a dict of parameter tensors of shape ``(n, 1)``, plus a prior over its parameters given as
a tuple of :class:`ParamPrior`. The parameter priors are those of lcpfn 0.1.3 ("peaked").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Tensor = torch.Tensor
Dist = Literal["uniform", "normal", "lognormal", "exp_uniform", "one_minus_exp_uniform"]


@dataclass(frozen=True)
class ParamPrior:
    """One scalar parameter's prior."""

    name: str  # parameter name as the basis function reads it
    dist: Dist  # uniform: U(a, b); normal: N(a, b); lognormal: exp(N(a, b));
    # exp_uniform: exp(U(a, b)); one_minus_exp_uniform: 1 - exp(U(a, b))
    a: float  # first distribution parameter (low bound or mean)
    b: float  # second distribution parameter (high bound or standard deviation)

    def transform(self, r: Tensor) -> Tensor:
        """Map standard draws (U(0,1) for uniform kinds, N(0,1) otherwise) to this prior."""
        if self.dist in ("normal", "lognormal"):
            z = self.a + self.b * r
            return z.exp() if self.dist == "lognormal" else z
        v = self.a + (self.b - self.a) * r
        if self.dist == "exp_uniform":
            return v.exp()
        if self.dist == "one_minus_exp_uniform":
            return 1.0 - v.exp()
        return v

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        normal = self.dist in ("normal", "lognormal")
        draw = torch.randn if normal else torch.rand
        return self.transform(draw(n, generator=generator, dtype=torch.float64))


@dataclass(frozen=True)
class Basis:
    """A basis curve: its formula and its parameter prior."""

    name: str  # registry name, as in lcpfn
    params: tuple[ParamPrior, ...]  # parameter priors, sampled independently
    fn: Callable[[Tensor, dict[str, Tensor]], Tensor]  # f(x (m,), params (n,1)) -> (n, m)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {p.name: p.sample(n, generator)[:, None] for p in self.params}


def _xpow(x: Tensor, e: Tensor) -> Tensor:
    """x ** e for positive x (m,) and exponents e (n, 1): exp(e * log x), faster than pow."""
    return torch.exp(e * torch.log(x))


def _pow3(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["c"] - p["a"] * _xpow(x, -p["alpha"])


def _ilog2(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["c"] - p["a"] / torch.log(x + 1)


def _janoschek(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["a"] - (p["a"] - p["beta"]) * torch.exp(-p["k"] * _xpow(x, p["delta"]))


def _log_power(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["a"] / (1.0 + (x / p["b"].exp()).pow(p["c"]))


def _weibull(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["alpha"] - (p["alpha"] - p["beta"]) * torch.exp(-(p["kappa"] * x).pow(p["delta"]))


def _mmf(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["alpha"] - (p["alpha"] - p["beta"]) / (1.0 + (p["kappa"] * x).pow(p["delta"]))


def _vap(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return torch.exp(p["a"] + p["b"] / x + p["c"] * torch.log(x))


def _loglog_linear(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return torch.log(p["a"] * torch.log(x) + p["b"])


def _exp4(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["c"] - torch.exp(-p["a"] * x.pow(p["alpha"]) + p["b"])


def _pow4(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    return p["c"] - (p["a"] * x + p["b"]).pow(-p["alpha"])


def _dr_hill(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    xe = x.pow(p["eta"])
    return p["theta"] * xe / (p["kappa"].pow(p["eta"]) + xe)


P = ParamPrior
BASES: dict[str, Basis] = {
    b.name: b
    for b in (
        Basis(
            "pow3",
            (P("a", "uniform", -0.6, 0.6), P("c", "uniform", 0.0, 1.25),
             P("alpha", "lognormal", 0.0, 2.0)),
            _pow3,
        ),
        Basis("ilog2", (P("c", "uniform", 0.0, 1.0), P("a", "uniform", -0.5, 0.5)), _ilog2),
        Basis(
            "janoschek",
            (P("a", "uniform", 0.0, 1.0), P("beta", "uniform", 0.0, 2.0),
             P("k", "lognormal", -2.0, 1.0), P("delta", "lognormal", 0.0, 0.5)),
            _janoschek,
        ),
        Basis(
            "log_power",
            (P("a", "normal", 0.8, 0.1), P("b", "normal", 1.0, 1.0), P("c", "uniform", -3.0, 0.0)),
            _log_power,
        ),
        Basis(
            "weibull",
            (P("alpha", "uniform", 0.0, 1.5), P("beta", "uniform", 0.0, 1.0),
             P("kappa", "lognormal", -2.0, 1.0), P("delta", "lognormal", 0.0, 0.5)),
            _weibull,
        ),
        Basis(
            "mmf",
            (P("alpha", "normal", 0.8, 0.1), P("beta", "normal", 0.2, 0.1),
             P("kappa", "lognormal", 0.0, 2.0), P("delta", "lognormal", 0.0, 1.0)),
            _mmf,
        ),
        Basis(
            "vap",
            (P("a", "uniform", -2.0, 0.0), P("b", "uniform", -4.0, 0.0),
             P("c", "exp_uniform", -8.0, 0.0)),
            _vap,
        ),
        Basis(
            "loglog_linear",
            (P("a", "lognormal", -2.0, 1.0), P("b", "exp_uniform", 0.0, 1.0)),
            _loglog_linear,
        ),
        Basis(
            "exp4",
            (P("c", "normal", 0.8, 0.1), P("a", "lognormal", -2.0, 1.0),
             P("alpha", "lognormal", 0.0, 1.0), P("b", "lognormal", 0.0, 0.5)),
            _exp4,
        ),
        Basis(
            "pow4",
            (P("c", "one_minus_exp_uniform", -5.0, 0.0), P("a", "lognormal", -3.0, 2.0),
             P("alpha", "lognormal", 0.0, 1.0), P("b", "exp_uniform", 0.0, 1.0)),
            _pow4,
        ),
        Basis(
            "dr_hill",
            (P("theta", "normal", 0.8, 0.1), P("eta", "lognormal", 1.0, 1.0),
             P("kappa", "lognormal", 1.0, 2.0)),
            _dr_hill,
        ),
    )
}
