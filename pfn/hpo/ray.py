"""A Ray Tune scheduler that stops trials curvecast predicts will not beat the incumbent.

    from ray import tune
    from pfn.hpo.ray import CurvecastScheduler

    sched = CurvecastScheduler(horizon=30, metric="acc", mode="max", bounds=(0, 1))
    tune.Tuner(train_fn, param_space=space,
               tune_config=tune.TuneConfig(scheduler=sched, num_samples=40)).fit()

Every reported result of a trial adds ``(result[time_attr], result[metric])`` to its history
(``time_attr`` defaults to ``training_iteration``, which counts from 1; ``horizon`` is its value
at a complete trial's last result). ``on_trial_result`` returns ``STOP`` when curvecast's rule
(``pfn.early_stop.StopRule``) fires for the trial's history, ``CONTINUE`` otherwise.

The incumbent is the best final value of the trials that completed without being stopped
(``incumbent="completed"``, default) or the best value any trial reported so far, this one
included (``"observed"``). Nothing is stopped before ``n_startup_trials`` trials completed (2;
0 with a budget and the rung rule, which needs no incumbent).
With ``calibrate=True`` (default) the trials that complete at the horizon calibrate later
decisions (``pfn.early_stop.Calibrator``). ``metric`` and ``mode`` may also come from
``tune.TuneConfig``. With a ``budget=Budget(n_trials, epochs)`` (the experiment's plan:
``num_samples`` and the results all trials together may report) the stopping becomes
budget-aware: trials are compared with each other at rungs (1, 4, 16 ... results), as
successive halving does but ranked by the model's predicted final value, and the worse ones
stopped as far as the budget demands (``budget_rule="rungs"``, the default,
``pfn.early_stop.Rungs``); or (``budget_rule="opportunity"``) a stop is vetoed while the budget
would still reach every untried trial (``pfn.early_stop.gate_by_budget``), and while it would
not, a trial that offers less expected improvement per remaining epoch than the ended trials
did at the same point is stopped (``pfn.early_stop.Opportunity``). Their state
(``pfn.early_stop.BudgetAware``) is saved with the scheduler's.

State (histories, finals, stopped trials, last decisions, calibration) is saved as JSON by
``save(path)`` and read back by ``restore(path)``; ``state_dict()`` / ``load_state_dict()`` give
the same dict.
Backends: see ``pfn.hpo``. A failing backend (anything but a user error, i.e. a ``ValueError``
such as ``CurvecastError`` or the client's 4xx error) lets the trial continue with a logged
warning when ``fail_open`` (the default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from pfn.early_stop import (
    DEFAULT_QUANTILES,
    Budget,
    BudgetAware,
    BudgetRule,
    Calibrator,
    Opportunity,
    StopRule,
    budget_pressure,
    decision_to_dict,
    rule_from_dict,
    rule_to_dict,
)
from pfn.errors import CurvecastError
from pfn.hpo import Decider, IncumbentMode, best, check_incumbent_mode, check_startup
from pfn.predictor import Curve

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

log = logging.getLogger(__name__)
STATE_VERSION = 1


class CurvecastScheduler(FIFOScheduler):
    """FIFO scheduling plus curvecast's stop/continue decision on every result."""

    def __init__(
        self,
        horizon: float,
        backend: Any = None,
        *,
        metric: str | None = None,
        mode: str | None = None,
        time_attr: str = "training_iteration",
        rule: StopRule = StopRule(),
        bounds: tuple[float | None, float | None] | None = None,
        incumbent: IncumbentMode = "completed",
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        fail_open: bool = True,
        calibrate: bool = True,
        n_startup_trials: int | None = None,
        budget: Budget | None = None,
        budget_rule: BudgetRule = "rungs",
    ) -> None:
        super().__init__()
        if budget is not None and not isinstance(budget, Budget):
            raise CurvecastError(f"budget: must be a pfn.early_stop.Budget or None, got "
                                 f"{type(budget).__name__}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) \
                or not (math.isfinite(horizon) and horizon > 0):
            raise CurvecastError(f"horizon: must be a positive number (the {time_attr} of a "
                                 f"complete trial's last result), got {horizon!r}")
        if mode is not None and mode not in ("min", "max"):
            raise CurvecastError(f"mode: must be 'min' or 'max', got {mode!r}")
        self.horizon = float(horizon)
        self.n_startup_trials = check_startup(n_startup_trials,
                                              None if budget is None else budget_rule)
        self._metric = metric
        self._mode = mode
        self.time_attr = time_attr
        self.bounds = bounds
        self.incumbent = check_incumbent_mode(incumbent)
        self.fail_open = fail_open
        # with a budget: the rung rule's or the opportunity rule's state (saved with ours)
        self.budgeted = None if budget is None else BudgetAware(budget, budget_rule)
        self.decider = Decider(backend, rule, quantiles, calibrate,
                               keep_levels=self.budgeted.keep_levels if self.budgeted else ())
        self.ended: set[str] = set()  # trials that completed, were stopped or failed
        self.histories: dict[str, list[list[float]]] = {}  # trial id -> [[time, value], ...]
        self.finals: dict[str, float] = {}  # trials that completed without being stopped
        self.stopped: set[str] = set()
        self.decisions: dict[str, dict[str, Any]] = {}  # trial id -> last decision (dict form)

    # -- Tune's interface ----------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        if not self._metric or self._mode not in ("min", "max"):
            raise CurvecastError(
                f"metric/mode: CurvecastScheduler needs both (got metric={self._metric!r}, "
                f"mode={self._mode!r}); pass them to it or to tune.TuneConfig")
        self.histories.setdefault(trial.trial_id, [])

    def on_trial_result(self, tune_controller: TuneController, trial: Trial,
                        result: dict[str, Any]) -> str:
        return self.observe(trial.trial_id, result)

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial,
                          result: dict[str, Any]) -> None:
        tid = trial.trial_id
        if result and self._metric in result:
            self._record(tid, result)
        self.ended.add(tid)
        hist = self.histories.get(tid)
        if tid not in self.stopped and hist:
            self.finals[tid] = hist[-1][1]
            curve = self._curve(hist)
            if curve is not None and self.decider.calibrator is not None:
                try:
                    self.decider.add_completed(curve)
                except ValueError:
                    raise
                except Exception as e:  # transport/server failure: calibrate without it
                    if not self.fail_open:
                        raise
                    log.warning("curvecast scheduler: calibration on trial %s failed (%s)",
                                tid, e)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        self.ended.add(trial.trial_id)  # keep its history: its values were observed

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        pass

    def debug_string(self) -> str:
        return (f"Using CurvecastScheduler ({self.decider.rule.kind}, delta="
                f"{self.decider.rule.delta:g}): stopped {len(self.stopped)} of "
                f"{len(self.histories)} trials")

    # -- the decision (also usable without Tune: observe(trial_id, result)) --------------------

    @property
    def direction(self) -> str:
        return "max" if self._mode == "max" else "min"

    def _record(self, tid: str, result: dict[str, Any]) -> bool:
        t, v = result.get(self.time_attr), result.get(self._metric)  # type: ignore[arg-type]
        if t is None or v is None:
            return False
        t, v = float(t), float(v)
        hist = self.histories.setdefault(tid, [])
        if hist and t <= hist[-1][0]:
            return False  # a duplicate (e.g. the final result repeated on completion)
        hist.append([t, v])
        return True

    def _incumbent(self, tid: str) -> tuple[bool, float | None]:
        """(whether n_startup_trials trials completed, the incumbent or None)."""
        if len(self.finals) < self.n_startup_trials:
            return False, None  # nothing is stopped before n_startup_trials trials completed
        if self.incumbent == "completed":
            return True, best(self.finals.values(), self.direction)
        return True, best((v for h in self.histories.values() for _, v in h), self.direction)

    def _curve(self, history: Sequence[Sequence[float]]) -> Curve | None:
        hist = [(t, v) for t, v in history if math.isfinite(v)]
        if not hist:
            return None
        return Curve(epochs=[t for t, _ in hist], values=[v for _, v in hist],
                     horizon=self.horizon, direction=self.direction,  # type: ignore[arg-type]
                     bounds=self.bounds)

    @property
    def budget(self) -> Budget | None:
        """The study's plan (``budget=``), None without one."""
        return None if self.budgeted is None else self.budgeted.budget

    def pressure(self) -> float:
        """``budget_pressure`` of the experiment: the trials seen so far, the results they
        reported, and the trials that ended. Needs ``budget``."""
        assert self.budget is not None
        ended = [len(self.histories.get(t, ())) for t in self.ended]
        spent = sum(len(h) for h in self.histories.values())
        return budget_pressure(self.budget, len(self.histories), spent, ended)

    def observe(self, tid: str, result: dict[str, Any]) -> str:
        """Record one result of trial ``tid`` and return CONTINUE or STOP."""
        if not self._record(tid, result):
            return TrialScheduler.CONTINUE
        started, inc = self._incumbent(tid)
        if not started or (inc is None and (self.budgeted is None
                                            or self.budgeted.needs_incumbent)):
            return TrialScheduler.CONTINUE
        curve = self._curve(self.histories[tid])
        if curve is None:
            return TrialScheduler.CONTINUE
        try:
            d = self.decider([curve], [inc])[0]
            if self.budgeted is not None:  # the budget-aware rule
                d = self.budgeted.apply(d, tid, curve, inc, self.pressure(), sorted(self.ended),
                                        self.decider.rule.min_epochs)
        except ValueError:  # a user error (CurvecastError, or the client's 4xx): report it
            raise
        except Exception as e:  # transport/server failure: never kill the experiment
            if not self.fail_open:
                raise
            log.warning("curvecast scheduler: backend failed (%s); trial %s continues", e, tid)
            return TrialScheduler.CONTINUE
        last = float(curve.epochs[-1])
        dd = decision_to_dict(d)
        dd["final_quantiles"] = {k: v for k, v in dd["final_quantiles"].items()
                                 if float(k) in self.decider.quantiles}
        self.decisions[tid] = {**dd, "time": last, "incumbent": inc}
        if d.stop:
            self.stopped.add(tid)
            self.ended.add(tid)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "metric": self._metric,
            "mode": self._mode,
            "horizon": self.horizon,
            "time_attr": self.time_attr,
            "incumbent": self.incumbent,
            "rule": rule_to_dict(self.decider.rule),
            "histories": self.histories,
            "finals": self.finals,
            "stopped": sorted(self.stopped),
            "ended": sorted(self.ended),
            "budget_rule": None if self.budgeted is None else self.budgeted.state_dict(),
            "decisions": self.decisions,
            "calibration": (None if self.decider.calibrator is None
                            else self.decider.calibrator.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CurvecastError(f"scheduler state: version {state.get('version')!r} is not "
                                 f"{STATE_VERSION}; it was saved by another curvecast version")
        self._metric, self._mode = state["metric"], state["mode"]
        self.horizon = float(state["horizon"])
        self.time_attr = state["time_attr"]
        self.incumbent = check_incumbent_mode(state["incumbent"])
        self.decider.rule = rule_from_dict(state["rule"])
        self.histories = {k: [[float(t), float(v)] for t, v in h]
                          for k, h in state["histories"].items()}
        self.finals = {k: float(v) for k, v in state["finals"].items()}
        self.stopped = set(state["stopped"])
        # (states saved before the budget gate existed: the completed and stopped trials)
        self.ended = set(state.get("ended", [*self.finals, *self.stopped]))
        if state.get("budget_rule"):  # the plan and the budget rule, as saved
            self.budgeted = BudgetAware.from_state_dict(state["budget_rule"])
            self.decider.keep_levels = self.budgeted.keep_levels
        elif self.budgeted is not None and "opportunity" in state:  # saved before the rungs
            self.budgeted.opportunity = Opportunity.from_state_dict(state["opportunity"])
        self.decisions = dict(state["decisions"])
        if "calibration" in state:  # absent in states saved before calibration existed
            cal = state["calibration"]
            self.decider.calibrator = None if cal is None else Calibrator.from_state_dict(cal)

    def save(self, checkpoint_path: str) -> None:
        """Write the state as JSON (atomically: temporary file + rename)."""
        path = Path(checkpoint_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.state_dict(), f, allow_nan=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.load_state_dict(json.load(f))


__all__ = ["CurvecastScheduler"]
