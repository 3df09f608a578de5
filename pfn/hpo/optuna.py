"""An Optuna pruner that stops trials curvecast predicts will not beat the incumbent.

    import optuna
    from pfn.hpo.optuna import CurvecastPruner

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for epoch in range(30):                    # steps 0..29: horizon=30, first_step=0
            acc = train_one_epoch(lr)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    study = optuna.create_study(direction="maximize",
                                pruner=CurvecastPruner(horizon=30, bounds=(0, 1)))

Steps map to epochs as ``epoch = step - first_step + 1``; ``horizon`` is the number of steps a
complete trial reports. The study's direction sets the metric's direction (a minimised loss
improves downwards). The incumbent is the best final value of the completed trials
(``incumbent="completed"``, the default) or the best value any trial has reported so far,
this one included (``"observed"``, the paper's replay setting). Nothing is pruned before
``n_startup_trials`` trials completed (2; 0 with a budget and the rung rule, which needs no
incumbent), nor before the rule's ``min_epochs`` values. With a
``budget=Budget(n_trials, epochs)`` (the study's plan: ``optimize(n_trials=...)`` and the epochs
all trials together may spend, counted as reported steps) the stopping becomes budget-aware:
trials are compared with each other at rungs (1, 4, 16 ... values), as successive halving
does but ranked by the model's predicted final value, and the worse ones pruned as far as the
budget demands (``budget_rule="rungs"``, the default, ``pfn.early_stop.Rungs``); or
(``budget_rule="opportunity"``) the rule's stop is vetoed while the budget would still reach
every untried trial (``pfn.early_stop.gate_by_budget``), and while it would not, a trial that
offers less expected improvement per remaining epoch than the ended trials did at the same
point is pruned (``pfn.early_stop.Opportunity``). Their state lives in the pruner, in memory
(``pfn.early_stop.BudgetAware``). With
``calibrate=True`` (default) the trials that complete at the horizon calibrate later decisions
(``pfn.early_stop.Calibrator``).

Each decision is stored in the trial's user attributes (overwritten at every checked step):
``curvecast_final_mean``, ``curvecast_final_quantiles`` ({level: value}),
``curvecast_prob_improve``, ``curvecast_prob_improve_final``, ``curvecast_step``,
``curvecast_stop`` and ``curvecast_reason``, so pruned trials keep their predicted final value.

Backends: see ``pfn.hpo`` (in-process Predictor by default, or the HTTP client). When the backend
fails with anything but a user error (a ``ValueError``: ``CurvecastError`` in-process, the
client's error for a 4xx answer), e.g. the server is unreachable, the pruner logs a warning
and lets the trial run (``fail_open=True``) rather than failing the study.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from pfn.early_stop import (
    DEFAULT_QUANTILES,
    Budget,
    BudgetAware,
    BudgetRule,
    Decision,
    StopRule,
    budget_pressure,
)
from pfn.errors import CurvecastError
from pfn.hpo import Decider, IncumbentMode, best, check_incumbent_mode, check_startup
from pfn.predictor import Curve

log = logging.getLogger(__name__)
ATTR_PREFIX = "curvecast_"
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class CurvecastPruner(BasePruner):
    """Prune a trial when curvecast's rule says it will not improve on the incumbent."""

    def __init__(
        self,
        horizon: int,
        backend: Any = None,
        *,
        rule: StopRule = StopRule(),
        bounds: tuple[float | None, float | None] | None = None,
        first_step: int = 0,
        n_startup_trials: int | None = None,
        interval_steps: int = 1,
        incumbent: IncumbentMode = "completed",
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        fail_open: bool = True,
        calibrate: bool = True,
        budget: Budget | None = None,
        budget_rule: BudgetRule = "rungs",
    ) -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise CurvecastError(f"budget: must be a pfn.early_stop.Budget or None, got "
                                 f"{type(budget).__name__}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise CurvecastError(f"horizon: must be an integer >= 1 (steps of a complete "
                                 f"trial), got {horizon!r}")
        if isinstance(interval_steps, bool) or not isinstance(interval_steps, int) \
                or interval_steps < 1:
            raise CurvecastError(f"interval_steps: must be an integer >= 1, got "
                                 f"{interval_steps!r}")
        self.horizon = horizon
        self.bounds = bounds
        self.first_step = int(first_step)
        self.n_startup_trials = check_startup(n_startup_trials,
                                              None if budget is None else budget_rule)
        self.interval_steps = interval_steps
        self.incumbent = check_incumbent_mode(incumbent)
        self.fail_open = fail_open
        # with a budget: the rung rule's or the opportunity rule's state (in memory)
        self.budgeted = None if budget is None else BudgetAware(budget, budget_rule)
        self.decider = Decider(backend, rule, quantiles, calibrate,
                               keep_levels=self.budgeted.keep_levels if self.budgeted else ())
        self._calibrated: set[int] = set()  # completed trials the calibrator has seen

    def _incumbent(self, study: optuna.study.Study, trial: FrozenTrial,
                   direction: str) -> tuple[bool, float | None]:
        """(whether n_startup_trials trials completed, the incumbent or None)."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < self.n_startup_trials:
            return False, None
        if self.incumbent == "completed":
            return True, best((t.value for t in done), direction)
        others = study.get_trials(deepcopy=False)
        return True, best((v for t in others for v in t.intermediate_values.values()),
                          direction)

    def _curve(self, trial: FrozenTrial, direction: Literal["max", "min"]) -> Curve | None:
        steps = [s for s in sorted(trial.intermediate_values)
                 if math.isfinite(trial.intermediate_values[s])]  # NaN/inf: not observed
        if not steps:
            return None
        if steps[0] < self.first_step:
            raise CurvecastError(f"first_step: trial {trial.number} reported step {steps[0]} "
                                 f"< first_step={self.first_step}; set first_step to the "
                                 "first step your objective reports")
        return Curve(
            epochs=[s - self.first_step + 1 for s in steps],
            values=[trial.intermediate_values[s] for s in steps],
            horizon=float(self.horizon),
            direction=direction,
            bounds=self.bounds,
        )

    def _calibrate(self, study: optuna.study.Study, direction: Literal["max", "min"]) -> None:
        """Feed the calibrator the completed trials it has not seen (those that reported up
        to the horizon count; see ``pfn.early_stop.Calibrator``)."""
        if self.decider.calibrator is None:
            return
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._calibrated:
                continue
            self._calibrated.add(t.number)
            c = self._curve(t, direction)
            if c is not None:
                self.decider.add_completed(c)

    @property
    def budget(self) -> Budget | None:
        """The study's plan (``budget=``), None without one."""
        return None if self.budgeted is None else self.budgeted.budget

    def pressure(self, study: optuna.study.Study) -> float:
        """``budget_pressure`` of the study: its trials so far, the steps they reported, and
        the trials that ended (completed, pruned or failed). Needs ``budget``."""
        return self._plan(study.get_trials(deepcopy=False))[0]

    def _plan(self, trials: Sequence[FrozenTrial]) -> tuple[float, list[str]]:
        """(budget pressure, the ended trials' keys) from one read of the study's trials."""
        assert self.budget is not None
        ended = [t for t in trials if t.state in ENDED]
        p = budget_pressure(self.budget, len(trials),
                            sum(len(t.intermediate_values) for t in trials),
                            [len(t.intermediate_values) for t in ended])
        return p, [str(t.number) for t in ended]

    def _budgeted(self, study: optuna.study.Study, trial: FrozenTrial, curve: Curve,
                  inc: float | None, d: Decision) -> Decision:
        """The budget-aware rule (``pfn.early_stop.BudgetAware``)."""
        assert self.budgeted is not None
        p, ended = self._plan(study.get_trials(deepcopy=False))
        return self.budgeted.apply(d, str(trial.number), curve, inc, p, ended,
                                   self.decider.rule.min_epochs)

    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        if len(study.directions) != 1:
            raise CurvecastError("study: CurvecastPruner needs a single-objective study "
                                 f"(got {len(study.directions)} objectives)")
        step = trial.last_step
        if step is None or (step - self.first_step) % self.interval_steps:
            return False
        direction: Literal["max", "min"] = (
            "max" if study.direction == StudyDirection.MAXIMIZE else "min")
        started, inc = self._incumbent(study, trial, direction)
        if not started or (inc is None and (self.budgeted is None
                                            or self.budgeted.needs_incumbent)):
            return False
        curve = self._curve(trial, direction)
        if curve is None:
            return False
        try:
            self._calibrate(study, direction)
            d = self.decider([curve], [inc])[0]
            if self.budget is not None:
                d = self._budgeted(study, trial, curve, inc, d)
        except ValueError:  # a user error (CurvecastError, or the client's 4xx): report it
            raise
        except Exception as e:  # a transport or server failure must not kill the study
            if not self.fail_open:
                raise
            log.warning("curvecast pruner: backend failed (%s); not pruning trial %d", e,
                        trial.number)
            return False
        storage, tid = study._storage, trial._trial_id  # as Optuna's own pruners do
        attrs: dict[str, Any] = {
            "final_mean": d.final_mean,
            "final_quantiles": {repr(q): v for q, v in d.final_quantiles.items()
                                if q in self.decider.quantiles},
            "prob_improve": d.prob_improve,
            "prob_improve_final": d.prob_improve_final,
            "step": step,
            "stop": d.stop,
            "reason": d.reason,
        }
        for k, v in attrs.items():
            storage.set_trial_user_attr(tid, ATTR_PREFIX + k, v)
        return d.stop


__all__ = ["ATTR_PREFIX", "CurvecastPruner"]
