"""HPO integrations (optional extras): an Optuna pruner and a Ray Tune scheduler.

Both take a *backend* that makes the decisions:

* ``None`` (default): the embedded model for decisions, ``pfn.io.DECISION_MODEL`` (``"stage4"``:
  its rankings do best in the early-stopping replay; the default model for predictions,
  ``"default"``, has the better posteriors), loaded in-process on first use;
* a shipped model's name (e.g. ``"slowstart"``) or a model directory: that model, in-process,
  loaded on first use (the name is checked at construction);
* a ``pfn.Predictor`` (anything with ``posterior_all``): in-process, ``pfn.early_stop.decide``;
* anything with an ``early_stop(curves, incumbents, rule=...)`` method, e.g. the HTTP client of
  ``serve.client`` (duck-typed: pfn never imports serve). It receives ``pfn.Curve`` objects and a
  ``StopRule``, and may return ``Decision`` objects, their dict form (``decision_to_dict``),
  objects with the same attributes, or a response dict ``{"decisions": [...]}``.

Import the integrations from their modules (``pfn.hpo.optuna``, ``pfn.hpo.ray``); this package
itself imports neither Optuna nor Ray.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pfn.early_stop import (
    CAL_LEVELS,
    DEFAULT_QUANTILES,
    Calibrator,
    Decision,
    StopRule,
    calibrate_decision,
    calibration_prefixes,
    decide,
    decision_from_dict,
    final_score,
)
from pfn.errors import CurvecastError
from pfn.io import DECISION_MODEL, resolve_model_dir
from pfn.predictor import Curve, Predictor

IncumbentMode = Literal["completed", "observed"]
INCUMBENT_MODES = ("completed", "observed")


class Decider:
    """Calls the backend for a batch of trials and returns ``Decision`` objects.

    With ``calibrate=True`` it keeps a ``pfn.early_stop.Calibrator``: ``add_completed(curve)``
    feeds it a trial that reached its horizon (one backend call on up to 16 of its prefixes),
    and every decision then goes through ``calibrate_decision`` (for any backend).
    """

    def __init__(self, backend: Any = None, rule: StopRule = StopRule(),
                 quantiles: Sequence[float] = DEFAULT_QUANTILES, calibrate: bool = True,
                 keep_levels: Sequence[float] = ()) -> None:
        self._model = DECISION_MODEL  # a shipped model name or directory, loaded lazily
        if isinstance(backend, (str, Path)):
            resolve_model_dir(backend)  # fail fast: the error lists the shipped models
            self._model, backend = str(backend), None
        if backend is not None and not (hasattr(backend, "posterior_all")
                                        or hasattr(backend, "early_stop")):
            raise CurvecastError(
                f"backend: {type(backend).__name__} has neither posterior_all (a Predictor) nor "
                "early_stop (an HTTP client); pass a model name, Predictor.load(), a client, "
                "or None")
        if not isinstance(rule, StopRule):
            raise CurvecastError(f"rule: must be a StopRule, got {type(rule).__name__}")
        self.backend = backend
        self.rule = rule
        self.quantiles = tuple(quantiles)
        self.keep_levels = tuple(keep_levels)  # also requested and kept (the budget rule's)
        self.calibrator: Calibrator | None = Calibrator() if calibrate else None
        self._default: Predictor | None = None  # lazily loaded, never pickled

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_default"] = None
        return state

    def _resolve(self) -> Any:
        if self.backend is not None:
            return self.backend
        if self._default is None:
            self._default = Predictor.load(self._model)
        return self._default

    def __call__(self, curves: Sequence[Curve],
                 incumbents: Sequence[float | None]) -> list[Decision]:
        out = self._raw(curves, incumbents, self.rule)
        if self.calibrator is None:
            return out
        asked = set(self.quantiles) | set(self.keep_levels)
        out = [calibrate_decision(d, self.calibrator, c, x, self.rule)
               for d, c, x in zip(out, curves, incumbents, strict=True)]
        for d in out:
            d.final_quantiles = {q: v for q, v in d.final_quantiles.items() if q in asked}
        return out

    def add_completed(self, curve: Curve) -> bool:
        """Calibrate on a trial that reached its horizon; False (nothing added) otherwise."""
        if self.calibrator is None:
            return False
        prefixes, progress, final = calibration_prefixes(curve, self.rule.min_epochs)
        if not prefixes:
            return False
        ds = self._raw(prefixes, [final] * len(prefixes), self.rule)
        if any(q not in d.final_quantiles for d in ds for q in CAL_LEVELS):
            return False  # a remote backend that does not return these quantiles
        fq = np.array([[d.final_quantiles[q] for q in CAL_LEVELS] for d in ds])
        self.calibrator.add(progress, final_score(final, fq[:, 1], fq[:, 0], fq[:, 2],
                                                  curve.direction))
        return True

    def _raw(self, curves: Sequence[Curve], incumbents: Sequence[float | None],
             rule: StopRule) -> list[Decision]:
        b = self._resolve()
        levels = tuple(dict.fromkeys(self.quantiles + self.keep_levels))
        if self.calibrator is not None:
            levels = tuple(dict.fromkeys(levels + CAL_LEVELS))
        if hasattr(b, "posterior_all"):
            return decide(b, curves, incumbents, rule, levels)
        kw: dict[str, Any] = {"rule": rule}
        if _accepts(b.early_stop, "quantiles"):  # e.g. serve.client.Client
            kw["quantiles"] = list(levels)
        got = b.early_stop(list(curves), list(incumbents), **kw)
        if isinstance(got, Mapping):
            got = got["decisions"]
        out = [decision_from_dict(d if isinstance(d, (Mapping, Decision)) else _attrs(d))
               for d in got]
        if len(out) != len(curves):
            raise RuntimeError(f"backend returned {len(out)} decisions for {len(curves)} curves")
        return out


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _attrs(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "model_dump"):  # pydantic
        return dict(obj.model_dump())
    return {k: getattr(obj, k) for k in ("stop", "prob_improve", "prob_improve_final",
                                         "final_mean", "final_quantiles",
                                         "expected_remaining_epochs", "reason",
                                         "expected_improvement") if hasattr(obj, k)}


def best(values: Iterable[float | None], direction: str) -> float | None:
    """The best finite value (max or min), None when there is none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    return max(vals) if direction == "max" else min(vals)


def check_incumbent_mode(mode: str) -> str:
    if mode not in INCUMBENT_MODES:
        raise CurvecastError(f"incumbent: must be one of {list(INCUMBENT_MODES)}, got {mode!r}; "
                             "'completed' compares with finished trials' final values, "
                             "'observed' with every value reported so far")
    return mode


def check_startup(n: int | None, budget_rule: str | None) -> int:
    """``n_startup_trials``, resolved: ``None`` means 2 (the first completed trials give the
    incumbent and the calibration its first data), or 0 with ``budget_rule="rungs"`` (``None``
    when there is no budget): the rung comparison needs neither, and in the replay two
    protected trials cost it up to 2x of speed-up (docs/early-stopping.md)."""
    if n is None:
        return 0 if budget_rule == "rungs" else 2
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CurvecastError(f"n_startup_trials: must be an integer >= 0 or None, got {n!r}")
    return n


__all__ = ["INCUMBENT_MODES", "Decider", "IncumbentMode", "best", "check_incumbent_mode",
           "check_startup"]
