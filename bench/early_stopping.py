"""Replay HPO with early stopping on real learning curves (the LC-PFN paper's protocol).

    python bench/early_stopping.py --curves ../shared/data/real_curves.npz [--json]
    python bench/early_stopping.py --curves FILE --tasks wikitext --orderings 5   # quick look
    python bench/early_stopping.py --render out1.json out2.json    # tables of saved runs

Protocol, per task (all curves with the same ``task``; one curve = one trial):

* ``--orderings`` (40) random orderings of the trials, the same for every policy. Trials run
  one after another and reveal their curve point by point (one point = one epoch of cost; a
  trial that crashed early simply ends). A policy decides after every point whether to stop
  the running trial; a stopped trial never resumes. The budget is 20 full runs: 20 x the mean
  number of points of the task's curves. The replay of an ordering ends when the budget is
  spent or every trial was tried.
* Values: regret is always measured on ``y`` (normalised to [0, 1], higher is better, clipped;
  robust to diverged runs). Decisions use ``y`` too by default (``--values y``; the model sees
  bounds (0, 1)). With ``--values raw`` the policies see ``y_raw`` in the metric's direction;
  curvecast then gets causal bounds: (0, 1) for accuracies, (0, norm_zero) for losses, where
  ``norm_zero`` is the untrained model's loss (``y``'s loss normalisation uses the task's
  lowest loss, a mild look-ahead).
* Anytime regret after e epochs: (best value of any point of any trial of the task - best
  value revealed so far) / (max - min of the trials' final values), i.e. the best checkpoint
  found so far; averaged over the orderings. ``regret`` in the rows is its value at the end of
  the budget.
* Speed-up: epochs the no-stopping baseline needs to reach its own end-of-budget mean regret
  divided by the epochs the policy needs to reach that regret or better (``null`` when it
  never does within the budget). ``epochs_used``: mean epochs spent (<= budget);
  ``epochs_to_target``: the denominator of the speed-up.

Policies: ``none``; ``curvecast-d<delta>`` (the paper's rule at several confidence levels; the
incumbent is the best value revealed so far, this trial's included); ``curvecast-cal<s>-d<delta>``
(the same rule with the API's online calibration, ``pfn.early_stop.Calibrator``, learned per
ordering from the trials that reached their horizon; the first s trials are never stopped;
``cal0x``: the two-sided variant, where the calibrated probability alone decides);
``curvecast-d<delta>-m<margin>`` (family ``margin``, not in the defaults: the paper's rule with
``StopRule.min_delta``); ``curvecast-[d<delta>-]ei<g>`` (family ``gain``, not in the defaults:
the API's ``expected_improvement`` rule with a gain of g per full run, alone or OR'ed with the
paper's); ``curvecast-d<delta>-opp<c>`` / ``-opps<c>`` (family ``opportunity``, not in the
defaults, not in the API: the paper's rule OR'ed with an opportunity-cost rule that stops a
trial whose expected improvement per remaining epoch is below c x the mean of the other trials'
at the same point, ``opp``, or at their first decision, ``opps``; see ``OpportunityPolicy``);
``curvecast-d<delta>-gate`` / ``-bud`` (family ``budget``, not in the defaults: what the Optuna
pruner and the Ray scheduler do with ``budget=Budget(n_trials, epochs)``, the paper's rule
vetoed while the budget reaches every untried trial, then the API's opportunity rule while it
does not; see ``BudgetPolicy``; ``curvecast-cal2-d<delta>-bud``: the same with the
integrations' default calibration and two protected trials);
``curvecast-rung<score><eta>f<first>`` (family ``rungs``, not in the defaults: what the
integrations do with a budget and ``budget_rule="rungs"``, their default: trials ranked
against each other at rungs of first x eta^m points by the median of their predicted final
value, the cut set by the pressure; ``rungvalue``: ranked by the best value so far instead,
successive halving's ranking, the ablation; ``curvecast-d<delta>-rung...``: also OR'ed with the
paper's rule; see ``RungPolicy``);
``patience-<k>`` (stop
a trial after k points without improving on its own best; k = 0 stops at the first point
that does not improve); Optuna's ``MedianPruner``, ``SuccessiveHalvingPruner`` and
``HyperbandPruner`` (defaults; real Optuna studies driven with ask/report/should_prune/tell).

Efficiency: a curvecast decision depends on the incumbent only through a threshold: the rule
``P(y_t' > inc) <= delta for all checked t'`` holds iff ``inc >= max_t' Q_t'(1 - delta)``. So
one forward pass per (trial, points seen) gives the decision for every incumbent and every
delta; these are cached per task, and the 40 orderings advance in lockstep so that the missing
ones are computed in batches. The inference cost per decision is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pfn import Curve, Predictor  # noqa: E402
from pfn.early_stop import (  # noqa: E402
    MAX_CHECKED_EPOCHS,
    OPPORTUNITY_LEVELS,
    OPPORTUNITY_MIN_TRIALS,
    RUNG_ETA,
    Z_SCALE,
    Budget,
    Calibrator,
    Decision,
    Rungs,
    budget_pressure,
    checked_epochs,
    decide,
    expected_gain,
    is_rung,
)
from pfn.io import DECISION_MODEL  # noqa: E402
from pfn.predictor import Posterior  # noqa: E402

BUDGET_RUNS = 20  # the budget, in full runs
DEFAULT_DELTAS = (0.01, 0.05, 0.1)
PATIENCES = (0, 1, 5, 10, 20, 50)
OPTUNA_PRUNERS = ("median", "successive_halving", "hyperband")
POLICY_FAMILIES = ("curvecast", "calibrated", "margin", "gain", "opportunity", "budget",
                   "rung", "rungs", "rungsq", "rungsb", "rungsp", "oracle", "patience", "optuna")
# those that ask the model
MODEL_FAMILIES = frozenset(POLICY_FAMILIES) - {"oracle", "patience", "optuna"}
ORACLE_ETAS = (4, 16)  # the "oracle" family: the rung rule ranking by the trial's true best value
MARGINS = (0.005, 0.01, 0.02)  # min_delta of the "margin" family, in regret units
GAINS = (0.01, 0.03)  # expected final-value gain worth a full run, in regret units
# (score, eta, first rung, OR'ed with the paper's rule, protected first trials)
RUNG_VARIANTS = (("median", 4, 1, False, 0), ("median", 3, 1, False, 0),
                 ("median", 4, 1, True, 0), ("value", 4, 1, False, 0), ("median", 4, 1, False, 2))
OPPORTUNITY_FACTORS = (1.0,)  # the "opportunity" family: c in the rule (see its class)
# (startup trials, prior weight, two-sided) of the calibrated policies: cal0 and cal2 use the
# API's veto-only semantics, cal0x is the two-sided variant the API does not offer
CALIBRATED_VARIANTS = ((0, 10.0, False), (2, 10.0, False), (0, 1.0, True))
BATCH = 128  # curves per forward pass
BENCH_CHECKED_EPOCHS = 8  # remaining epochs checked per decision in the replay (cost ~ tokens)
TAIL_GRID = np.geomspace(0.99, 1e-6, 61)  # P(final improves) levels, calibrated policies


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Task:
    name: str
    y: np.ndarray  # (n, T) regret units: normalised, higher is better, NaN after the end
    s: np.ndarray  # (n, T) the values policies see, higher is better (+y, +y_raw or -y_raw)
    model_values: np.ndarray  # (n, T) what curvecast's model is given (y or y_raw)
    x: np.ndarray  # (n, T) epoch / step of every point
    lengths: np.ndarray  # (n,) points per trial
    horizon: np.ndarray  # (n,) planned final x of every trial
    direction: str  # "max" or "min": of model_values
    bounds: tuple[float | None, float | None]  # for the model
    lr_decay: bool = False  # its runs' learning rate decays before the horizon (Curve.lr_decay)

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def budget(self) -> int:
        return int(round(BUDGET_RUNS * float(self.lengths.mean())))


def load_tasks(path: str | Path, values: str = "y", tasks: Sequence[str] | None = None,
               min_trials: int = 20, filter_flat: bool = False) -> list[Task]:
    d = np.load(path, allow_pickle=False)
    names = d["task"].astype(str)
    out = []
    all_names = sorted(set(names.tolist()))
    for name in all_names:
        # an entry naming a task exactly selects only that task, else it is a substring
        if tasks and not any(t == name or (t not in all_names and t in name) for t in tasks):
            continue
        m = names == name
        lengths = d["lengths"][m].astype(int)
        y = d["y"][m].astype(np.float64)
        if filter_flat:
            keep = d["complete"][m] & (np.nanmax(y, 1) - np.nanmin(y, 1) > 0.02)
            m = np.flatnonzero(m)[keep]
            lengths, y = lengths[keep], y[keep]
        if len(lengths) < min_trials:
            continue
        x = d["x"][m].astype(np.float64)
        last_x = x[np.arange(len(lengths)), lengths - 1]
        horizon = np.maximum(d["budget"][m].astype(np.float64), last_x)
        bounds: tuple[float | None, float | None]
        if values == "y":
            mv, s, direction, bounds = y, y, "max", (0.0, 1.0)
        else:
            raw = d["y_raw"][m].astype(np.float64)
            direction = str(d["metric_direction"][m][0])
            s = raw if direction == "max" else -raw
            bounds = (0.0, 1.0) if direction == "max" else (0.0, float(d["norm_zero"][m][0]))
            if direction == "max" and np.nanmax(raw) > 1.0:
                bounds = (None, None)  # not an accuracy in [0, 1]: let the predictor infer
            mv = raw
        out.append(Task(name, y, s, mv, x, lengths, horizon, direction, bounds))
    return out


# ---------------------------------------------------------------------------------------------
# replay


@dataclass
class Replay:
    """One ordering of one task under one policy."""

    order: np.ndarray
    budget: int
    index: int = 0  # which ordering
    pos: int = 0  # index into order of the running trial
    k: int = 0  # points the running trial revealed
    spent: int = 0
    revealed: list[float] = field(default_factory=list)  # y of every revealed point
    best_s: float = -math.inf  # best value (policy units) revealed so far: the incumbent
    done: bool = False
    trials_started: int = 0
    runs: list[tuple[int, int]] = field(default_factory=list)  # (trial, points it revealed)
    ctx: dict[str, Any] = field(default_factory=dict)  # per-policy state

    def trial(self) -> int:
        return int(self.order[self.pos])


class Policy:
    name = "none"

    def start(self, r: Replay, task: Task, i: int) -> None:
        pass

    def observe(self, r: Replay, task: Task, i: int, k: int) -> None:
        """Point k (1-based) of trial i was revealed."""

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        pass

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        return [False] * len(rs)


def run_policy(task: Task, orders: np.ndarray, policy: Policy) -> list[Replay]:
    """All orderings in lockstep: every round reveals one point per active replay, then the
    policy decides for all replays whose trial goes on, in one call."""
    reps = [Replay(order=o, budget=task.budget, index=j) for j, o in enumerate(orders)]
    for r in reps:
        r.trials_started = 1
        policy.start(r, task, r.trial())
    active = list(reps)
    while active:
        ask: list[Replay] = []
        for r in active:
            i = r.trial()
            r.revealed.append(float(task.y[i, r.k]))
            r.best_s = max(r.best_s, float(task.s[i, r.k]))
            r.k += 1
            r.spent += 1
            policy.observe(r, task, i, r.k)
            if r.k >= task.lengths[i]:
                _finish(r, task, policy, completed=True)
            elif r.spent >= r.budget:
                _finish(r, task, policy, completed=False)
            else:
                ask.append(r)
        if ask:
            for r, stop in zip(ask, policy.decide(ask, task), strict=True):
                if stop:
                    _finish(r, task, policy, completed=False)
        active = [r for r in active if not r.done]
    return reps


def _finish(r: Replay, task: Task, policy: Policy, completed: bool) -> None:
    """End the running trial (completed, stopped, or out of budget); start the next one."""
    i = r.trial()
    policy.end(r, task, i, completed)
    r.runs.append((i, r.k))
    r.pos += 1
    r.k = 0
    if r.pos >= len(r.order) or r.spent >= r.budget:
        r.done = True
        return
    r.trials_started += 1
    policy.start(r, task, r.trial())


# ---------------------------------------------------------------------------------------------
# policies


class Patience(Policy):
    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"patience-{k}"

    def start(self, r: Replay, task: Task, i: int) -> None:
        r.ctx["own_best"], r.ctx["since"] = -math.inf, 0

    def observe(self, r: Replay, task: Task, i: int, k: int) -> None:
        v = float(task.s[i, k - 1])
        if v > r.ctx["own_best"]:
            r.ctx["own_best"], r.ctx["since"] = v, 0
        else:
            r.ctx["since"] += 1

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        return [r.ctx["since"] > self.k for r in rs]


class OptunaPolicy(Policy):
    """A real Optuna study per ordering; the pruner decides through trial.should_prune()."""

    def __init__(self, which: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.optuna = optuna
        self.which = which
        self.name = {"median": "optuna-median", "successive_halving": "optuna-sha",
                     "hyperband": "optuna-hyperband"}[which]

    def _pruner(self, task: Task) -> Any:
        p = self.optuna.pruners
        if self.which == "median":
            return p.MedianPruner()
        if self.which == "successive_halving":
            return p.SuccessiveHalvingPruner()
        return p.HyperbandPruner(min_resource=1, max_resource=int(task.lengths.max()))

    def start(self, r: Replay, task: Task, i: int) -> None:
        if "study" not in r.ctx:
            r.ctx["study"] = self.optuna.create_study(  # Hyperband's brackets hash the name
                study_name=f"replay-{r.index}", direction="maximize", pruner=self._pruner(task),
                sampler=self.optuna.samplers.RandomSampler(seed=0))
        r.ctx["trial"] = r.ctx["study"].ask()

    def observe(self, r: Replay, task: Task, i: int, k: int) -> None:
        r.ctx["trial"].report(float(task.s[i, k - 1]), k)

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        st = self.optuna.trial.TrialState
        t = r.ctx["trial"]
        if completed:
            r.ctx["study"].tell(t, float(task.s[i, task.lengths[i] - 1]))
        else:
            r.ctx["study"].tell(t, state=st.PRUNED)

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        return [bool(r.ctx["trial"].should_prune()) for r in rs]


@dataclass
class InferenceStats:
    forward_s: float = 0.0  # wall seconds in posterior_all + thresholds
    forward_cpu_s: float = 0.0  # CPU seconds of the same (robust to a shared machine)
    computed: int = 0  # (trial, points) pairs that went through the model
    answered: int = 0  # decisions answered (cache hits included)
    batches: int = 0


class ThresholdCache:
    """Per task: (trial, points seen) -> the incumbent (policy units) at or above which the
    all-epochs rule stops, for every delta. One forward pass per pair, batched."""

    def __init__(self, predictor: Predictor, task: Task, deltas: Sequence[float],
                 max_checked: int = MAX_CHECKED_EPOCHS, stats: InferenceStats | None = None):
        self.predictor = predictor
        self.task = task
        self.deltas = np.asarray(deltas, dtype=np.float64)
        self.max_checked = max_checked
        self.cache: dict[tuple[int, int], np.ndarray] = {}
        # the prediction of the final value, in policy units (higher is better): quantiles
        # at P(improve) = TAIL_GRID (ascending), median, scale; and the final's score
        self.final: dict[tuple[int, int], tuple[np.ndarray, float, float]] = {}
        self.score: dict[tuple[int, int], float] = {}  # z of the final (trials at horizon)
        # the best predicted median over the checked remaining epochs (policy units)
        self.peak: dict[tuple[int, int], float] = {}
        self.stats = stats or InferenceStats()

    def curve(self, i: int, k: int) -> Curve:
        t = self.task
        xs = t.x[i, :k]
        return Curve(xs, t.model_values[i, :k], horizon=float(t.horizon[i]),
                     query_epochs=checked_epochs(float(xs[-1]), float(t.horizon[i]),
                                                 max_points=self.max_checked),
                     direction=t.direction,  # type: ignore[arg-type]
                     bounds=t.bounds, lr_decay=t.lr_decay)

    def compute(self, pairs: Sequence[tuple[int, int]]) -> None:
        todo = sorted({p for p in pairs if p not in self.cache}, key=lambda p: p[1])
        sign = 1.0 if self.task.direction == "max" else -1.0
        # the rule's levels, then the median (for the peak): one quantile pass per batch
        levels = np.append(1.0 - self.deltas if sign > 0 else self.deltas, 0.5)
        for a in range(0, len(todo), BATCH):
            chunk = todo[a:a + BATCH]
            t0, c0 = time.perf_counter(), time.process_time()
            post, starts = self.predictor.posterior_all([self.curve(i, k) for i, k in chunk])
            q = sign * post.quantile(np.repeat(levels[None, :], len(post), axis=0))
            best = np.maximum.reduceat(q, np.asarray(starts[:-1]), axis=0)  # (len(chunk), nd+1)
            thr, peak = best[:, :-1], best[:, -1]
            h = np.asarray(starts[1:]) - 1  # each curve's horizon row
            fin = Posterior(post.bar, post.logits[h], post.scale[h], post.offset[h],
                            post.query_epochs[h])
            lv = np.concatenate([1.0 - TAIL_GRID, [0.05, 0.5, 0.95]])
            fq = sign * fin.quantile(np.repeat((lv if sign > 0 else 1.0 - lv)[None, :],
                                               len(chunk), axis=0))
            med, scale = fq[:, -2], np.abs(fq[:, -1] - fq[:, -3]) / Z_SCALE
            fv = sign * np.array([self.final_value(i) for i, _ in chunk])
            self.stats.forward_s += time.perf_counter() - t0
            self.stats.forward_cpu_s += time.process_time() - c0
            self.stats.computed += len(chunk)
            self.stats.batches += 1
            for j, p in enumerate(chunk):
                self.cache[p] = thr[j]
                self.peak[p] = float(peak[j])
                self.final[p] = (fq[j, :-3], float(med[j]), float(max(scale[j], 1e-9)))
                if math.isfinite(fv[j]):
                    self.score[p] = (float(fv[j]) - float(med[j])) / float(max(scale[j], 1e-9))

    def final_value(self, i: int) -> float:
        """The model-units value a trial reached at its horizon (NaN if it ended before)."""
        t = self.task
        last = t.lengths[i] - 1
        return float(t.model_values[i, last]) if t.x[i, last] >= t.horizon[i] else math.nan

    def final_prob_and_score(self, i: int, k: int, inc: float) -> tuple[float, float]:
        """The model's P(final improves on inc) (interpolated in log P on TAIL_GRID) and the
        incumbent's score, for the prediction from trial i's first k points."""
        gq, med, scale = self.final[(i, k)]
        logp = np.interp(inc, gq, np.log(TAIL_GRID))  # gq ascends as P(improve) falls
        return float(math.exp(logp)), (inc - med) / scale

    def get(self, i: int, k: int) -> np.ndarray:
        return self.cache[(i, k)]

    def fetch(self, rs: Sequence[Replay], min_epochs: int) -> list[tuple[int, int]]:
        """The (trial, points) pairs of these replays, computed where a decision is due."""
        pairs = [(r.trial(), r.k) for r in rs]
        need = [p for p, r in zip(pairs, rs, strict=True) if r.k >= min_epochs]
        self.compute(need)
        self.stats.answered += len(need)
        return pairs

    def expected_improvement(self, i: int, k: int, inc: float) -> float:
        """E[max(0, final - inc)] (policy units) from the cached final-value quantiles:
        the integral of P(final > v) over v > inc (trapezoids on TAIL_GRID's quantiles; P
        taken as 1 below the lowest one)."""
        gq = self.final[(i, k)][0]
        tau = TAIL_GRID
        below = max(gq[0] - inc, 0.0)  # P(final > v) ~ 1 there
        x = np.concatenate([[max(inc, gq[0])], gq[gq > inc]])
        p = np.concatenate([[np.interp(x[0], gq, tau)], tau[gq > inc]])
        return below + float(np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(x)))


class CurvecastPolicy(Policy):
    def __init__(self, cache: ThresholdCache, j: int, min_epochs: int = 2,
                 min_delta: float = 0.0) -> None:
        self.cache = cache
        self.j = j  # which delta
        self.min_epochs = min_epochs
        self.min_delta = min_delta  # improvements below this margin do not count
        self.name = f"curvecast-d{cache.deltas[j]:g}" + (f"-m{min_delta:g}" if min_delta else "")

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        pairs = self.cache.fetch(rs, self.min_epochs)
        return [r.k >= self.min_epochs and r.best_s + self.min_delta >= self.cache.get(*p)[self.j]
                for p, r in zip(pairs, rs, strict=True)]


class _OrPaperRule(Policy):
    """A rule of its own (``extra``), alone or OR'ed with the all-epochs rule at delta index
    ``j`` (stop when either fires); nothing before ``min_epochs`` points."""

    cache: ThresholdCache
    j: int | None
    min_epochs: int

    def extra(self, i: int, k: int, r: Replay, task: Task) -> bool:
        raise NotImplementedError

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        pairs = self.cache.fetch(rs, self.min_epochs)
        out = []
        for (i, k), r in zip(pairs, rs, strict=True):
            if k < self.min_epochs:
                out.append(False)
            elif self.j is not None and r.best_s >= self.cache.get(i, k)[self.j]:
                out.append(True)
            else:
                out.append(self.extra(i, k, r, task))
        return out


def remaining_fraction(task: Task, i: int, k: int) -> float:
    """The share of a full run trial i has left after its first k points."""
    h = float(task.horizon[i])
    return (h - float(task.x[i, k - 1])) / h


class GainPolicy(_OrPaperRule):
    """The API's ``expected_improvement`` rule with ``min_gain_per_epoch = gain / horizon``
    (a per-task scale: ``gain`` is the expected improvement of the final value, in the regret
    units, worth one full run of compute), alone or OR'ed with the all-epochs rule at delta
    index ``j`` (stop when either fires)."""

    def __init__(self, cache: ThresholdCache, gain: float, j: int | None = None,
                 min_epochs: int = 2) -> None:
        self.cache = cache
        self.gain = gain
        self.j = j
        self.min_epochs = min_epochs
        self.name = (f"curvecast-ei{gain:g}" if j is None
                     else f"curvecast-d{cache.deltas[j]:g}-ei{gain:g}")

    def extra(self, i: int, k: int, r: Replay, task: Task) -> bool:
        ei = self.cache.expected_improvement(i, k, r.best_s)
        return ei <= self.gain * remaining_fraction(task, i, k)


def ei_rows(gq: np.ndarray, inc: float) -> np.ndarray:
    """E[max(0, F - inc)] for each row of ``gq`` (m, len(TAIL_GRID)): F's quantiles at
    P(F > v) = TAIL_GRID, ascending; P taken as 1 below the first one (trapezoids)."""
    tau = 0.5 * (TAIL_GRID[1:] + TAIL_GRID[:-1])
    seg = np.clip(gq[:, 1:] - np.maximum(gq[:, :-1], inc), 0.0, None)  # (m, 60)
    return np.clip(gq[:, 0] - inc, 0.0, None) + seg @ tau


class OpportunityPolicy(_OrPaperRule):
    """Opportunity cost: stop a trial when its expected improvement over the incumbent per
    remaining epoch is below ``c`` x what another trial offers per epoch of a full run:
    E[max(0, F - inc)] under the model's prediction of the final F from the trial's first k
    points, against the mean of the same quantity over the trials that ended in this ordering,
    each taken from its first min(k, points it revealed) points (``same``: the trials as they
    looked at the same point, SHA's rung; ``start``: from their first ``min_epochs`` points,
    as a fresh trial looks when first judged). OR'ed with the all-epochs rule at delta index
    ``j`` (None: alone). Needs ``min_pop`` ended trials."""

    def __init__(self, cache: ThresholdCache, c: float, j: int | None = None,
                 min_epochs: int = 2, min_pop: int = 3, ref: str = "same") -> None:
        self.cache = cache
        self.c = c
        self.j = j
        self.min_epochs = min_epochs
        self.min_pop = min_pop
        self.ref = ref
        tag = f"opp{'s' if ref == 'start' else ''}{c:g}"
        self.name = (f"curvecast-{tag}" if j is None
                     else f"curvecast-d{cache.deltas[j]:g}-{tag}")

    def start(self, r: Replay, task: Task, i: int) -> None:
        r.ctx.setdefault("pop", [])

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        rows = [self.cache.final[(i, k)][0] for k in range(self.min_epochs, r.k + 1)
                if (i, k) in self.cache.final]
        if rows and (self.ref == "same" or (i, self.min_epochs) in self.cache.final):
            r.ctx["pop"].append(np.stack(rows) if self.ref == "same" else rows[0][None, :])

    def extra(self, i: int, k: int, r: Replay, task: Task) -> bool:
        pop = r.ctx["pop"]
        if len(pop) < self.min_pop:
            return False
        at = k - self.min_epochs
        fresh = float(ei_rows(np.stack([a[min(at, len(a) - 1)] for a in pop]), r.best_s).mean())
        ei = float(ei_rows(self.cache.final[(i, k)][0][None, :], r.best_s)[0])
        return ei < self.c * remaining_fraction(task, i, k) * fresh


def replay_pressure(r: Replay) -> float:
    """``pfn.early_stop.budget_pressure`` of the replay's study: every trial of the task
    planned, the replay's budget, the trials ended so far in this ordering."""
    return budget_pressure(Budget(len(r.order), r.budget), r.pos + 1, r.spent,
                           [k for _, k in r.runs])


def opportunity_draws(gq: np.ndarray) -> np.ndarray:
    """The final value's quantiles at ``pfn.early_stop.OPPORTUNITY_LEVELS`` (what the API's
    opportunity rule keeps per decision), interpolated from the cache's tail grid (rows of
    ``gq``: the values v with P(F > v) = TAIL_GRID, ascending)."""
    tail = 1.0 - np.asarray(OPPORTUNITY_LEVELS)
    return np.stack([np.interp(tail, TAIL_GRID[::-1], row[::-1]) for row in np.atleast_2d(gq)])


class BudgetPolicy(Policy):
    """Budget-aware stopping as the integrations do it with ``budget=Budget(n_trials, epochs)``
    (the study's plan; here every trial of the task and the replay's budget): the all-epochs
    rule at delta index ``j``, vetoed while the pressure (``replay_pressure``) is below 1
    (``pfn.early_stop.gate_by_budget``), then, while it is above 1, the opportunity rule of
    ``pfn.early_stop.Opportunity`` (c = 1 - 1/pressure), with the API's ``expected_gain`` on
    the same ``OPPORTUNITY_LEVELS``. ``opportunity=False``: the gate alone.
    No tuned constant. (Differences from the API: the checked epochs of the all-epochs rule,
    ``--max-checked``, and the levels interpolated from the cache's tail grid.)"""

    def __init__(self, cache: ThresholdCache, j: int, opportunity: bool = True,
                 min_epochs: int = 2) -> None:
        self.cache = cache
        self.j = j
        self.opportunity = opportunity
        self.min_epochs = min_epochs
        self.name = f"curvecast-d{cache.deltas[j]:g}-{'bud' if opportunity else 'gate'}"

    def start(self, r: Replay, task: Task, i: int) -> None:
        r.ctx.setdefault("pop", [])

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        rows = [self.cache.final[(i, k)][0] for k in range(self.min_epochs, r.k + 1)
                if (i, k) in self.cache.final]
        if rows:  # its predictions after min_epochs, min_epochs + 1, ... values
            r.ctx["pop"].append(opportunity_draws(np.stack(rows)))

    def opportunity_stop(self, i: int, k: int, r: Replay, task: Task, pressure: float) -> bool:
        pop = r.ctx["pop"]
        if len(pop) < OPPORTUNITY_MIN_TRIALS or not math.isfinite(pressure):
            return False
        at = k - self.min_epochs
        ref = np.stack([a[min(at, len(a) - 1)] for a in pop])  # (ended, levels)
        fresh = float(expected_gain(ref, r.best_s).mean())
        own = float(expected_gain(opportunity_draws(self.cache.final[(i, k)][0])[0], r.best_s))
        return own < (1.0 - 1.0 / pressure) * remaining_fraction(task, i, k) * fresh

    def rule_stops(self, rs: list[Replay], task: Task,
                   pairs: list[tuple[int, int]]) -> list[bool]:
        """The all-epochs rule's verdicts (the part the gate may veto)."""
        return [k >= self.min_epochs and r.best_s >= self.cache.get(i, k)[self.j]
                for (i, k), r in zip(pairs, rs, strict=True)]

    def protected(self, r: Replay) -> bool:
        return False

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        pairs = self.cache.fetch(rs, self.min_epochs)
        out = []
        for (i, k), r, stop in zip(pairs, rs, self.rule_stops(rs, task, pairs), strict=True):
            p = replay_pressure(r)
            if k < self.min_epochs or p < 1.0 or self.protected(r):
                out.append(False)
            else:
                out.append(stop or (self.opportunity
                                    and self.opportunity_stop(i, k, r, task, p)))
        return out


class CalibratedPolicy(Policy):
    """The all-epochs rule, with the final value's P(improve) recalibrated online
    (``pfn.early_stop.Calibrator``) from the trials of the same ordering that reached their
    horizon (causal, per ordering). Veto-only (the API's semantics): stop when the model's rule
    and the calibrated probability are both <= delta. ``two_sided``: once the calibrator has a
    trial, stop when the calibrated probability alone is <= delta. The first ``startup``
    trials of an ordering are never stopped (the calibration's first data)."""

    def __init__(self, cache: ThresholdCache, j: int, min_epochs: int = 2,
                 prior_weight: float = 10.0, startup: int = 1, two_sided: bool = False) -> None:
        self.cache = cache
        self.j = j
        self.delta = float(cache.deltas[j])
        self.min_epochs = min_epochs
        self.prior_weight = prior_weight
        self.startup = startup
        self.two_sided = two_sided
        self.name = f"curvecast-cal{startup}{'x' if two_sided else ''}-d{self.delta:g}"

    def start(self, r: Replay, task: Task, i: int) -> None:
        r.ctx.setdefault("cal", Calibrator(self.prior_weight))

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        ks = [k for k in range(self.min_epochs, r.k) if (i, k) in self.cache.score]
        if completed and ks:
            r.ctx["cal"].add([task.x[i, k - 1] / task.horizon[i] for k in ks],
                             [self.cache.score[(i, k)] for k in ks])

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        pairs = self.cache.fetch(rs, self.min_epochs)
        out = []
        for (i, k), r in zip(pairs, rs, strict=True):
            if k < self.min_epochs or r.trials_started <= self.startup:
                out.append(False)
                continue
            cal = r.ctx["cal"]
            model_stop = bool(r.best_s >= self.cache.get(i, k)[self.j])
            if cal.trials == 0 or not (model_stop or self.two_sided):
                out.append(model_stop)
                continue
            p, z = self.cache.final_prob_and_score(i, k, r.best_s)
            pc = cal.prob_improve(task.x[i, k - 1] / task.horizon[i], p, z)
            out.append(bool(pc <= self.delta))
        return out


class CalibratedBudgetPolicy(BudgetPolicy):
    """What the integrations do by default with a budget: ``BudgetPolicy`` whose all-epochs
    rule is ``CalibratedPolicy``'s (online calibration, veto only; the first ``startup``
    trials of an ordering are never stopped, ``n_startup_trials=2``)."""

    def __init__(self, cache: ThresholdCache, j: int, startup: int = 2,
                 min_epochs: int = 2) -> None:
        super().__init__(cache, j, True, min_epochs)
        self.cal = CalibratedPolicy(cache, j, min_epochs, startup=startup)
        self.startup = startup
        self.name = f"curvecast-cal{startup}-d{cache.deltas[j]:g}-bud"

    def start(self, r: Replay, task: Task, i: int) -> None:
        super().start(r, task, i)
        self.cal.start(r, task, i)

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        super().end(r, task, i, completed)
        self.cal.end(r, task, i, completed)

    def rule_stops(self, rs: list[Replay], task: Task,
                   pairs: list[tuple[int, int]]) -> list[bool]:
        return self.cal.decide(rs, task)

    def protected(self, r: Replay) -> bool:
        return r.trials_started <= self.startup


BLEND_MIN = 5  # completed trials with a score at a rung before the blend leaves the model's


def blend_weight(done: Sequence[tuple[float, float, float]]) -> float:
    """w in [0, 1] of the score o + w (p - o): least squares of final - o on p - o over the
    completed trials (p the predicted final median at the rung, o the value so far); 1 (the
    model's prediction) until BLEND_MIN trials completed."""
    if len(done) < BLEND_MIN:
        return 1.0
    a = np.asarray(done)
    x, y = a[:, 0] - a[:, 1], a[:, 2] - a[:, 1]
    vx = float(np.var(x))
    if vx <= 1e-12:
        return 1.0
    return float(np.clip(np.mean((x - x.mean()) * (y - y.mean())) / vx, 0.0, 1.0))


class RungPolicy(Policy):
    """Budget-aware stopping with ``budget_rule="rungs"``, as the integrations do it
    (``pfn.early_stop.Rungs`` itself, one per ordering, fed the replay's pressure): at rungs of
    ``first`` x ``eta``^m points a trial is ranked by its ``score`` among every trial of the
    ordering that reached the same rung, and stopped unless it is in the top share ``max(1/eta,
    1/pressure)``; nothing while the pressure is below 1. ``score``: ``"median"`` of the model's
    prediction of the final value (the API's), or ``"value"`` (the best value so far: successive
    halving's own ranking, the ablation without the model's extrapolation) or
    ``"q75"``/``"q90"`` (an upper quantile of the predicted final: the optimistic ablation,
    family ``rungsq``) or ``"blend"`` (``o + w (p - o)`` of the value so far o and the
    median p, w fitted on the ordering's completed trials by ``blend_weight``: family
    ``rungsb``) or ``"peak"`` (the best of the per-epoch predicted medians over the checked
    remaining epochs: the best value the trial is predicted to reach rather than its final
    one, family ``rungsp``) or ``"oracle"`` (the best value the trial will ever reveal, read
    from the file: the rule with a perfect extrapolation, a diagnostic bound that needs no model,
    family ``oracle``; ``cache`` may then be None). ``j``: also OR'ed with the all-epochs rule
    at that delta index from ``min_epochs`` points on (the API does not: ``BudgetAware``
    ignores the rule's verdict with rungs). ``startup``: the first trials of an ordering run
    to their end and join no rung (the integrations' ``n_startup_trials``: no decision before
    that many trials completed)."""

    def __init__(self, cache: ThresholdCache | None, j: int | None, score: str = "median",
                 eta: int = RUNG_ETA, first: int = 1, min_epochs: int = 2,
                 startup: int = 0) -> None:
        self.cache = cache
        self.startup = startup
        self.j = j
        self.score = score
        self.eta = eta
        self.first = first
        self.min_epochs = min_epochs
        tag = (f"s{startup}-" if startup else "") + f"rung{score}{eta}f{first}"
        if score == "oracle":
            self.name = f"oracle-rung{eta}"
        elif cache is None:
            raise ValueError(f"score {score!r} asks the model: a ThresholdCache is needed")
        else:
            self.name = (f"curvecast-{tag}" if j is None
                         else f"curvecast-d{cache.deltas[j]:g}-{tag}")

    def start(self, r: Replay, task: Task, i: int) -> None:
        r.ctx.setdefault("rungs", Rungs(self.eta, self.first))
        r.ctx["own"] = -math.inf
        r.ctx["cur"] = {}  # rung -> (predicted final median, value so far) of this trial

    def end(self, r: Replay, task: Task, i: int, completed: bool) -> None:
        if completed:  # what its rungs' scores said, against where it ended
            final = float(task.s[i, task.lengths[i] - 1])
            for k, (p, o) in r.ctx["cur"].items():
                r.ctx.setdefault("done", {}).setdefault(k, []).append((p, o, final))

    def observe(self, r: Replay, task: Task, i: int, k: int) -> None:
        r.ctx["own"] = max(r.ctx["own"], float(task.s[i, k - 1]))

    def decide(self, rs: list[Replay], task: Task) -> list[bool]:
        need = [r for r in rs if r.trials_started > self.startup
                and ((self.j is not None and r.k >= self.min_epochs)
                     or is_rung(r.k, self.eta, self.first))]
        if self.cache is not None and self.score != "oracle":
            self.cache.compute([(r.trial(), r.k) for r in need])
            self.cache.stats.answered += len(need)
        sign = 1.0 if task.direction == "max" else -1.0
        out = []
        for r in rs:
            i, k = r.trial(), r.k
            if r.trials_started <= self.startup:
                out.append(False)
                continue
            if self.j is not None and self.cache is not None and k >= self.min_epochs \
                    and replay_pressure(r) >= 1.0 and r.best_s >= self.cache.get(i, k)[self.j]:
                out.append(True)
                continue
            if not is_rung(k, self.eta, self.first):
                out.append(False)
                continue
            if self.score == "value":
                v = r.ctx["own"]
            elif self.score == "blend":
                assert self.cache is not None
                p, o = self.cache.final[(i, k)][1], r.ctx["own"]
                r.ctx["cur"][k] = (p, o)
                v = o + blend_weight(r.ctx.get("done", {}).get(k, [])) * (p - o)
            elif self.score == "oracle":
                v = float(np.nanmax(task.s[i]))
            elif self.score == "peak":
                assert self.cache is not None
                v = self.cache.peak[(i, k)]
            else:
                assert self.cache is not None
                v = self.cache.final[(i, k)][1]
            if self.score.startswith("q"):  # an upper quantile of the final: optimism
                tail = 1.0 - int(self.score[1:]) / 100.0
                gq = self.cache.final[(i, k)][0]
                v = float(np.interp(math.log(tail), np.log(TAIL_GRID)[::-1], gq[::-1]))
            d = Decision(stop=False, prob_improve=math.nan, prob_improve_final=math.nan,
                         final_mean=sign * v, final_quantiles={0.5: sign * v}, reason="",
                         expected_remaining_epochs=0.0)
            curve = Curve(task.x[i, :k], task.model_values[i, :k], float(task.horizon[i]),
                          direction=task.direction)  # type: ignore[arg-type]
            out.append(r.ctx["rungs"].apply(d, str(i), curve, replay_pressure(r)).stop)
        return out


# ---------------------------------------------------------------------------------------------
# metrics


def regret_curves(task: Task, reps: Sequence[Replay]) -> np.ndarray:
    """(orderings, budget) normalised regret after e = 1..budget epochs."""
    finals = task.y[np.arange(task.n), task.lengths - 1]
    span = float(finals.max() - finals.min()) or 1.0
    best_any = float(np.nanmax(task.y))
    out = np.empty((len(reps), task.budget))
    for j, r in enumerate(reps):
        b = np.maximum.accumulate(np.asarray(r.revealed))
        row = np.full(task.budget, b[-1])
        row[: len(b)] = b[: task.budget]
        out[j] = (best_any - row) / span
    return np.clip(out, 0.0, None)


def first_reaching(curve: np.ndarray, target: float) -> int | None:
    hit = np.flatnonzero(curve <= target + 1e-12)
    return int(hit[0]) + 1 if hit.size else None


def plot_task(task: Task, curves: dict[str, np.ndarray], path: Path) -> None:
    """Mean anytime regret against epochs spent, one line per policy (patience: k=5 only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    e = np.arange(1, task.budget + 1)
    for p, c in curves.items():
        if p.startswith("patience") and p != "patience-5":
            continue
        style = "-" if p == "none" or p.startswith("curvecast") else (
            "--" if p.startswith("optuna") else ":")
        ax.plot(e, 100 * c, style, lw=2.2 if p == "none" else 1.4,
                color="black" if p == "none" else None, label=p)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("epochs spent")
    ax.set_ylabel("mean normalised regret (%)")
    ax.set_title(f"{task.name[:60]}: {task.n} trials, budget {task.budget} epochs")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(task: Task, results: dict[str, list[Replay]],
              plot: Path | None = None) -> list[dict[str, Any]]:
    curves = {p: regret_curves(task, reps).mean(0) for p, reps in results.items()}
    if plot is not None:
        plot_task(task, curves, plot / f"early-stopping-{task.name}.png")
    base = curves["none"]
    target = float(base[-1])
    e_base = first_reaching(base, target)
    rows = []
    for p, reps in results.items():
        e_pol = first_reaching(curves[p], target)
        rows.append({
            "task": task.name,
            "policy": p,
            "n_trials": task.n,
            "speedup": (e_base / e_pol) if (e_base and e_pol) else None,
            "regret": float(curves[p][-1]),
            "epochs_used": float(np.mean([r.spent for r in reps])),
            "epochs_to_target": e_pol,
            "budget": task.budget,
            "trials_started": float(np.mean([r.trials_started for r in reps])),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# driver


def single_decision_ms(predictor: Predictor, task: Task,
                       repeats: int = 20) -> tuple[float, float]:
    """One decide() call for one trial with 10 points (batch of 1): median wall and CPU ms."""
    i = int(np.argmax(task.lengths))
    k = int(min(10, task.lengths[i] - 1))
    c = Curve(task.x[i, :k], task.model_values[i, :k], float(task.horizon[i]),
              direction=task.direction, bounds=task.bounds)  # type: ignore[arg-type]
    decide(predictor, [c], [float(task.model_values[i, 0])])
    ts, cs = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        decide(predictor, [c], [float(task.model_values[i, 0])])
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.median(cs))


def run_task(task: Task, predictor: Predictor | None, policies: Sequence[str],
             deltas: Sequence[float], orderings: int, seed: int, max_checked: int,
             log: Callable[[str], None], plot: Path | None = None,
             ) -> tuple[list[dict[str, Any]], InferenceStats]:
    rng = np.random.default_rng([seed, sum(map(ord, task.name))])
    orders = np.stack([rng.permutation(task.n) for _ in range(orderings)])
    stats = InferenceStats()
    todo: list[Policy] = [Policy()]
    if predictor is not None and MODEL_FAMILIES & set(policies):
        cache = ThresholdCache(predictor, task, deltas, max_checked, stats)
        if "curvecast" in policies:
            todo += [CurvecastPolicy(cache, j) for j in range(len(deltas))]
        if "margin" in policies:
            todo += [CurvecastPolicy(cache, j, min_delta=m) for m in MARGINS
                     for j in range(len(deltas))]
        if "gain" in policies:
            todo += [GainPolicy(cache, g, j) for g in GAINS for j in (None, *range(len(deltas)))]
        if "opportunity" in policies:
            todo += [OpportunityPolicy(cache, c, j, ref=ref) for c in OPPORTUNITY_FACTORS
                     for ref in ("same", "start") for j in range(len(deltas))]
        if "budget" in policies:
            todo += [BudgetPolicy(cache, j, opportunity=o) for j in range(len(deltas))
                     for o in (False, True)]
            todo += [CalibratedBudgetPolicy(cache, j) for j in range(len(deltas))]
        if "rungs" in policies:
            todo += [RungPolicy(cache, j if paper else None, score=sc, eta=e, first=f,
                                startup=st)
                     for j in range(len(deltas)) for sc, e, f, paper, st in RUNG_VARIANTS]
        if "rung" in policies:  # the integrations' default alone (the first of RUNG_VARIANTS)
            todo += [RungPolicy(cache, None)]
        if "rungsb" in policies:
            todo += [RungPolicy(cache, None, score="blend", eta=4)]
        if "rungsp" in policies:
            todo += [RungPolicy(cache, None, score="peak", eta=4)]
        if "rungsq" in policies:
            todo += [RungPolicy(cache, None, score=sc, eta=4) for sc in ("q75", "q90")]
        if "calibrated" in policies:
            todo += [CalibratedPolicy(cache, j, startup=st, prior_weight=w, two_sided=x)
                     for st, w, x in CALIBRATED_VARIANTS for j in range(len(deltas))]
    if "oracle" in policies:
        todo += [RungPolicy(None, None, score="oracle", eta=e) for e in ORACLE_ETAS]
    if "patience" in policies:
        todo += [Patience(k) for k in PATIENCES]
    if "optuna" in policies:
        todo += [OptunaPolicy(w) for w in OPTUNA_PRUNERS]
    results = {}
    for pol in todo:
        t0 = time.perf_counter()
        results[pol.name] = run_policy(task, orders, pol)
        log(f"  {pol.name:22s} {time.perf_counter() - t0:7.1f} s")
    return summarize(task, results, plot), stats


def short(task: str) -> str:
    """Task names for tables: TaskSet's long common prefix shortened."""
    return task.replace("FixedTextRNNClassification_", "taskset:")


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = ["| task | policy | trials | speed-up | regret | epochs used / budget |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        sp = "never" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        out.append(f"| {short(r['task'])} | {r['policy']} | {r['n_trials']} | {sp} | "
                   f"{100 * r['regret']:.2f}% | {r['epochs_used']:.0f} / {r['budget']} |")
    return "\n".join(out)


def compact(rows: Sequence[dict[str, Any]]) -> str:
    """One line per task: speed-up / regret of the main policies (best patience by speed-up)."""
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], {})[r["policy"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        sp = "never" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        return f"{sp} / {100 * r['regret']:.2f}%"

    cc = sorted({p for t in by_task.values() for p in t if p.startswith("curvecast")},
                key=lambda p: (p.replace("-ei", "~").split("-d")[0], p))
    cols = cc + ["best patience", "optuna-median", "optuna-sha", "optuna-hyperband"]
    out = ["| task | trials | budget | none: regret | " + " | ".join(cols) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(cols)]
    for task, ps in by_task.items():
        pat = [r for p, r in ps.items() if p.startswith("patience")]
        best_pat = max(pat, key=lambda r: (r["speedup"] or 0.0, -r["regret"])) if pat else None
        cells = [cell(ps.get(p)) for p in cc]
        cells.append(cell(best_pat) + (f" (k={best_pat['policy'].split('-')[1]})"
                                       if best_pat else ""))
        cells += [cell(ps.get(p)) for p in ("optuna-median", "optuna-sha", "optuna-hyperband")]
        n = ps["none"]
        out.append(f"| {short(task)} | {n['n_trials']} | {n['budget']} | "
                   f"{100 * n['regret']:.2f}% | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render(paths: Sequence[str]) -> int:
    """Print the tables of saved --out/--json files (several files: their rows concatenated)."""
    rows: list[dict[str, Any]] = []
    infos = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        rows += doc["rows"]
        infos.append(doc.get("inference", {}))
    print(compact(rows))
    print()
    fwd = sum(i.get("forward_seconds", 0.0) for i in infos)
    ev = sum(i.get("model_evaluations", 0) for i in infos)
    dec = sum(i.get("decisions", 0) for i in infos)
    single = [i["ms_single_decision_batch1"] for i in infos if i.get("ms_single_decision_batch1")]
    cpu = [i for i in infos if "forward_cpu_seconds" in i]
    if cpu:
        cs = sum(i["forward_cpu_seconds"] for i in cpu)
        ce = sum(i["model_evaluations"] for i in cpu)
        c1 = [i["cpu_ms_single_decision_batch1"] for i in cpu
              if i.get("cpu_ms_single_decision_batch1")]
        print(f"CPU time (runs that recorded it): {1e3 * cs / max(ce, 1):.1f} ms per evaluation; "
              f"single decision median {float(np.median(c1)) if c1 else float('nan'):.1f} ms")
    print(f"inference: {ev} model evaluations for {dec} decisions in {fwd:.0f} s: "
          f"{1e3 * fwd / max(ev, 1):.1f} ms per evaluation, {1e3 * fwd / max(dec, 1):.2f} ms per "
          f"decision amortised; single decision (batch 1) median "
          f"{float(np.median(single)) if single else float('nan'):.1f} ms")
    return 0


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curves", help="a curve file in real_curves.npz's format")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="instead of running: print the summary tables of saved --out files")
    ap.add_argument("--json", action="store_true", help="print JSON ({'rows': [...]})")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--plot", metavar="DIR", help="save a regret-vs-epochs PNG per task here")
    ap.add_argument("--tasks", default="", help="comma-separated substrings of task names")
    ap.add_argument("--max-tasks", type=int, default=0, help="only the first N tasks (0: all)")
    ap.add_argument("--orderings", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deltas", default=",".join(map(str, DEFAULT_DELTAS)))
    ap.add_argument("--policies", default="curvecast,calibrated,patience,optuna",
                    help="which families besides 'none': " + ", ".join(POLICY_FAMILIES))
    ap.add_argument("--values", choices=("y", "raw"), default="y")
    ap.add_argument("--filter-flat", action="store_true",
                    help="keep complete curves with range > 0.02 only (the data's usual filter)")
    ap.add_argument("--min-trials", type=int, default=20)
    ap.add_argument("--max-checked", type=int, default=BENCH_CHECKED_EPOCHS,
                    help="remaining epochs checked per curvecast decision (the API checks "
                    f"{MAX_CHECKED_EPOCHS})")
    ap.add_argument("--model", default=DECISION_MODEL,
                    help=f"model name or directory (default: {DECISION_MODEL}, the embedded "
                    "model for decisions)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--decay-tasks", default="",
                    help="comma-separated substrings of task names whose runs decay their "
                    "learning rate before the horizon: the model sees them with lr_decay=True "
                    "(needs a model with a decay branch, e.g. --model default)")
    a = ap.parse_args(argv)
    if a.render:
        return render(a.render)
    if not a.curves:
        ap.error("--curves is required (or --render FILE...)")
    torch.set_num_threads(a.threads)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    unknown = set(policies) - set(POLICY_FAMILIES)
    if unknown:
        ap.error(f"--policies: unknown {sorted(unknown)}; use {', '.join(POLICY_FAMILIES)}")
    deltas = [float(x) for x in a.deltas.split(",") if x]
    tasks = load_tasks(a.curves, a.values, [t for t in a.tasks.split(",") if t],
                       a.min_trials, a.filter_flat)
    if a.max_tasks:
        tasks = tasks[: a.max_tasks]
    marks = [m for m in a.decay_tasks.split(",") if m]
    tasks = [replace(t, lr_decay=any(m in t.name for m in marks)) for t in tasks]
    predictor = Predictor.load(a.model) if MODEL_FAMILIES & set(policies) else None
    rows: list[dict[str, Any]] = []
    total = InferenceStats()
    t_all = time.perf_counter()
    single: tuple[float, float] | None = None
    for t in tasks:
        log(f"{t.name}: {t.n} trials, budget {t.budget} epochs, {a.orderings} orderings")
        r, st = run_task(t, predictor, policies, deltas, a.orderings, a.seed, a.max_checked,
                         log, Path(a.plot) if a.plot else None)
        rows += r
        for f in ("forward_s", "forward_cpu_s", "computed", "answered", "batches"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
        if predictor is not None and single is None:
            single = single_decision_ms(predictor, t)
    inference = {
        "forward_seconds": total.forward_s,
        "model_evaluations": total.computed,
        "decisions": total.answered,
        "forward_cpu_seconds": total.forward_cpu_s,
        "ms_per_model_evaluation": 1e3 * total.forward_s / max(total.computed, 1),
        "ms_per_decision_amortised": 1e3 * total.forward_s / max(total.answered, 1),
        "cpu_ms_per_model_evaluation": 1e3 * total.forward_cpu_s / max(total.computed, 1),
        "ms_single_decision_batch1": single[0] if single else None,
        "cpu_ms_single_decision_batch1": single[1] if single else None,
        "max_checked_epochs": a.max_checked,
        "torch_threads": a.threads,
    }
    meta = {"curves": str(a.curves), "values": a.values, "orderings": a.orderings,
            "seed": a.seed, "deltas": deltas, "filter_flat": a.filter_flat,
            "budget_runs": BUDGET_RUNS, "wall_seconds": time.perf_counter() - t_all,
            "model_sha256": predictor.sha256 if predictor else None}
    doc = {"rows": rows, "inference": inference, "meta": meta}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        print(markdown(rows))
        print()
        print(compact(rows))
        print()
        print("inference:", json.dumps(inference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
