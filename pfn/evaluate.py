"""Evaluation: the paper's prior protocol and real curve files, with two baselines.

A *case* is one curve cut after ``c`` observed points; every later point is a query. Metrics per
(source, cutoff, method), all in the normalised units of the curve file (``y``, higher is
better) or of the prior:

* ``log_likelihood``: per case, the mean over its query points of the predictive log-density of
  the observed (noisy) value; then the mean over cases (the paper's measure).
* ``mae_final`` / ``rmse_final``: error of the predicted mean at the case's last point.
* ``coverage_50`` / ``coverage_90``: share of all query points inside the central 50% / 90%
  predictive interval; ``above_90``: the share above it (about 0.05 for a calibrated method:
  more means the method underestimates how far curves still rise, less that it overestimates).

Baselines: ``last_value`` — N(last observed value, 0.05²) at every later point; ``power_law``
— least-squares fit of ``y = a - b * t^(-c)`` (c on a grid of 40 values in [0.05, 3], a and b
in closed form for each c), N(fit, s²) with s the fit's residual std, floored at 0.01.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pfn.errors import CurvecastError
from pfn.model import PFN

PRIOR_CUTOFFS = (10, 20, 40, 80)
FRACTIONS = (0.1, 0.2, 0.4, 0.8)
LAST_VALUE_SIGMA = 0.05
_Z = {0.5: NormalDist().inv_cdf(0.75), 0.9: NormalDist().inv_cdf(0.95)}


def prior_log_likelihood(model: PFN, y: Tensor, cutoff: int, batch: int = 1024,
                         decay: Tensor | None = None) -> Tensor:
    """Per-curve mean log-density of the noisy values after ``cutoff`` (paper protocol).

    y: (n, m) noisy prior curves over epochs 1..m; the first ``cutoff`` epochs are observed;
    decay (n,): their learning-rate-decay flags for a model with a decay input (None: 0).
    """
    n, m = y.shape
    t = torch.arange(1, m + 1, dtype=torch.float32, device=y.device) / m
    out = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            yb = y[s : s + batch]
            b = yb.shape[0]
            logits = model.predict(
                t[:cutoff].expand(b, cutoff),
                yb[:, :cutoff],
                torch.ones(b, cutoff, dtype=torch.bool, device=y.device),
                t[cutoff:].expand(b, m - cutoff),
                None if decay is None else decay[s : s + batch],
            )
            out.append(model.bar.log_density(logits.float(), yb[:, cutoff:]).mean(1))
    return torch.cat(out)


@dataclass(frozen=True)
class Cases:
    """Cut curves: observed prefix and the later points to predict, flattened by row."""

    x: list[np.ndarray]  # observed epochs per case
    y: list[np.ndarray]  # observed values per case
    xq: list[np.ndarray]  # query epochs per case
    yq: list[np.ndarray]  # true values at the query epochs
    horizon: np.ndarray  # (n_cases,)
    decay: np.ndarray | None = None  # (n_cases,) bool: the run's learning rate decays
    # before its horizon (Curve.lr_decay; None: all False)

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Forecast:
    """A method's answers for every query point of a set of cases (rows = flattened points)."""

    log_density: np.ndarray  # (R,) log p(true value)
    mean: np.ndarray  # (R,)
    lo50: np.ndarray  # (R,) central-interval bounds
    hi50: np.ndarray
    lo90: np.ndarray
    hi90: np.ndarray
    seconds: float  # wall time of the method for all cases


@dataclass(frozen=True)
class Row:
    source: str
    cutoff: str
    method: str
    n_curves: int
    log_likelihood: float
    mae_final: float
    rmse_final: float
    coverage_50: float
    coverage_90: float
    ms_per_curve: float
    above_90: float


Method = Callable[[Cases], Forecast]


def _gaussian(mu: np.ndarray, sd: np.ndarray, y: np.ndarray, seconds: float) -> Forecast:
    ld = -0.5 * ((y - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
    return Forecast(ld, mu, mu - _Z[0.5] * sd, mu + _Z[0.5] * sd, mu - _Z[0.9] * sd,
                    mu + _Z[0.9] * sd, seconds)


def last_value(cases: Cases) -> Forecast:
    t0 = time.perf_counter()
    mu = np.concatenate([np.full(len(q), y[-1]) for y, q in zip(cases.y, cases.xq, strict=True)])
    sd = np.full_like(mu, LAST_VALUE_SIGMA)
    return _gaussian(mu, sd, np.concatenate(cases.yq), time.perf_counter() - t0)


_C_GRID = np.geomspace(0.05, 3.0, 40)


def power_law(cases: Cases) -> Forecast:
    """Vectorised over cases: pad observed points, solve a 2x2 least-squares per grid value."""
    t0 = time.perf_counter()
    n = len(cases)
    K = max(len(x) for x in cases.x)
    T = np.ones((n, K))
    Y = np.zeros((n, K))
    W = np.zeros((n, K))
    for i, (x, y) in enumerate(zip(cases.x, cases.y, strict=True)):
        T[i, : len(x)] = x / cases.horizon[i]
        Y[i, : len(y)] = y
        W[i, : len(y)] = 1
    best = np.full(n, np.inf)
    pa, pb, pc = np.zeros(n), np.zeros(n), np.ones(n)
    for c in _C_GRID:
        u = -(T**-c)  # y = a + b * u with b >= 0
        sw, su, sy = W.sum(1), (W * u).sum(1), (W * Y).sum(1)
        suu, suy = (W * u * u).sum(1), (W * u * Y).sum(1)
        den = sw * suu - su**2
        ok = den > 1e-12
        b = np.where(ok, (sw * suy - su * sy) / np.where(ok, den, 1), 0.0)
        a = (sy - b * su) / np.maximum(sw, 1)
        sse = (W * (Y - a[:, None] - b[:, None] * u) ** 2).sum(1)
        better = sse < best
        best = np.where(better, sse, best)
        pa, pb, pc = np.where(better, a, pa), np.where(better, b, pb), np.where(better, c, pc)
    resid_sd = np.sqrt(best / np.maximum(W.sum(1) - 2, 1))
    sd_case = np.maximum(resid_sd, 0.01)
    mu = np.concatenate([pa[i] - pb[i] * (q / cases.horizon[i]) ** -pc[i]
                         for i, q in enumerate(cases.xq)])
    sd = np.concatenate([np.full(len(q), sd_case[i]) for i, q in enumerate(cases.xq)])
    return _gaussian(mu, sd, np.concatenate(cases.yq), time.perf_counter() - t0)


def pfn_method(predictor: Any, batch: int = 256) -> Method:
    """A Method running a ``pfn.Predictor`` (one forward pass per ``batch`` cases)."""
    from pfn.predictor import Curve

    def run(cases: Cases) -> Forecast:
        t0 = time.perf_counter()
        parts: list[list[np.ndarray]] = [[] for _ in range(6)]
        for s in range(0, len(cases), batch):
            idx = range(s, min(s + batch, len(cases)))
            curves = [Curve(cases.x[i], cases.y[i], float(cases.horizon[i]),
                            query_epochs=cases.xq[i], bounds=(0.0, 1.0),
                            lr_decay=bool(cases.decay is not None and cases.decay[i]))
                      for i in idx]
            post, _ = predictor.posterior_all(curves)
            yq = np.concatenate([cases.yq[i] for i in idx])[:, None]
            q = post.quantile([0.05, 0.25, 0.75, 0.95])
            vals = [post.log_density(yq)[:, 0], post.mean, q[:, 1], q[:, 2], q[:, 0], q[:, 3]]
            for p, v in zip(parts, vals, strict=True):
                p.append(v)
        a = [np.concatenate(p) for p in parts]
        return Forecast(a[0], a[1], a[2], a[3], a[4], a[5], time.perf_counter() - t0)

    return run


def score(cases: Cases, f: Forecast, source: str, cutoff: str, method: str) -> Row:
    sizes = np.array([len(q) for q in cases.xq])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    case_ll = np.add.reduceat(f.log_density, starts[:-1]) / sizes
    last = starts[1:] - 1
    yq = np.concatenate(cases.yq)
    err = f.mean[last] - yq[last]
    inside50 = (yq >= f.lo50) & (yq <= f.hi50)
    inside90 = (yq >= f.lo90) & (yq <= f.hi90)
    return Row(source, cutoff, method, len(cases), float(case_ll.mean()),
               float(np.abs(err).mean()), float(np.sqrt((err**2).mean())),
               float(inside50.mean()), float(inside90.mean()),
               1000 * f.seconds / max(len(cases), 1), float((yq > f.hi90).mean()))


def prior_cases(n: int, cutoff: int, seed: int = 0, prior_name: str = "lcpfn") -> Cases:
    from prior import get_prior

    prior = get_prior(prior_name)
    b = prior.sample(n, torch.Generator().manual_seed(seed))
    x = b.x.numpy().astype(np.float64)
    y = b.y.numpy().astype(np.float64)
    m = len(x)
    return Cases([x[:cutoff]] * n, list(y[:, :cutoff]), [x[cutoff:]] * n, list(y[:, cutoff:]),
                 np.full(n, float(m)))


def load_curve_file(path: str | Path, filter_: str | None = None,
                    max_curves: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    d = dict(np.load(path, allow_pickle=False))
    keep = np.ones(len(d["lengths"]), bool)
    if filter_ == "nonflat":
        rng = np.nanmax(d["y"], 1) - np.nanmin(d["y"], 1)
        keep &= d["complete"].astype(bool) & (rng > 0.02)
    elif filter_ not in (None, "all"):
        raise ValueError(f"filter: unknown {filter_!r}; use 'nonflat' or 'all'")
    keep &= d["lengths"] >= 2
    idx = np.flatnonzero(keep)
    if max_curves is not None and len(idx) > max_curves:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_curves, replace=False))
    return {k: v[idx] for k, v in d.items() if v.ndim >= 1 and len(v) == len(keep)}


def file_cases(d: dict[str, np.ndarray], frac: float, decay: np.ndarray | None = None) -> Cases:
    xs, ys, xqs, yqs, hs = [], [], [], [], []
    for i in range(len(d["lengths"])):
        n = int(d["lengths"][i])
        c = min(max(1, int(np.floor(frac * n))), n - 1)
        x = d["x"][i, :n].astype(np.float64)
        y = d["y"][i, :n].astype(np.float64)
        xs.append(x[:c])
        ys.append(y[:c])
        xqs.append(x[c:])
        yqs.append(y[c:])
        hs.append(max(float(d["budget"][i]), float(x[-1])))
    return Cases(xs, ys, xqs, yqs, np.array(hs), decay)


def _subset(c: Cases, idx: np.ndarray) -> Cases:
    return Cases([c.x[i] for i in idx], [c.y[i] for i in idx], [c.xq[i] for i in idx],
                 [c.yq[i] for i in idx], c.horizon[idx],
                 None if c.decay is None else c.decay[idx])


def evaluate_methods(methods: dict[str, Method], cases: Cases, source: str,
                     cutoff: str) -> list[Row]:
    return [score(cases, m(cases), source, cutoff, name) for name, m in methods.items()]


def evaluate_prior(methods: dict[str, Method], n_curves: int = 1000,
                   cutoffs: Sequence[int] = PRIOR_CUTOFFS, seed: int = 0) -> list[Row]:
    rows: list[Row] = []
    for c in cutoffs:
        rows += evaluate_methods(methods, prior_cases(n_curves, c, seed), "prior", str(c))
    return rows


def evaluate_file(methods: dict[str, Method], path: str | Path, filter_: str | None = None,
                  fractions: Sequence[float] = FRACTIONS, max_curves: int | None = None,
                  seed: int = 0, decay_sources: Sequence[str] = ()) -> list[Row]:
    """Rows per (source, fraction, method); the curves of ``decay_sources`` are marked as runs
    whose learning rate decays before the horizon (``Curve.lr_decay``)."""
    d = load_curve_file(path, filter_, max_curves, seed)
    sources = sorted(set(d["source"].tolist()))
    unknown = sorted(set(decay_sources) - set(sources))
    if unknown:
        raise CurvecastError(f"--decay-sources: {unknown} are not sources of {path}; it has "
                             f"{sources}; name sources of the file")
    decay = np.isin(d["source"], list(decay_sources)) if decay_sources else None
    tag = f"/{filter_}" if filter_ and filter_ != "all" else ""
    rows: list[Row] = []
    for frac in fractions:
        cases = file_cases(d, frac, decay)
        for src in sources:
            idx = np.flatnonzero(d["source"] == src)
            rows += evaluate_methods(methods, _subset(cases, idx), src + tag, f"{frac:g}")
    return rows


def mcmc_method(settings: str = "default", seed: int = 0) -> Method:
    """The MCMC posterior predictive (prior.reference) under one of its named settings
    (prior.reference.SETTINGS) as a Method; prior-protocol cases only (all cases share their
    observed and query epochs)."""
    from prior.reference import SETTINGS, sample_reference

    if settings not in SETTINGS:
        raise CurvecastError(f"mcmc settings: unknown {settings!r}; use one of {sorted(SETTINGS)}")

    def run(cases: Cases) -> Forecast:
        t0 = time.perf_counter()
        x = torch.as_tensor(cases.x[0])
        xq = torch.as_tensor(cases.xq[0])
        res = sample_reference(x, torch.as_tensor(np.stack(cases.y)), xq,
                               settings=SETTINGS[settings],
                               generator=torch.Generator().manual_seed(seed))
        lq = res.log_density(torch.as_tensor(np.stack(cases.yq)))
        q = res.quantile([0.05, 0.25, 0.75, 0.95])  # (n, Q, 4)
        run.diagnostics = res.summary()  # type: ignore[attr-defined]
        ld, mean, lo50, hi50, lo90, hi90 = (
            v.reshape(-1).numpy() for v in (lq, res.mean(), q[..., 1], q[..., 2], q[..., 0],
                                            q[..., 3]))
        return Forecast(ld, mean, lo50, hi50, lo90, hi90, seconds=time.perf_counter() - t0)

    return run


def evaluate_reference(pfn: Method, n_curves: int = 100, cutoffs: Sequence[int] = PRIOR_CUTOFFS,
                       seed: int = 0, settings: str = "default"
                       ) -> tuple[list[Row], list[dict[str, float]]]:
    """PFN and MCMC on the same prior curves (source ``prior/mcmc-subset``), plus the MCMC
    convergence diagnostics per cutoff."""
    rows: list[Row] = []
    diags = []
    mcmc = mcmc_method(settings, seed)
    for c in cutoffs:
        cases = prior_cases(n_curves, c, seed)
        rows += evaluate_methods({"pfn": pfn, "mcmc": mcmc}, cases, "prior/mcmc-subset", str(c))
        diags.append({"cutoff": c, **mcmc.diagnostics})  # type: ignore[attr-defined]
    return rows, diags


def baselines() -> dict[str, Method]:
    return {"last_value": last_value, "power_law": power_law}


def markdown_table(rows: Sequence[Row]) -> str:
    head = ("| source | cutoff | method | n | log-lik | MAE final | RMSE final | cov 50% | "
            "cov 90% | above 90% | ms/curve |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.source} | {r.cutoff} | {r.method} | {r.n_curves} | "
                     f"{r.log_likelihood:.3f} | {r.mae_final:.4f} | {r.rmse_final:.4f} | "
                     f"{r.coverage_50:.3f} | {r.coverage_90:.3f} | {r.above_90:.3f} | "
                     f"{r.ms_per_curve:.3f} |")
    return "\n".join(lines)


def rows_json(rows: Sequence[Row]) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows]}
