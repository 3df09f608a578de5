"""Early-stopping decisions for HPO: stop this trial or let it run, with the probability behind it.

    from pfn import Predictor, Curve
    from pfn.early_stop import StopRule, decide
    pred = Predictor.load("stage4")   # pfn.io.DECISION_MODEL, the default for decisions
    d = decide(pred, [Curve([1, 2, 3], [0.31, 0.42, 0.47], horizon=50, bounds=(0, 1))],
               incumbents=[0.83])[0]
    d.stop, d.prob_improve, d.final_mean, d.final_quantiles

One predictor call (one forward pass) serves the whole batch of trials. Each trial is queried at
its *checked epochs*: the remaining epochs after its last observed one, up to its horizon
(``MAX_CHECKED_EPOCHS`` evenly spaced ones when more remain, always including the next epoch
and the horizon; a curve's own ``query_epochs`` replace the grid, the horizon is always added).

Improvement means ``value > incumbent + min_delta`` for ``direction="max"`` and ``value <
incumbent - min_delta`` for ``direction="min"`` (``StopRule.min_delta``, default 0 as in the
paper; the posterior is in the metric's own units). The incumbent is the best value
seen so far in the study (or a target); ``None``/NaN means "no incumbent yet" (never stop).

Rules (``StopRule.kind``); none fires before ``min_epochs`` values are observed:

* ``"all_epochs"`` (default, the LC-PFN paper's): stop when for every checked epoch t'
  ``P(y_t' improves on the incumbent) <= delta``. ``prob_improve`` is the max over t'.
* ``"final_epoch"``: stop when ``P(y_horizon improves) <= delta`` (``prob_improve_final``).
  Ignores a trial that might peak above the incumbent mid-run and fall back (overfitting).
* ``"expected_improvement"``: stop when the expected improvement of the final value,
  ``E[max(0, y_horizon - incumbent)]`` (``incumbent - y`` for "min"), divided by the remaining
  epochs, is at most ``min_gain_per_epoch`` (metric units per epoch; required for this kind).
  A cost-aware rule: a trial far from its end must promise more to keep running.

Budget-aware stopping (study-level, used by the integrations with ``budget=Budget(n_trials,
epochs)``, through ``BudgetAware``): ``budget_pressure`` says how far the budget left falls
short of the untried trials. ``Rungs`` (``budget_rule="rungs"``, the default) ranks the trials
that reached the same rung (1, 4, 16 ... values) by their predicted final median and stops
those outside the top ``max(1/4, 1/pressure)``; the rule's own verdict is then not used. With
``budget_rule="opportunity"``, ``gate_by_budget`` vetoes the rule's stop while the budget
reaches every untried trial (pressure < 1), and ``Opportunity`` adds a stop, while it does
not, for a trial that offers less expected improvement per remaining epoch than the ended
trials did at the same point (weighted by 1 - 1/pressure).

``Decision.expected_remaining_epochs`` is ``0`` when the decision is to stop, else the epochs
left until the horizon (what continuing the trial costs if nothing stops it later). A trial
observed at its horizon is complete: ``stop`` is False (an HPO library must not mark a finished
trial as pruned) and ``expected_remaining_epochs`` is 0.

The JSON form (``early_stop_json``, used by ``POST /v1/early-stop`` and the CLI)::

    {"curves": [{"epochs": [1, 2], "values": [0.3, 0.4], "horizon": 50,
                 "direction": "max", "bounds": [0, 1]}],
     "incumbents": [0.8],                       # one per curve, null = none yet
     "rule": {"kind": "all_epochs", "delta": 0.05, "min_epochs": 2},   # optional
     "quantiles": [0.05, 0.5, 0.95]}            # optional
    -> {"decisions": [{"stop": true, "prob_improve": 0.01, "prob_improve_final": 0.008,
                       "final_mean": 0.52, "final_quantiles": {"0.05": ..., "0.5": ...},
                       "expected_remaining_epochs": 0.0, "expected_improvement": 1e-4,
                       "reason": "..."}],
        "model": {...}}

The dict helpers here (``rule_to_dict``, ``rule_from_dict``, ``curve_to_dict``,
``decision_to_dict``, ``decision_from_dict``) import neither torch nor the predictor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pfn.errors import CurveError

if TYPE_CHECKING:
    from pfn.predictor import Curve, Predictor

RuleKind = Literal["all_epochs", "final_epoch", "expected_improvement"]
RULE_KINDS: tuple[str, ...] = ("all_epochs", "final_epoch", "expected_improvement")
DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.5, 0.95)
MAX_CHECKED_EPOCHS = 32  # remaining epochs queried per trial (evenly spaced when more remain)
EI_LEVELS = 64  # quantile levels averaged to estimate the expected improvement
EARLY_STOP_CURVE_KEYS = frozenset(
    {"epochs", "values", "horizon", "query_epochs", "direction", "bounds", "lr_decay"}
)
REQUEST_KEYS = frozenset({"curves", "incumbents", "rule", "quantiles"})


@dataclass(frozen=True)
class StopRule:
    """When to stop a trial; see the module docstring for the kinds."""

    kind: RuleKind = "all_epochs"  # which probability the rule thresholds
    delta: float = 0.05  # stop when P(improve) <= delta ("all_epochs", "final_epoch")
    min_epochs: int = 2  # observed values needed before the rule may stop a trial
    min_gain_per_epoch: float | None = None  # "expected_improvement" only: metric units/epoch
    min_delta: float = 0.0  # an improvement must beat the incumbent by more than this (units)

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise CurveError(None, "rule.kind", f"must be one of {list(RULE_KINDS)}, got "
                             f"{self.kind!r}", "use 'all_epochs' (the paper's rule)")
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise CurveError(None, "rule.delta", f"must be a probability in [0, 1), got {d!r}",
                             "use e.g. 0.05 (stop when P(improve) <= 5%)")
        m = self.min_epochs
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise CurveError(None, "rule.min_epochs", f"must be an integer >= 1, got {m!r}",
                             "use 2 (decide from the second epoch on)")
        md = self.min_delta
        if isinstance(md, bool) or not isinstance(md, (int, float)) \
                or not (math.isfinite(md) and md >= 0):
            raise CurveError(None, "rule.min_delta", f"must be a finite number >= 0, got {md!r}",
                             "use 0 (the paper's rule) or the smallest gain worth having, in "
                             "metric units (e.g. 0.005 for an accuracy in [0, 1])")
        g = self.min_gain_per_epoch
        if self.kind == "expected_improvement":
            if g is None or isinstance(g, bool) or not isinstance(g, (int, float)) \
                    or not (math.isfinite(g) and g >= 0):
                raise CurveError(None, "rule.min_gain_per_epoch", "must be a finite number "
                                 f">= 0 for kind 'expected_improvement', got {g!r}",
                                 "set the smallest worthwhile gain per epoch, in metric units")
        elif g is not None:
            raise CurveError(None, "rule.min_gain_per_epoch", f"is only used by kind "
                             f"'expected_improvement', not {self.kind!r}", "drop it")


@dataclass
class Decision:
    """The answer for one trial; probabilities are of improving on its incumbent."""

    stop: bool  # the rule's verdict
    prob_improve: float  # max over the checked remaining epochs of P(y_t' improves)
    prob_improve_final: float  # P(y_horizon improves)
    final_mean: float  # predicted mean at the horizon, metric units
    final_quantiles: dict[float, float]  # level -> predicted quantile at the horizon
    expected_remaining_epochs: float  # 0 when stopping, else horizon - last observed epoch
    reason: str  # one human-readable sentence
    expected_improvement: float = math.nan  # E[max(0, y_horizon's gain)]; NaN: no incumbent


@dataclass(frozen=True)
class Budget:
    """A study's plan, for the budget gate (``budget_pressure``, ``gate_by_budget``): how many
    trials it will start and how many epochs it may spend on all of them together."""

    n_trials: int  # trials the study plans to start (Optuna's n_trials, Ray's num_samples)
    epochs: float  # epochs (one reported step = one epoch) the whole study may spend

    def __post_init__(self) -> None:
        n, e = self.n_trials, self.epochs
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CurveError(None, "budget.n_trials", f"must be an integer >= 1, got {n!r}",
                             "pass the number of trials the study will start")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (math.isfinite(e)
                                                                           and e > 0):
            raise CurveError(None, "budget.epochs", f"must be a positive number, got {e!r}",
                             "pass the epochs all trials together may spend, e.g. 20 x the "
                             "epochs of one full run")


def budget_pressure(budget: Budget, started: int, spent: float, ended: Sequence[float]) -> float:
    """How far the budget falls short of the trials not yet started: (untried trials x the mean
    epochs the ``ended`` trials took) / epochs left, where untried = ``budget.n_trials -
    started`` and ``spent`` counts the epochs of every trial so far. Below 1 the budget reaches
    every untried trial at the study's own cost per trial, so the epochs a stop would save could
    buy nothing; ``inf`` before any trial ended (no cost estimate) or once the budget is spent."""
    left = float(budget.epochs) - float(spent)
    if not len(ended) or left <= 0:
        return math.inf
    untried = max(budget.n_trials - int(started), 0)
    return untried * float(np.mean(np.asarray(ended, dtype=np.float64))) / left


def gate_by_budget(d: Decision, pressure: float, curve: Curve) -> Decision:
    """``d``, except that a stop is vetoed when ``pressure < 1`` (see ``budget_pressure``):
    spending the budget on this trial beats leaving it unspent. A rule that stops every trial
    early (e.g. on a task whose good runs start slowly) would otherwise run out of trials with
    most of the budget unused."""
    if not d.stop or pressure >= 1.0:
        return d
    return _kept(d, curve, f"the budget reaches every untried trial (pressure {pressure:.2f} "
                           "< 1)")


def _kept(d: Decision, curve: Curve, why: str) -> Decision:
    """The rule's stop ``d`` overruled for ``why``: the trial runs on to its horizon."""
    o = _observed(curve)
    remaining = 0.0 if o is None else max(float(curve.horizon) - o[0], 0.0)
    return replace(d, stop=False, expected_remaining_epochs=remaining,
                   reason=f"the rule would stop ({d.reason}), but {why}: keep running")


def _stopped(d: Decision, reason: str) -> Decision:
    """``d`` turned into a stop for ``reason`` (nothing left to spend on the trial)."""
    return replace(d, stop=True, expected_remaining_epochs=0.0, reason=reason)


# final-value quantiles the opportunity rule keeps per decision: both tails geometrically down
# to 1e-5, so that a small chance of a large gain still counts (39 levels, ascending)
_TAILS = np.geomspace(0.5, 1e-5, 20)
OPPORTUNITY_LEVELS: tuple[float, ...] = tuple(
    sorted({round(float(x), 12) for x in np.concatenate([_TAILS, 1.0 - _TAILS])}))
OPPORTUNITY_MIN_TRIALS = 3  # ended trials with predictions before the opportunity rule fires


def expected_gain(values: Any, incumbent: float, direction: str = "max") -> Any:
    """E[max(0, gain over the incumbent)] from the final value's quantiles at
    ``OPPORTUNITY_LEVELS`` (the last axis of ``values``): the integral of P(gain > g) over
    g > 0, by trapezoids between the levels (P taken as 1 below the first, 0 beyond the last).
    A float for one row, an array for several."""
    v = np.asarray(values, dtype=np.float64)
    lv = np.asarray(OPPORTUNITY_LEVELS)
    if direction == "max":
        x, surv, inc = v, 1.0 - lv, incumbent  # P(F > x_j) = 1 - level_j
    else:
        x, surv, inc = -v[..., ::-1], lv[::-1], -incumbent  # the gain of -F over -incumbent
    seg = np.clip(x[..., 1:] - np.maximum(x[..., :-1], inc), 0.0, None)
    out = np.clip(x[..., 0] - inc, 0.0, None) + seg @ (0.5 * (surv[1:] + surv[:-1]))
    return float(out) if out.ndim == 0 else out


class Opportunity:
    """The opportunity-cost half of budget-aware early stopping (``budget=`` in the Optuna
    pruner and the Ray scheduler).

    It remembers every trial's predicted final value (its quantiles at ``OPPORTUNITY_LEVELS``)
    at each decision, keyed by the number of values observed. ``apply`` stops a running trial
    whose expected improvement over the incumbent, per share of a full run still ahead of it,
    is below ``c`` x the mean expected improvement the ended trials offered at the same point
    (each from its prediction after min(k, its last decision's) values, against today's
    incumbent), with ``c = 1 - 1/pressure`` (``budget_pressure``): nothing while the budget is
    ample, up to the full comparison when the trials far outnumber what the budget reaches.
    This is successive halving's rung comparison in expectation, with no constant to tune.
    It needs ``OPPORTUNITY_MIN_TRIALS`` ended trials with predictions, and never fires before
    the rule's ``min_epochs`` values. State: ``preds`` (float32 rows; ``state_dict`` gives
    plain JSON).
    """

    def __init__(self) -> None:
        self.preds: dict[str, dict[int, Any]] = {}  # trial -> {values observed: quantiles}

    def record(self, trial: str, curve: Curve, d: Decision) -> bool:
        """Keep ``d``'s final quantiles for ``trial`` at its number of observed values (False
        when ``d`` lacks ``OPPORTUNITY_LEVELS``, e.g. a backend that does not return them)."""
        o = _observed(curve)
        fq = d.final_quantiles
        if o is None or any(q not in fq for q in OPPORTUNITY_LEVELS):
            return False
        self.preds.setdefault(str(trial), {})[o[1]] = np.array(
            [fq[q] for q in OPPORTUNITY_LEVELS], dtype=np.float32)
        return True

    def reference(self, n_obs: int, incumbent: float, direction: str,
                  ended: Sequence[str]) -> tuple[float, int]:
        """(mean expected improvement of the ``ended`` trials at ``n_obs`` values, how many)."""
        gains = []
        for t in ended:
            p = self.preds.get(str(t))
            if not p:
                continue
            below = [k for k in p if k <= n_obs]
            gains.append(float(expected_gain(p[max(below) if below else min(p)], incumbent,
                                             direction)))
        return (float(np.mean(gains)) if gains else math.nan), len(gains)

    def apply(self, d: Decision, trial: str, curve: Curve, incumbent: float | None,
              pressure: float, ended: Sequence[str], min_epochs: int = 2) -> Decision:
        """``d``, or a stop when the opportunity rule fires (see the class); call ``record``
        for this decision first."""
        o = _observed(curve)
        if d.stop or incumbent is None or o is None or not 1.0 < pressure < math.inf:
            return d
        last, n_obs = o
        own = self.preds.get(str(trial), {}).get(n_obs)
        h = float(curve.horizon)
        if own is None or n_obs < min_epochs or last >= h:
            return d
        direction = getattr(curve, "direction", "max")
        ref, n = self.reference(n_obs, float(incumbent), direction, ended)
        if n < OPPORTUNITY_MIN_TRIALS:
            return d
        c = 1.0 - 1.0 / pressure
        share = (h - last) / h
        ei = float(expected_gain(own, float(incumbent), direction))
        if ei >= c * share * ref:
            return d
        return _stopped(d, f"opportunity cost: expected improvement {ei:.3g} for the "
                           f"{share:.0%} of a run still ahead < {c:.2f} (budget pressure "
                           f"{pressure:.2f}) x {share:.2f} x {ref:.3g}, what {n} ended "
                           f"trial(s) offered at {n_obs} values")

    def state_dict(self) -> dict[str, Any]:
        return {t: {str(k): np.asarray(v, dtype=np.float64).tolist() for k, v in p.items()}
                for t, p in self.preds.items()}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> Opportunity:
        out = cls()
        out.preds = {str(t): {int(k): np.asarray(v, dtype=np.float32) for k, v in p.items()}
                     for t, p in d.items()}
        return out


RUNG_ETA = 4  # successive halving's reduction factor (Optuna's SuccessiveHalvingPruner's)
RUNG_FIRST = 1  # values observed at the first rung


def rung_at(n_obs: int, eta: int = RUNG_ETA, first: int = RUNG_FIRST) -> int | None:
    """The highest rung (``first`` x ``eta``^m values, m = 0, 1, ...) at or below ``n_obs``;
    None below the first."""
    if n_obs < first:
        return None
    r = first
    while r * eta <= n_obs:
        r *= eta
    return r


def is_rung(n_obs: int, eta: int = RUNG_ETA, first: int = RUNG_FIRST) -> bool:
    """Whether ``n_obs`` observed values make a rung: ``first`` x ``eta``^m, m = 0, 1, ..."""
    return rung_at(n_obs, eta, first) == n_obs


class Rungs:
    """Successive halving's comparison between trials, ranked by the model's prediction: the
    trial-vs-trial half of budget-aware stopping (``budget=`` in the Optuna pruner and the Ray
    scheduler, ``budget_rule="rungs"``, the default).

    At every rung (``is_rung``: 1, 4, 16, 64 ... observed values) a trial's *score* is the
    median of its predicted final value (negated for ``direction="min"``), and it joins the
    rung's population: every trial that reached that rung. ``apply`` stops it unless its
    score is within the top ``max(1/eta, 1/pressure)`` share of the population (at least the
    best one is kept): successive halving's cut (the top 1/eta) while trials far outnumber
    what the budget reaches, milder as the pressure (``budget_pressure``) falls toward 1, and
    nothing while the budget reaches every untried trial (pressure < 1). Unlike successive
    halving it ranks trials by where the model extrapolates them to end, not by the value
    reached so far, so a trial that rises steeply passes a flat one that is ahead today.
    Between rungs it does nothing (a promoted trial runs to its next rung). A trial not
    decided at a rung (e.g. Optuna's ``interval_steps`` > 1, or missing values) is judged at
    its first decision after it, with the prediction of that moment. State: ``scores``
    (``state_dict`` gives plain JSON).
    """

    def __init__(self, eta: int = RUNG_ETA, first: int = RUNG_FIRST) -> None:
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
            raise CurveError(None, "eta", f"must be an integer >= 2, got {eta!r}",
                             "use successive halving's reduction factor, e.g. 3 or 4")
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise CurveError(None, "first", f"must be an integer >= 1, got {first!r}",
                             "pass the number of values observed at the first rung")
        self.eta, self.first = eta, first
        self.scores: dict[int, dict[str, float]] = {}  # rung -> trial -> score

    def apply(self, d: Decision, trial: str, curve: Curve, pressure: float) -> Decision:
        """``d``, or a stop when the trial, at a rung, ranks below the cut (see the class).
        Every decision at a rung records the trial's score, whatever ``d`` says."""
        o = _observed(curve)
        rung = None if o is None else rung_at(o[1], self.eta, self.first)
        if o is None or rung is None:
            return d
        last, n_obs = o
        med = d.final_quantiles.get(0.5, d.final_mean)
        pop = self.scores.setdefault(rung, {})
        if not math.isfinite(med) or (n_obs > rung and str(trial) in pop):
            return d  # no score, or already judged at this rung
        sign = -1.0 if getattr(curve, "direction", "max") == "min" else 1.0
        pop[str(trial)] = sign * float(med)
        if d.stop or last >= float(curve.horizon) or not 1.0 < pressure < math.inf:
            return d
        share = max(1.0 / self.eta, 1.0 / pressure)
        keep = max(1, int(len(pop) * share))
        ranked = sorted(pop.values(), reverse=True)
        rank = 1 + sum(v > sign * med for v in ranked)
        if sign * med >= ranked[keep - 1]:
            return d
        at = f"{rung} values" + (f" ({n_obs} observed)" if n_obs > rung else "")
        return _stopped(d, f"successive halving at {at}: predicted final median "
                           f"{med:.4g} ranks {rank} of the {len(pop)} trials that reached "
                           f"this rung; the top {keep} ({share:.0%}: budget pressure "
                           f"{pressure:.2f}, eta {self.eta}) go on")

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "first": self.first,
                "scores": {str(k): dict(v) for k, v in self.scores.items()}}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> Rungs:
        out = cls(int(d.get("eta", RUNG_ETA)), int(d.get("first", RUNG_FIRST)))
        out.scores = {int(k): {str(t): float(v) for t, v in p.items()}
                      for k, p in d.get("scores", {}).items()}
        return out


BudgetRule = Literal["rungs", "opportunity"]
BUDGET_RULES: tuple[str, ...] = ("rungs", "opportunity")


class BudgetAware:
    """Budget-aware stopping as the integrations apply it to each decision when given a
    ``budget`` (the study's plan), with one of two rules (``rule``):

    * ``"rungs"`` (default): trials are compared with each other, as successive halving does
      (``Rungs``), and the decision rule's verdict is not used (its probabilities are still
      reported): a trial goes on unless, at a rung, it ranks below the cut that the pressure
      sets. In the replay on real curves this beat the opportunity rule on 20 of the 23
      tasks with >= 100 trials, and Optuna's SuccessiveHalvingPruner on TaskSet, MNLI,
      wikitext-2 and ImageNet (docs/early-stopping.md).
    * ``"opportunity"``: the decision rule's verdict, vetoed while the pressure is below 1
      (``gate_by_budget``), then ``Opportunity``'s expected-improvement comparison while it
      is above 1.

    ``apply(d, trial, curve, incumbent, pressure, ended, min_epochs)`` returns the final
    decision; ``keep_levels`` are the quantile levels the backend must return for it.
    """

    def __init__(self, budget: Budget, rule: str = "rungs") -> None:
        if not isinstance(budget, Budget):
            raise CurveError(None, "budget", f"must be a pfn.early_stop.Budget, got "
                             f"{type(budget).__name__}", "pass Budget(n_trials, epochs)")
        if rule not in BUDGET_RULES:
            raise CurveError(None, "budget_rule", f"must be one of {list(BUDGET_RULES)}, got "
                             f"{rule!r}", "'rungs' compares trials with each other, "
                             "'opportunity' by expected improvement")
        self.budget = budget
        self.rule = rule
        self.opportunity = Opportunity()
        self.rungs = Rungs()

    @property
    def keep_levels(self) -> tuple[float, ...]:
        return OPPORTUNITY_LEVELS if self.rule == "opportunity" else (0.5,)

    @property
    def needs_incumbent(self) -> bool:
        """Whether a decision needs an incumbent (the rung comparison does not)."""
        return self.rule != "rungs"

    def apply(self, d: Decision, trial: str, curve: Curve, incumbent: float | None,
              pressure: float, ended: Sequence[str], min_epochs: int = 2) -> Decision:
        if self.rule == "rungs":
            if d.stop:
                d = _kept(d, curve, "with a budget trials are compared with each other at rungs")
            return self.rungs.apply(d, trial, curve, pressure)
        self.opportunity.record(trial, curve, d)
        d = gate_by_budget(d, pressure, curve)
        return self.opportunity.apply(d, trial, curve, incumbent, pressure, ended, min_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"budget": {"n_trials": self.budget.n_trials, "epochs": self.budget.epochs},
                "rule": self.rule, "opportunity": self.opportunity.state_dict(),
                "rungs": self.rungs.state_dict()}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> BudgetAware:
        """The plan, the rule and its state from ``state_dict()``'s output."""
        b = d["budget"]
        out = cls(Budget(int(b["n_trials"]), float(b["epochs"])), str(d["rule"]))
        out.opportunity = Opportunity.from_state_dict(d.get("opportunity", {}))
        out.rungs = Rungs.from_state_dict(d.get("rungs", {}))
        return out


# ---------------------------------------------------------------------------------------------
# dict (JSON) helpers: no torch, usable by the HTTP client


def _key(x: float) -> str:
    return repr(float(x))  # the same keys as pfn.summary.key


def rule_to_dict(rule: StopRule) -> dict[str, Any]:
    d = asdict(rule)
    if d["min_gain_per_epoch"] is None:
        del d["min_gain_per_epoch"]
    if d["min_delta"] == 0:
        del d["min_delta"]  # the default: requests stay readable by older servers
    return d


def rule_from_dict(obj: Any) -> StopRule:
    """A ``StopRule`` from a dict (unknown keys rejected); ``None`` gives the default rule."""
    if obj is None:
        return StopRule()
    if isinstance(obj, StopRule):
        return obj
    if not isinstance(obj, Mapping):
        raise CurveError(None, "rule", f"must be an object, got {type(obj).__name__}",
                         'send {"kind": "all_epochs", "delta": 0.05, "min_epochs": 2}')
    known = {f.name for f in fields(StopRule)}
    bad = sorted(set(obj) - known)
    if bad:
        raise CurveError(None, f"rule.{bad[0]}", "is not a rule field",
                         f"use only {', '.join(sorted(known))}")
    return StopRule(**dict(obj))


def curve_to_dict(c: Any) -> dict[str, Any]:
    """The JSON form of a ``Curve`` (or any object with its attributes); NaN values -> null."""
    def nums(a: Any) -> list[float | None]:
        return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v)
                for v in np.asarray(a, dtype=np.float64).tolist()]

    d: dict[str, Any] = {"epochs": nums(c.epochs), "values": nums(c.values),
                         "horizon": float(c.horizon),
                         "direction": getattr(c, "direction", "max")}
    qe = getattr(c, "query_epochs", None)
    if qe is not None:
        d["query_epochs"] = nums(qe)
    b = getattr(c, "bounds", None)
    if b is not None:
        d["bounds"] = [None if x is None else float(x) for x in b]
    if getattr(c, "lr_decay", False):
        d["lr_decay"] = True
    return d


def decision_to_dict(d: Decision) -> dict[str, Any]:
    return {
        "stop": bool(d.stop),
        "prob_improve": float(d.prob_improve),
        "prob_improve_final": float(d.prob_improve_final),
        "final_mean": float(d.final_mean),
        "final_quantiles": {_key(q): float(v) for q, v in d.final_quantiles.items()},
        "expected_remaining_epochs": float(d.expected_remaining_epochs),
        "expected_improvement": (float(d.expected_improvement)
                                 if math.isfinite(d.expected_improvement) else None),
        "reason": d.reason,
    }


def decision_from_dict(obj: Mapping[str, Any] | Decision) -> Decision:
    """A ``Decision`` from its dict form (e.g. an HTTP response entry); passes Decisions on."""
    if isinstance(obj, Decision):
        return obj
    return Decision(
        stop=bool(obj["stop"]),
        prob_improve=float(obj["prob_improve"]),
        prob_improve_final=float(obj["prob_improve_final"]),
        final_mean=float(obj["final_mean"]),
        final_quantiles={float(k): float(v) for k, v in obj["final_quantiles"].items()},
        expected_remaining_epochs=float(obj["expected_remaining_epochs"]),
        reason=str(obj["reason"]),
        expected_improvement=(math.nan if obj.get("expected_improvement") is None
                              else float(obj["expected_improvement"])),
    )


# ---------------------------------------------------------------------------------------------
# online calibration from the study's own completed trials

CALIBRATION_MATCH = 1.5  # a prefix matches a decision within this factor of its progress


class Calibrator:
    """Recalibrates P(final value improves) with what the study's completed trials showed.

    The model was trained on synthetic curves; on a real task its prediction of the final value
    can be systematically off, e.g. far too low and too sure for runs that start slowly. For
    every trial that reached its horizon, ``add`` takes its *scores*: ``z = (final - median) /
    scale`` of the prediction made from each of its prefixes (median and scale of the predicted
    final value, ``scale = (q95 - q05) / 3.29``, the sign flipped for "min" so that z > 0 means
    "better than predicted"), with the prefix's *progress* (last epoch / horizon).

    A decision at progress p compares the incumbent's score with the completed trials' scores
    *from the same point of their runs*: each trial contributes the score of its prefix nearest
    to p in log-progress, if within a factor ``match`` of p. With W such trials, the calibrated
    probability that the final value improves on the incumbent mixes the model's with the
    observed frequency of scores at least as good as the incumbent's, the model counting as
    ``prior_weight`` pseudo-trials (a conformal-style estimate that also extrapolates beyond
    the model's tails):

        P = (prior_weight * p_model + #{trials: z_i >= z_incumbent}) / (prior_weight + W)

    With no matching trial it is the model's probability. Torch-free; ``state_dict`` gives the
    plain-list state.
    """

    def __init__(self, prior_weight: float = 10.0, match: float = CALIBRATION_MATCH) -> None:
        for name, v, lo in (("prior_weight", prior_weight, 0.0), ("match", match, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not (math.isfinite(v) and v > lo):
                raise CurveError(None, f"calibration.{name}", f"must be a number > {lo:g}, got "
                                 f"{v!r}", "use e.g. 10 for prior_weight (pseudo-trials of the "
                                 "model) and 1.5 for match (a factor of progress)")
        self.prior_weight = float(prior_weight)
        self.match = float(match)
        self.progress: list[list[float]] = []  # per trial, ascending
        self.z: list[list[float]] = []
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._memo: dict[float, np.ndarray] = {}

    @property
    def trials(self) -> int:
        return len(self.z)

    def add(self, progress: Any, z: Any) -> None:
        """One completed trial: the score of its final value at each prefix's progress."""
        p = np.asarray(progress, dtype=np.float64).ravel()
        zz = np.asarray(z, dtype=np.float64).ravel()
        if p.shape != zz.shape:
            raise CurveError(None, "calibration", f"{p.size} progress values for {zz.size} "
                             "scores", "pass one progress per score")
        ok = np.isfinite(p) & (p > 0) & ~np.isnan(zz)
        if not ok.any():
            return
        o = np.argsort(p[ok], kind="stable")
        self.progress.append(p[ok][o].tolist())
        self.z.append(zz[ok][o].tolist())
        self._flat = None
        self._memo.clear()

    def scores_at(self, progress: float) -> np.ndarray:
        """The matching trials' scores for a decision at ``progress``, sorted (memoised)."""
        key = float(progress)
        if key in self._memo:
            return self._memo[key]
        if self._flat is None:
            counts = np.array([len(x) for x in self.z])
            self._flat = (np.log(np.concatenate(self.progress)), np.concatenate(self.z),
                          np.repeat(np.arange(len(counts)), counts),
                          np.concatenate([[0], np.cumsum(counts)[:-1]]))
        lp, zs, tid, starts = self._flat
        d = np.abs(lp - math.log(max(key, 1e-12)))
        seg_min = np.minimum.reduceat(d, starts)
        hit = np.flatnonzero((d == seg_min[tid]) & (d <= math.log(self.match)))
        _, first = np.unique(tid[hit], return_index=True)  # one prefix per trial
        out = np.sort(zs[hit[first]])
        self._memo[key] = out
        return out

    def prob_improve(self, progress: Any, p_model: Any, z_incumbent: Any) -> np.ndarray:
        """Calibrated P(final improves); arrays broadcast (one progress per entry)."""
        pr, pm, zi = np.broadcast_arrays(np.asarray(progress, dtype=np.float64),
                                         np.asarray(p_model, dtype=np.float64),
                                         np.asarray(z_incumbent, dtype=np.float64))
        out = np.array(pm, dtype=np.float64, copy=True)
        if not self.z:
            return out
        for idx in np.ndindex(pr.shape):
            zs = self.scores_at(float(pr[idx]))
            hits = zs.size - np.searchsorted(zs, zi[idx], side="left")  # z_i >= z_inc
            out[idx] = (self.prior_weight * pm[idx] + hits) / (self.prior_weight + zs.size)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"prior_weight": self.prior_weight, "match": self.match,
                "progress": self.progress, "z": self.z}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> Calibrator:
        c = cls(d["prior_weight"], d["match"])
        for p, z in zip(d["progress"], d["z"], strict=True):
            c.add(p, z)
        return c


Z_SCALE = 2 * 1.6448536269514722  # (q95 - q05) of a standard normal


def final_score(final: Any, median: Any, q05: Any, q95: Any, direction: Any) -> np.ndarray:
    """z = (final - median) / ((q95 - q05) / 3.29), positive when better than predicted."""
    scale = np.maximum((np.asarray(q95, float) - np.asarray(q05, float)) / Z_SCALE, 1e-9)
    z = (np.asarray(final, float) - np.asarray(median, float)) / scale
    return np.where(np.asarray(direction) == "min", -z, z)


def calibration_prefixes(curve: Curve, min_epochs: int = 2,
                         max_prefixes: int = 16) -> tuple[list[Curve], np.ndarray, float]:
    """The prefixes of a trial that reached its horizon, for ``Calibrator.add``: (prefix
    curves, their progress, the final value). Up to ``max_prefixes`` prefixes, log-spaced over
    the ones with ``min_epochs`` points or more; none when the trial has not reached its
    horizon or has fewer than ``min_epochs + 1`` points."""
    e = np.asarray(curve.epochs, dtype=np.float64)
    v = np.asarray(curve.values, dtype=np.float64)
    keep = ~np.isnan(v)
    e, v = e[keep], v[keep]
    h = float(curve.horizon)
    if e.size < min_epochs + 1 or e[-1] < h:
        return [], np.zeros(0), math.nan
    ks = np.arange(min_epochs, e.size)  # points in the prefix; the last point is the target
    if ks.size > max_prefixes:  # log-spaced: the early bins, where decisions matter, get more
        ks = np.unique(np.round(np.geomspace(ks[0], ks[-1], max_prefixes)).astype(int))
    prefixes = [replace(curve, epochs=e[:k], values=v[:k], query_epochs=None) for k in ks]
    return prefixes, e[ks - 1] / h, float(v[-1])


# ---------------------------------------------------------------------------------------------
# the decision


CAL_LEVELS: tuple[float, ...] = (0.05, 0.5, 0.95)  # final quantiles the scores need


def calibrate_decision(d: Decision, calibrator: Calibrator, curve: Curve, incumbent: float | None,
                       rule: StopRule) -> Decision:
    """``d`` with the final value's P(improve) recalibrated by ``calibrator`` (nothing changes
    before it has a completed trial, without an incumbent, for a complete trial or for the
    "expected_improvement" rule). The probabilities become ``max(model's, calibrated)``, so
    calibration only ever keeps running a trial the model alone would stop; ``d`` needs the
    final quantiles ``CAL_LEVELS``."""
    o = _observed(curve)
    inc = math.nan if incumbent is None else float(incumbent)
    fq = d.final_quantiles
    if (calibrator.trials == 0 or o is None or not math.isfinite(inc)
            or rule.kind == "expected_improvement" or any(q not in fq for q in CAL_LEVELS)):
        return d
    h = float(curve.horizon)
    last, _ = o
    if last >= h:
        return d
    direction = getattr(curve, "direction", "max")
    inc += -rule.min_delta if direction == "min" else rule.min_delta  # what counts as improving
    z = final_score(inc, fq[0.5], fq[0.05], fq[0.95], direction)
    pc = float(calibrator.prob_improve(last / h, d.prob_improve_final, z))
    pa, pf = max(d.prob_improve, pc), max(d.prob_improve_final, pc)
    p_rule = pa if rule.kind == "all_epochs" else pf
    stop = d.stop and p_rule <= rule.delta
    reason = d.reason
    if d.stop and not stop:
        reason = (f"the model's rule would stop, but calibrated on {calibrator.trials} completed "
                  f"trial(s) P(final value improves) = {pc:.3g} > {rule.delta:g}")
    elif stop:
        reason += f"; calibrated P(final value improves) = {pc:.3g}"
    return replace(d, stop=stop, prob_improve=pa, prob_improve_final=pf, reason=reason,
                   expected_remaining_epochs=0.0 if stop else max(h - last, 0.0))




def _incumbent(x: Any, i: int) -> float:
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise CurveError(i, "incumbent", f"must be a number or null, got {x!r}",
                         "send the best value seen so far (null if none)")
    f = float(x)
    if math.isinf(f):
        raise CurveError(i, "incumbent", "must be finite", "send the best value seen so far")
    return f


def _observed(c: Any) -> tuple[float, int] | None:
    """(last observed epoch, number of observed values), or None if unparseable (the
    predictor's validation then reports the problem)."""
    try:
        e = np.asarray(c.epochs, dtype=np.float64)
        v = np.asarray(c.values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if e.ndim != 1 or e.shape != v.shape:
        return None
    keep = ~np.isnan(v) & np.isfinite(e)
    if not keep.any():
        return None
    return float(e[keep].max()), int(keep.sum())


def checked_epochs(last: float, horizon: float, given: Any = None,
                   max_points: int = MAX_CHECKED_EPOCHS) -> np.ndarray:
    """The remaining epochs a decision looks at (ascending, ends at the horizon)."""
    if given is not None:
        g = np.asarray(given, dtype=np.float64).ravel()
        g = g[(g > last) & (g != horizon)]  # any beyond the horizon fail validation
        return np.unique(np.append(g, horizon))
    first = math.floor(last) + 1
    lastint = math.floor(horizon)
    if first > lastint:
        return np.array([horizon], dtype=np.float64)
    n = lastint - first + 1
    grid = (np.arange(first, lastint + 1, dtype=np.float64) if n <= max_points
            else np.unique(np.round(np.linspace(first, lastint, max_points))))
    return np.unique(np.append(grid[grid < horizon], horizon))


def _quantile_levels(qs: Sequence[float]) -> tuple[float, ...]:
    out = []
    for j, q in enumerate(qs):
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise CurveError(None, f"quantiles[{j}]", f"must lie strictly in (0, 1), got {q!r}",
                             "use e.g. [0.05, 0.5, 0.95]")
        out.append(float(q))
    return tuple(out)


def decide(
    predictor: Predictor,
    curves: Sequence[Curve],
    incumbents: Sequence[float | None],
    rule: StopRule = StopRule(),
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    calibrator: Calibrator | None = None,
) -> list[Decision]:
    """One decision per trial, for the whole batch in one predictor call; with a
    ``calibrator``, each decision goes through ``calibrate_decision``."""
    n = len(curves)
    if n == 0:
        raise CurveError(None, "curves", "is empty", "send at least one curve")
    if len(incumbents) != n:
        raise CurveError(None, "incumbents", f"has {len(incumbents)} entries for {n} curves",
                         "send one incumbent per curve (null for none yet)")
    if not isinstance(rule, StopRule):
        raise CurveError(None, "rule", f"must be a StopRule, got {type(rule).__name__}",
                         "pass StopRule(...) (or use rule_from_dict)")
    from pfn.predictor import Posterior  # torch: imported only where inference happens

    levels = _quantile_levels(quantiles)
    if calibrator is not None:
        levels = tuple(dict.fromkeys(levels + CAL_LEVELS))
    given = np.array([_incumbent(x, i) for i, x in enumerate(incumbents)], dtype=np.float64)
    obs = [_observed(c) for c in curves]
    is_min = np.array([getattr(c, "direction", "max") == "min" for c in curves])
    inc = given + np.where(is_min, -rule.min_delta, rule.min_delta)  # what counts as improving
    queried = []
    for c, o in zip(curves, obs, strict=True):
        qe = c.query_epochs  # unparseable curves go to the predictor as they are (it reports)
        if o is not None and isinstance(c.horizon, (int, float)) and math.isfinite(c.horizon):
            qe = checked_epochs(o[0], float(c.horizon), c.query_epochs)
        queried.append(replace(c, query_epochs=qe))
    post, starts = predictor.posterior_all(queried)  # validates every curve
    start = np.asarray(starts[:-1])
    final = np.asarray(starts[1:]) - 1  # the horizon is each curve's last checked epoch
    counts = np.diff(np.asarray(starts))
    inc_rows = np.repeat(np.nan_to_num(inc), counts)[:, None]  # (R, 1)
    cdf = post.cdf(inc_rows)[:, 0]  # P(y_t' <= incumbent)
    p_rows = np.where(np.repeat(is_min, counts), cdf, 1.0 - cdf)  # P(y_t' improves)
    p_all = np.maximum.reduceat(p_rows, start)
    arg_all = np.array([int(np.argmax(p_rows[a:b])) for a, b in zip(start, starts[1:],
                                                                     strict=True)])
    p_final = p_rows[final]
    fin = Posterior(post.bar, post.logits[final], post.scale[final], post.offset[final],
                    post.query_epochs[final])  # one row per curve: its horizon
    mean = fin.mean
    fq = fin.quantile(np.asarray(levels)) if levels else np.zeros((n, 0))
    u = (np.arange(EI_LEVELS) + 0.5) / EI_LEVELS
    draws = fin.quantile(u)  # (n, EI_LEVELS) evenly spaced in probability
    gain = np.where(is_min[:, None], inc[:, None] - draws, draws - inc[:, None])
    ei = np.clip(gain, 0.0, None).mean(axis=1)

    out = []
    for i, c in enumerate(curves):
        o = obs[i]
        assert o is not None  # the predictor accepted the curve
        last, n_obs = o
        h = float(c.horizon)
        remaining = max(h - last, 0.0)
        qd = {q: float(fq[i, j]) for j, q in enumerate(levels)}
        t_best = float(post.query_epochs[start[i] + arg_all[i]])
        if math.isnan(inc[i]):
            pa = pf = 1.0
            e_i = math.nan  # undefined without an incumbent (null in JSON)
        else:
            pa, pf, e_i = float(p_all[i]), float(p_final[i]), float(ei[i])
        if remaining <= 0:
            stop, reason = False, f"reached its horizon ({h:g}): complete, nothing to stop"
        elif math.isnan(inc[i]):
            stop, reason = False, "no incumbent yet: nothing to compare against, keep running"
        elif n_obs < rule.min_epochs:
            stop = False
            reason = (f"{n_obs} value(s) observed; the rule decides from "
                      f"{rule.min_epochs} on")
        elif rule.kind == "all_epochs":
            stop = pa <= rule.delta
            reason = (f"P(improve) <= {rule.delta:g} at every remaining epoch (max {pa:.3g} "
                      f"at epoch {t_best:g})" if stop else
                      f"P(improve) = {pa:.3g} > {rule.delta:g} at epoch {t_best:g}")
        elif rule.kind == "final_epoch":
            stop = pf <= rule.delta
            reason = (f"P(final value improves) = {pf:.3g} "
                      f"{'<=' if stop else '>'} {rule.delta:g}")
        else:
            g = float(rule.min_gain_per_epoch or 0.0)
            rate = e_i / remaining
            stop = rate <= g
            reason = (f"expected improvement {e_i:.3g} over {remaining:g} remaining epochs "
                      f"= {rate:.3g}/epoch {'<=' if stop else '>'} {g:g}")
        out.append(Decision(
            stop=bool(stop),
            prob_improve=pa,
            prob_improve_final=pf,
            final_mean=float(mean[i]),
            final_quantiles=qd,
            expected_remaining_epochs=0.0 if stop else remaining,
            reason=reason,
            expected_improvement=e_i,
        ))
    if calibrator is not None:
        asked = set(_quantile_levels(quantiles))
        out = [calibrate_decision(d, calibrator, c, None if math.isnan(x) else float(x), rule)
               for d, c, x in zip(out, curves, given, strict=True)]
        for d in out:
            d.final_quantiles = {q: v for q, v in d.final_quantiles.items() if q in asked}
    return out


def early_stop_json(predictor: Predictor, obj: Any, name: str = "default") -> dict[str, Any]:
    """A request dict in (see the module docstring), ``{"decisions": [...], "model": {...}}``
    out. Raises ``CurveError`` naming the field for anything malformed."""
    from pfn.summary import curves_from_json, model_info  # torch-free callers skip this

    if not isinstance(obj, Mapping):
        raise CurveError(None, "request", f"must be a JSON object, got {type(obj).__name__}",
                         'send {"curves": [...], "incumbents": [...]}')
    bad = sorted(set(obj) - REQUEST_KEYS)
    if bad:
        raise CurveError(None, bad[0], "is not an early-stop request field",
                         f"use only {', '.join(sorted(REQUEST_KEYS))}")
    raw = obj.get("curves")
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        for i, c in enumerate(raw):
            if isinstance(c, Mapping):
                extra = sorted(set(c) - EARLY_STOP_CURVE_KEYS)
                if extra:
                    raise CurveError(i, extra[0], "is not an early-stop curve field",
                                     f"use only {', '.join(sorted(EARLY_STOP_CURVE_KEYS))}")
    curves = curves_from_json({"curves": raw})
    incs = obj.get("incumbents")
    if isinstance(incs, (str, bytes, Mapping)) or not isinstance(incs, Sequence):
        raise CurveError(None, "incumbents", f"must be a list with one number (or null) per "
                         f"curve, got {type(incs).__name__}", "send the best value seen so far")
    levels = obj.get("quantiles", DEFAULT_QUANTILES)
    if isinstance(levels, (str, bytes, Mapping)) or not isinstance(levels, Sequence):
        raise CurveError(None, "quantiles", "must be a list of numbers in (0, 1)",
                         "send e.g. [0.05, 0.5, 0.95]")
    rule = rule_from_dict(obj.get("rule"))
    ds = decide(predictor, curves, list(incs), rule, list(levels))
    return {"decisions": [decision_to_dict(d) for d in ds], "model": model_info(predictor, name)}


__all__ = [
    "CALIBRATION_MATCH",
    "CAL_LEVELS",
    "DEFAULT_QUANTILES",
    "Calibrator",
    "calibrate_decision",
    "calibration_prefixes",
    "final_score",
    "MAX_CHECKED_EPOCHS",
    "RULE_KINDS",
    "Decision",
    "StopRule",
    "checked_epochs",
    "curve_to_dict",
    "decide",
    "decision_from_dict",
    "decision_to_dict",
    "early_stop_json",
    "rule_from_dict",
    "rule_to_dict",
]
