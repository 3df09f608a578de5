"""Posterior summaries as plain JSON-ready dicts: the schema shared by `curvecast predict` and
the HTTP server (``POST /v1/predict``). No web framework here; ``serve`` builds on it.

Request (a dict, e.g. parsed JSON)::

    {"curves": [{"epochs": [1, 2, 3], "values": [0.3, 0.45, null], "horizon": 100,
                 "query_epochs": [50, 100], "direction": "max", "bounds": [0, 1],
                 "quantiles": [0.1, 0.9], "thresholds": [0.8], "density_at": [0.7]}],
     "quantiles": [0.05, 0.25, 0.5, 0.75, 0.95]}

Only ``epochs``, ``values`` and ``horizon`` are required. ``"lr_decay": true`` says the run's
learning rate decays before the horizon (``pfn.Curve.lr_decay``). ``null`` (or NaN) values are
missing observations and are dropped with their epoch. A curve's own ``quantiles`` replace the
request-level ones for that curve. Response, one entry per curve::

    {"query_epochs": [50.0, 100.0], "mean": [...], "std": [...],
     "quantiles": {"0.1": [...], "0.9": [...]},
     "prob_greater": {"0.8": [...]},       # P(value > threshold) per query epoch
     "cdf": {"0.7": [...]},                # P(value <= v) for every v of density_at
     "log_density": {"0.7": [...]}}        # log p(v), null where it underflows to -inf

Dict keys are ``repr(float(x))`` of the requested numbers ("0.05", "0.8", "100.0"). Every
summary of the whole batch is computed in one vectorised pass (``Predictor.posterior_all``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pfn.errors import CurveError
from pfn.predictor import Curve, Posterior, Predictor, Prepared

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_ABS_VALUE = 1e12  # largest |number| accepted for values, bounds, thresholds, density_at
MIN_BOUNDS_SPAN = 1e-12  # smallest hi - lo of explicit bounds (float32 answers stay finite)
CURVE_KEYS = frozenset(
    {"epochs", "values", "horizon", "query_epochs", "direction", "bounds", "quantiles",
     "thresholds", "density_at", "lr_decay"}
)


@dataclass(frozen=True)
class SummarySpec:
    """What to report for one curve besides mean and std."""

    quantiles: tuple[float, ...] = DEFAULT_QUANTILES  # levels in (0, 1)
    thresholds: tuple[float, ...] = ()  # report P(value > t) for each t
    density_at: tuple[float, ...] = ()  # report CDF and log-density at each v


def key(x: float) -> str:
    """The dict key of a requested number: ``repr(float(x))``."""
    return repr(float(x))


def _numbers(x: Any, i: int | None, name: str, *, lo: float | None = None,
             hi: float | None = None, open_lo: bool = False, open_hi: bool = False,
             max_abs: float = MAX_ABS_VALUE) -> tuple[float, ...]:
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, (Sequence, np.ndarray)):
        raise CurveError(i, name, f"must be a list of numbers, got {type(x).__name__}",
                         f"send {name} as a JSON array of numbers")
    out = []
    for j, v in enumerate(x):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise CurveError(i, f"{name}[{j}]", f"must be a number, got {v!r}", "send a number")
        f = float(v)
        if not math.isfinite(f) or abs(f) > max_abs:
            raise CurveError(i, f"{name}[{j}]", f"must be finite with |x| <= {max_abs:g}, got {f}",
                             "send a finite number in range")
        if lo is not None and (f <= lo if open_lo else f < lo):
            raise CurveError(i, f"{name}[{j}]", f"must be {'>' if open_lo else '>='} {lo:g}, "
                             f"got {f:g}", f"send values {'>' if open_lo else '>='} {lo:g}")
        if hi is not None and (f >= hi if open_hi else f > hi):
            raise CurveError(i, f"{name}[{j}]", f"must be {'<' if open_hi else '<='} {hi:g}, "
                             f"got {f:g}", f"send values {'<' if open_hi else '<='} {hi:g}")
        out.append(f)
    return tuple(out)


def _values(x: Any, i: int) -> np.ndarray:
    """Observed values: numbers, with null/NaN for missing observations (dropped later)."""
    if isinstance(x, (str, bytes, Mapping)) or not isinstance(x, (Sequence, np.ndarray)):
        raise CurveError(i, "values", f"must be a list of numbers, got {type(x).__name__}",
                         "send values as a JSON array of numbers (null for missing)")
    out = np.empty(len(x), dtype=np.float64)
    for j, v in enumerate(x):
        if v is None:
            out[j] = math.nan
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise CurveError(i, f"values[{j}]", f"must be a number or null, got {v!r}",
                             "send a number (null for a missing observation)")
        f = float(v)
        if math.isinf(f) or abs(f) > MAX_ABS_VALUE:
            raise CurveError(i, f"values[{j}]", f"must be finite with |x| <= {MAX_ABS_VALUE:g}, "
                             f"got {f}", "drop or clip the value (null marks a missing one)")
        out[j] = f
    return out


def quantile_levels(x: Any, i: int | None = None) -> tuple[float, ...]:
    return _numbers(x, i, "quantiles", lo=0.0, hi=1.0, open_lo=True, open_hi=True)


def check_bounds(bounds: Any, i: int) -> tuple[float | None, float | None] | None:
    """Validate ``[lo, hi]`` (either side may be null) so that answers stay finite."""
    if bounds is None:
        return None
    if isinstance(bounds, (str, bytes, Mapping)) or not isinstance(bounds, Sequence) \
            or len(bounds) != 2:
        raise CurveError(i, "bounds", f"must be [lo, hi] or null, got {bounds!r}",
                         "send two numbers (either may be null)")
    sides: list[float | None] = []
    for j, b in enumerate(bounds):
        sides.append(None if b is None else _numbers([b], i, f"bounds[{j}]")[0])
    lo, hi = sides
    if lo is not None and hi is not None and not hi - lo >= MIN_BOUNDS_SPAN:
        raise CurveError(i, "bounds", f"need lo < hi (by at least {MIN_BOUNDS_SPAN:g}), "
                         f"got [{lo:g}, {hi:g}]", "pass bounds=[lo, hi] with lo < hi")
    return lo, hi


def curves_from_json(obj: Any) -> list[Curve]:
    """The curves of a request dict (see the module docstring); raises ``CurveError``."""
    return request_from_json(obj)[0]


def request_from_json(obj: Any) -> tuple[list[Curve], list[SummarySpec]]:
    """Parse a request dict (see the module docstring) into curves and per-curve specs.

    Raises ``CurveError`` naming the curve index and the field for anything malformed.
    """
    if not isinstance(obj, Mapping):
        raise CurveError(None, "request", f"must be a JSON object, got {type(obj).__name__}",
                         'send {"curves": [...]}')
    unknown = set(obj) - {"curves", "quantiles"}
    if unknown:
        raise CurveError(None, sorted(unknown)[0], "is not a request field",
                         "use only 'curves' and 'quantiles'")
    raw = obj.get("curves")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
        raise CurveError(None, "curves", "must be a non-empty list of curves",
                         'send {"curves": [{"epochs": [...], "values": [...], "horizon": N}]}')
    default_q = quantile_levels(obj.get("quantiles", DEFAULT_QUANTILES))
    curves, specs = [], []
    for i, c in enumerate(raw):
        if not isinstance(c, Mapping):
            raise CurveError(i, "curve", f"must be an object, got {type(c).__name__}",
                             "send epochs, values and horizon")
        bad = set(c) - CURVE_KEYS
        if bad:
            raise CurveError(i, sorted(bad)[0], "is not a curve field",
                             f"use only {', '.join(sorted(CURVE_KEYS))}")
        for req in ("epochs", "values", "horizon"):
            if req not in c:
                raise CurveError(i, req, "is missing", f"send {req}")
        h = c["horizon"]
        if isinstance(h, bool) or not isinstance(h, (int, float)):
            raise CurveError(i, "horizon", f"must be a number, got {h!r}", "send a number")
        values = _values(c["values"], i)
        direction = c.get("direction", "max")
        if direction not in ("max", "min"):
            raise CurveError(i, "direction", f"must be 'max' or 'min', got {direction!r}",
                             "send 'max' (accuracy) or 'min' (loss)")
        qe = c.get("query_epochs")
        curves.append(Curve(
            epochs=_numbers(c["epochs"], i, "epochs"),
            values=values,
            horizon=float(h),
            query_epochs=None if qe is None else _numbers(qe, i, "query_epochs"),
            direction=direction,
            bounds=check_bounds(c.get("bounds"), i),
            lr_decay=c.get("lr_decay", False),  # checked by Predictor.prepare
        ))
        specs.append(SummarySpec(
            quantiles=default_q if c.get("quantiles") is None
            else quantile_levels(c["quantiles"], i),
            thresholds=_numbers(c.get("thresholds") or (), i, "thresholds"),
            density_at=_numbers(c.get("density_at") or (), i, "density_at"),
        ))
    return curves, specs


def _per_row(values: list[tuple[float, ...]], counts: list[int], fill: float) -> np.ndarray:
    """(R, k) matrix: each curve's values repeated over its query rows, padded with fill."""
    k = max(len(v) for v in values)
    m = np.full((len(values), k), fill, dtype=np.float64)
    for b, v in enumerate(values):
        m[b, : len(v)] = v
    return np.repeat(m, counts, axis=0)


def _finite_list(a: np.ndarray, what: str) -> list[float]:
    if not np.isfinite(a).all():
        raise RuntimeError(f"non-finite {what} in a posterior summary")
    out: list[float] = a.astype(np.float64).tolist()
    return out


def _nullable_list(a: np.ndarray) -> list[float | None]:
    return [float(x) if math.isfinite(x) else None for x in a.tolist()]


def posterior_from_logits(predictor: Predictor, prepared: Prepared, logits: Tensor
                          ) -> tuple[Posterior, list[int]]:
    """``Predictor.posterior_all`` after its forward pass: logits (B, Q, n) of a prepared batch
    -> one Posterior over every query row (rows concatenated) and each curve's first row."""
    B, Q = logits.shape[:2]
    counts = prepared.n_query
    if all(q == Q for q in counts):  # every curve asks the same number of queries
        rows = logits.float().reshape(B * Q, -1)
        scale, offset = prepared.scale.repeat_interleave(Q), prepared.offset.repeat_interleave(Q)
    else:
        n_query = torch.tensor(counts)
        valid = torch.arange(Q)[None, :] < n_query[:, None]  # (B, Q)
        rows = logits.float()[valid]  # (R, n), curve-major like posterior_all
        scale = prepared.scale.repeat_interleave(n_query)
        offset = prepared.offset.repeat_interleave(n_query)
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    post = Posterior(predictor.bar, rows, scale, offset, np.concatenate(prepared.query_epochs))
    return post, starts


def summarize_posterior(post: Posterior, starts: Sequence[int],
                        specs: Sequence[SummarySpec]) -> list[dict[str, Any]]:
    """Summaries for the curves whose query rows are ``starts[i]:starts[i+1]`` of ``post``.

    Every quantity is computed once for all rows (one call per kind), then split per curve.
    """
    n = len(specs)
    counts = [int(starts[i + 1] - starts[i]) for i in range(n)]
    mean, std = post.mean, post.std
    qs = [s.quantiles for s in specs]
    quant = post.quantile(_per_row(qs, counts, 0.5)) if any(qs) else None
    th = [s.thresholds for s in specs]
    pg = post.prob_greater(_per_row(th, counts, 0.0)) if any(th) else None
    da = [s.density_at for s in specs]
    cdf = ld = None
    if any(da):
        at = _per_row(da, counts, 0.0)
        cdf, ld = post.cdf(at), post.log_density(at)
    out = []
    for i, s in enumerate(specs):
        a, b = starts[i], starts[i + 1]
        d: dict[str, Any] = {
            "query_epochs": [float(x) for x in post.query_epochs[a:b].tolist()],
            "mean": _finite_list(mean[a:b], "mean"),
            "std": _finite_list(std[a:b], "std"),
            "quantiles": {},
            "prob_greater": {},
            "cdf": {},
            "log_density": {},
        }
        for j, q in enumerate(s.quantiles):
            d["quantiles"][key(q)] = _finite_list(quant[a:b, j], "quantile")  # type: ignore[index]
        for j, t in enumerate(s.thresholds):
            d["prob_greater"][key(t)] = _finite_list(pg[a:b, j], "probability")  # type: ignore[index]
        for j, v in enumerate(s.density_at):
            d["cdf"][key(v)] = _finite_list(cdf[a:b, j], "cdf")  # type: ignore[index]
            d["log_density"][key(v)] = _nullable_list(ld[a:b, j])  # type: ignore[index]
        out.append(d)
    return out


def summarize(
    predictor: Predictor,
    curves: Sequence[Curve],
    quantiles: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_QUANTILES,
    thresholds: Sequence[Sequence[float] | None] | None = None,
    density_at: Sequence[Sequence[float] | None] | None = None,
) -> list[dict[str, Any]]:
    """One forward pass for all curves; one summary dict per curve (see the module docstring).

    ``quantiles`` is one list for every curve or one list per curve; ``thresholds`` and
    ``density_at`` are per curve (``None`` entries for none).
    """
    n = len(curves)
    if quantiles and all(isinstance(q, (int, float)) for q in quantiles):
        per_q = [quantile_levels(quantiles)] * n
    else:
        per_q = [quantile_levels(q, i) for i, q in enumerate(quantiles)]
    thresholds = thresholds if thresholds is not None else [None] * n
    density_at = density_at if density_at is not None else [None] * n
    if not len(per_q) == len(thresholds) == len(density_at) == n:
        raise CurveError(None, "curves", "quantiles/thresholds/density_at need one entry per "
                         f"curve ({n})", "pass one list per curve")
    specs = [
        SummarySpec(per_q[i], _numbers(thresholds[i] or (), i, "thresholds"),
                    _numbers(density_at[i] or (), i, "density_at"))
        for i in range(n)
    ]
    post, starts = predictor.posterior_all(curves)
    return summarize_posterior(post, starts, specs)


def model_info(predictor: Predictor, name: str = "default") -> dict[str, Any]:
    """The ``model`` block of a response: name, weights sha256 and the network's config."""
    return {"name": name, "sha256": predictor.sha256,
            "config": dict(predictor.config.get("model", {}))}


def predict_json(predictor: Predictor, obj: Any, name: str = "default") -> dict[str, Any]:
    """A whole request dict in, the response dict out: ``{"predictions": [...], "model": {}}``."""
    curves, specs = request_from_json(obj)
    post, starts = predictor.posterior_all(curves)
    return {"predictions": summarize_posterior(post, starts, specs),
            "model": model_info(predictor, name)}


__all__ = [
    "DEFAULT_QUANTILES",
    "SummarySpec",
    "check_bounds",
    "curves_from_json",
    "key",
    "model_info",
    "posterior_from_logits",
    "predict_json",
    "quantile_levels",
    "request_from_json",
    "summarize",
    "summarize_posterior",
]
