"""CurvecastPruner in real Optuna studies (in-memory storage, a cheap synthetic objective)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from pfn import Curve, CurvecastError, Predictor  # noqa: E402
from pfn.early_stop import (  # noqa: E402
    Budget,
    StopRule,
    curve_to_dict,
    early_stop_json,
    rule_to_dict,
)
from pfn.hpo import Decider  # noqa: E402
from pfn.hpo.optuna import CurvecastPruner  # noqa: E402

HORIZON = 12
# final accuracy of each trial, in trial order: two good ones, then clearly bad ones
TOPS = [0.9, 0.95, 0.05, 0.08, 0.06]
BAD = (2, 3, 4)
# With the real model the assertions must hold for any sensible model (the default one is still
# training): a loose delta prunes trials far below the incumbent whatever the model's spread.
RULE = StopRule(delta=0.9)


def acc_curve(number: int) -> np.ndarray:
    rng = np.random.default_rng(number)
    t = np.arange(1, HORIZON + 1)
    return TOPS[number] * (1 - np.exp(-t / 2)) + 0.003 * rng.standard_normal(HORIZON)


def make_objective(minimise: bool, curve: Any = acc_curve) -> Any:
    """Reports ``curve(trial.number)`` (1 - it when minimising) step by step, pruning allowed."""
    def objective(trial: Any) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        y = curve(trial.number)
        v = 0.0
        for step in range(HORIZON):
            v = float(1.0 - y[step] if minimise else y[step])
            trial.report(v, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return v
    return objective


def run(direction: str, backend: Any, **kw: Any) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = CurvecastPruner(HORIZON, backend, rule=RULE, bounds=(0, 1), **kw)
    study = optuna.create_study(direction=direction, pruner=pruner,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(make_objective(direction == "minimize"), n_trials=len(TOPS))
    return study


def test_prunes_bad_trials_and_records_predictions(pred: Predictor) -> None:
    study = run("maximize", pred)
    TS = optuna.trial.TrialState
    assert study.trials[0].state == TS.COMPLETE  # nothing to compare with: never pruned
    n_checked = 0
    for i, t in enumerate(study.trials):
        if i in BAD:
            assert t.state == TS.PRUNED
            assert len(t.intermediate_values) == RULE.min_epochs  # first allowed decision
        a = t.user_attrs
        if not a:
            continue
        n_checked += 1
        assert a["curvecast_stop"] == (t.state == TS.PRUNED)
        assert a["curvecast_stop"] == (a["curvecast_prob_improve"] <= RULE.delta)
        assert a["curvecast_step"] == t.last_step
        # the stored numbers are the decision for exactly the curve the trial reported
        steps = sorted(t.intermediate_values)
        c = Curve([s + 1 for s in steps], [t.intermediate_values[s] for s in steps], HORIZON,
                  bounds=(0, 1))
        done = [x for x in study.trials[:i] if x.state == TS.COMPLETE]
        incumbent = max(x.value for x in done)
        # the pruner's calibrator had seen every trial completed before this one
        ref = Decider(pred, RULE)
        for x in done:
            xs = sorted(x.intermediate_values)
            assert ref.add_completed(Curve([s + 1 for s in xs],
                                           [x.intermediate_values[s] for s in xs], HORIZON,
                                           bounds=(0, 1)))
        d = ref([c], [incumbent])[0]
        assert a["curvecast_final_mean"] == pytest.approx(d.final_mean, abs=1e-5)
        assert a["curvecast_prob_improve"] == pytest.approx(d.prob_improve, abs=1e-5)
        assert set(a["curvecast_final_quantiles"]) == {"0.05", "0.5", "0.95"}
        json.dumps(a)  # storable in any Optuna storage
    assert n_checked >= len(BAD)


def test_never_prunes_at_the_horizon(pred: Predictor) -> None:
    # the only decision falls on the last step: a complete trial must stay COMPLETE
    late = StopRule(delta=0.99, min_epochs=HORIZON)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                pruner=CurvecastPruner(HORIZON, pred, rule=late, bounds=(0, 1)))
    study.optimize(make_objective(False), n_trials=3)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert "horizon" in study.trials[2].user_attrs["curvecast_reason"]


def test_minimise_mirrors_maximise(pred: Predictor) -> None:
    up = run("maximize", pred)
    down = run("minimize", pred)  # loss = 1 - accuracy, bounds (0, 1): the same normalised curve
    assert [t.state for t in up.trials] == [t.state for t in down.trials]
    for a, b in zip(up.trials, down.trials, strict=True):
        if "curvecast_final_mean" in a.user_attrs:
            assert b.user_attrs["curvecast_final_mean"] == pytest.approx(
                1 - a.user_attrs["curvecast_final_mean"], abs=1e-4)
            assert b.user_attrs["curvecast_prob_improve"] == pytest.approx(
                a.user_attrs["curvecast_prob_improve"], abs=1e-4)


class JsonClient:
    """An in-process stand-in for the HTTP client: every call goes through the JSON form."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.calls = 0

    def early_stop(self, curves: list[Any], incumbents: list[Any], rule: StopRule) -> Any:
        self.calls += 1
        req = {"curves": [curve_to_dict(c) for c in curves], "incumbents": incumbents,
               "rule": rule_to_dict(rule)}
        return json.loads(json.dumps(early_stop_json(self.predictor, json.loads(json.dumps(req)))))


def assert_same_trials(x: optuna.Study, y: optuna.Study, attr: str, tol: float) -> None:
    """Same trial states, same user-attribute keys, and ``attr`` equal within ``tol``."""
    assert [t.state for t in x.trials] == [t.state for t in y.trials]
    for a, b in zip(x.trials, y.trials, strict=True):
        assert a.user_attrs.keys() == b.user_attrs.keys()
        if a.user_attrs:
            assert a.user_attrs[attr] == pytest.approx(b.user_attrs[attr], abs=tol)


def test_json_client_backend_matches_in_process(pred: Predictor) -> None:
    client = JsonClient(pred)
    via_json = run("maximize", client)
    local = run("maximize", pred)
    assert client.calls > 0
    assert_same_trials(via_json, local, "curvecast_prob_improve", 1e-6)


class Oracle:
    """A transparent backend: stop when the best value so far trails the incumbent by > 0.2.
    It checks what the pruner sends (direction, incumbent) independently of model quality."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    def early_stop(self, curves: list[Curve], incumbents: list[float], rule: StopRule) -> Any:
        out = []
        for c, inc in zip(curves, incumbents, strict=True):
            self.seen.append((c.direction, inc))
            v = np.asarray(c.values)
            gap = (inc - v.max()) if c.direction == "max" else (v.min() - inc)
            out.append({"stop": bool(gap > 0.2), "prob_improve": 0.0 if gap > 0.2 else 1.0,
                        "prob_improve_final": 0.0, "final_mean": float(v[-1]),
                        "final_quantiles": {"0.5": float(v[-1])},
                        "expected_remaining_epochs": 0.0, "reason": "oracle"})
        return {"decisions": out}


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_direction_and_incumbent_reach_the_backend(direction: str) -> None:
    oracle = Oracle()
    study = run(direction, oracle, n_startup_trials=2, calibrate=False)  # decisions only
    TS = optuna.trial.TrialState
    minimise = direction == "minimize"
    assert [t.state for t in study.trials] == [TS.COMPLETE, TS.COMPLETE] + [TS.PRUNED] * 3
    finals = [float(1 - acc_curve(i)[-1] if minimise else acc_curve(i)[-1]) for i in (0, 1)]
    want = min(finals) if minimise else max(finals)
    assert oracle.seen and all(d == ("min" if minimise else "max") for d, _ in oracle.seen)
    assert all(inc == pytest.approx(want) for _, inc in oracle.seen)
    assert "curvecast_final_mean" not in study.trials[1].user_attrs  # before n_startup_trials


def test_backend_failure_fails_open_and_user_errors_raise(pred: Predictor) -> None:
    class Down:
        def early_stop(self, *a: Any, **k: Any) -> Any:
            raise ConnectionError("server unreachable")

    study = run("maximize", Down())
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    with pytest.raises(CurvecastError, match="horizon"):
        CurvecastPruner(0)
    with pytest.raises(CurvecastError, match="backend"):
        CurvecastPruner(10, backend=object())
    short = CurvecastPruner(1, pred, rule=RULE)  # the objective reports beyond the horizon
    study = optuna.create_study(direction="maximize", pruner=short)
    with pytest.raises(CurvecastError, match="exceeds horizon"):
        study.optimize(make_objective(False), n_trials=3)


@pytest.mark.slow
def test_real_server_and_client_backend(pred: Predictor) -> None:
    """The pruner over HTTP: serve.client.Client against a real server on a free port."""
    from serve.client import Client
    from serve.testing import LocalServer

    env = {"CURVECAST_WARMUP": "0", "CURVECAST_THREADS": "1", "CURVECAST_RUNTIME": "torch"}
    budget = Budget(n_trials=len(TOPS), epochs=3 * HORIZON)
    with LocalServer(env=env) as srv:
        remote = run("maximize", Client(srv.url))
        remote_b = run("maximize", Client(srv.url), budget=budget, budget_rule="opportunity")
        remote_r = run("maximize", Client(srv.url), budget=Budget(40, 4 * HORIZON))
    local = run("maximize", pred)
    assert_same_trials(remote, local, "curvecast_final_mean", 1e-4)
    # with a budget the client asks the server for the opportunity rule's quantiles too
    local_b = run("maximize", pred, budget=budget, budget_rule="opportunity")
    assert [t.state for t in remote_b.trials] == [t.state for t in local_b.trials]
    got = remote_b.pruner.budgeted.opportunity.preds
    want = local_b.pruner.budgeted.opportunity.preds
    assert got.keys() == want.keys() and len(got) >= 2
    for k in got:
        for n in got[k]:
            assert got[k][n] == pytest.approx(want[k][n], abs=1e-4)
    # the rung rule over HTTP: the client asks for the median, the same trials are pruned
    local_r = run("maximize", pred, budget=Budget(40, 4 * HORIZON))
    assert [t.state for t in remote_r.trials] == [t.state for t in local_r.trials]
    got_r, want_r = remote_r.pruner.budgeted.rungs.scores, local_r.pruner.budgeted.rungs.scores
    assert got_r.keys() == want_r.keys() and len(got_r[1]) >= 3
    for n in got_r:
        assert got_r[n] == pytest.approx(want_r[n], abs=1e-4)
    # a user error answered with a 4xx is raised, not swallowed by fail_open
    with LocalServer(env=env) as srv:
        study = optuna.create_study(direction="maximize",
                                    pruner=CurvecastPruner(1, Client(srv.url), rule=RULE))
        with pytest.raises(ValueError, match="horizon"):
            study.optimize(make_objective(False), n_trials=3)


def test_budget_gate_prunes_only_while_the_budget_is_short(pred: Predictor) -> None:
    """Budget of 3 full runs for 5 trials: the first two complete (24 of 36 epochs), the bad
    trials 2 and 3 are pruned at once (untried trials need more than the budget left), the last
    one is kept (no untried trial: a stop would save nothing) until the budget is spent."""
    study = run("maximize", pred, budget=Budget(n_trials=len(TOPS), epochs=3 * HORIZON),
                budget_rule="opportunity")
    TS = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [TS.COMPLETE] * 2 + [TS.PRUNED] * 3
    assert [len(t.intermediate_values) for t in study.trials] == [12, 12, 2, 2, 8]
    kept = study.trials[4]
    assert kept.user_attrs["curvecast_stop"] and kept.last_step == 7  # 36 epochs spent
    # a budget that reaches every trial vetoes every stop (without one the bad trials are
    # pruned at their second step: test_prunes_bad_trials_and_records_predictions)
    ample = run("maximize", pred, budget=Budget(n_trials=len(TOPS), epochs=len(TOPS) * HORIZON),
                budget_rule="opportunity")
    assert all(t.state == TS.COMPLETE for t in ample.trials)
    with pytest.raises(CurvecastError, match="budget"):
        CurvecastPruner(HORIZON, pred, budget=(5, 60))  # type: ignore[arg-type]


def test_opportunity_rule_prunes_what_the_paper_rule_keeps(pred: Predictor) -> None:
    """delta 0 (the rule alone never prunes) and a budget far short of 40 trials: after three
    trials ended with predictions, a poor one is pruned for its opportunity cost."""
    tops = [0.9, 0.88, 0.89, 0.87, 0.05]

    def objective(trial: Any) -> float:
        t = np.arange(1, HORIZON + 1)
        y = tops[trial.number] * (1 - np.exp(-t / 2))
        for step in range(HORIZON):
            trial.report(float(y[step]), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(y[-1])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = CurvecastPruner(HORIZON, pred, rule=StopRule(delta=0.0), bounds=(0, 1),
                             n_startup_trials=1, budget=Budget(n_trials=40, epochs=10 * HORIZON),
                             budget_rule="opportunity")
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.optimize(objective, n_trials=len(tops))
    TS = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [TS.COMPLETE] * 4 + [TS.PRUNED]
    a = study.trials[4].user_attrs
    assert "opportunity cost" in a["curvecast_reason"] and a["curvecast_step"] == 1
    assert set(a["curvecast_final_quantiles"]) == {"0.05", "0.5", "0.95"}


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_rungs_prune_by_rank_whatever_the_rule_says(pred: Predictor, direction: str) -> None:
    """With a budget (default budget_rule "rungs") trials are ranked at 1, 4, 16 values by
    their predicted final median: a flat trial at a rung where better ones went before is
    pruned even with delta 0 (the rule alone never prunes); the rule's stop never counts; a
    good trial passes. Losses rank the other way."""
    tops = [0.5, 0.8, 0.9, 0.05, 0.95]

    def curve(n: int) -> np.ndarray:
        return tops[n] * (1 - np.exp(-np.arange(1, HORIZON + 1) / 2))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = CurvecastPruner(HORIZON, pred, rule=StopRule(delta=0.0), bounds=(0, 1),
                             budget=Budget(n_trials=40, epochs=8 * HORIZON))
    assert pruner.budgeted is not None and pruner.budgeted.rule == "rungs"
    assert pruner.n_startup_trials == 0  # the rungs need no incumbent: none protected
    study = optuna.create_study(direction=direction, pruner=pruner)
    study.optimize(make_objective(direction == "minimize", curve), n_trials=len(tops))
    TS = optuna.trial.TrialState
    # trial 0 leads its rungs alone (decided without an incumbent); 1 and 2 lead the rungs they
    # reach; 3 is last of 4 at its first value (pressure ~5: the top quarter, at least one,
    # goes on); 4 leads
    assert [t.state for t in study.trials] == [TS.COMPLETE] * 3 + [TS.PRUNED, TS.COMPLETE]
    assert study.trials[0].user_attrs["curvecast_step"] == HORIZON - 1
    a = study.trials[3].user_attrs
    assert a["curvecast_step"] == 0 and "successive halving at 1 values" in a["curvecast_reason"]
    assert "ranks 4 of the 4" in a["curvecast_reason"] and a["curvecast_stop"]
    sc = pruner.budgeted.rungs.scores
    assert set(sc) == {1, 4} and len(sc[1]) == 5
    ranked = sorted(sc[4], key=lambda k: -sc[4][k])
    assert ranked == ["4", "2", "1", "0"]  # by predicted final, better first either way
    assert CurvecastPruner(HORIZON, pred, budget=Budget(3, 30), n_startup_trials=2,
                           budget_rule="rungs").n_startup_trials == 2
    assert CurvecastPruner(HORIZON, pred, budget=Budget(3, 30),
                           budget_rule="opportunity").n_startup_trials == 2
    with pytest.raises(CurvecastError, match="budget_rule"):
        CurvecastPruner(HORIZON, pred, budget=Budget(3, 30), budget_rule="halving")  # type: ignore[arg-type]


def test_backend_by_model_name_is_checked_early_and_loaded_lazily(pred: Predictor) -> None:
    from pfn.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-model.*default"):
        CurvecastPruner(horizon=HORIZON, backend="no-such-model")
    by_name = Decider("default", calibrate=False)
    assert by_name._default is None  # nothing loaded before the first decision
    curves = [Curve([1, 2, 3], [0.30, 0.41, 0.45], horizon=HORIZON, bounds=(0, 1))]
    got = by_name(curves, [0.9])[0]
    want = Decider(pred, calibrate=False)(curves, [0.9])[0]
    assert got.stop == want.stop
    assert got.prob_improve == pytest.approx(want.prob_improve, abs=1e-6)
    assert got.final_mean == pytest.approx(want.final_mean, abs=1e-6)
