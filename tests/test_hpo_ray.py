"""CurvecastScheduler: driven through Ray Tune's own Trial objects (fast), and a real Tune run
(slow: starting Ray takes ~20 s here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial  # noqa: E402
from ray.tune.schedulers import TrialScheduler  # noqa: E402

from pfn import Curve, CurvecastError, Predictor  # noqa: E402
from pfn.early_stop import Budget, StopRule, decide  # noqa: E402
from pfn.hpo.ray import CurvecastScheduler  # noqa: E402

HORIZON = 12
RULE = StopRule(delta=0.9)  # loose: trials far below the incumbent stop with any sensible model
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def acc(top: float) -> np.ndarray:
    t = np.arange(1, HORIZON + 1)
    return top * (1 - np.exp(-t / 2))


def play(s: CurvecastScheduler, trial: Trial, values: np.ndarray, key: str = "acc") -> list[str]:
    """Feed results until the scheduler stops the trial or the values run out."""
    s.on_trial_add(None, trial)  # type: ignore[arg-type]
    out = []
    for i, v in enumerate(values):
        r = {"training_iteration": i + 1, key: float(v)}
        out.append(s.on_trial_result(None, trial, r))  # type: ignore[arg-type]
        if out[-1] == STOP:
            break
    s.on_trial_complete(None, trial, r)  # type: ignore[arg-type]
    return out


def test_stops_bad_trials_keeps_history_and_matches_decide(pred: Predictor) -> None:
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1),
                           n_startup_trials=1)
    good, bad = Trial("f", stub=True), Trial("f", stub=True)
    assert play(s, good, acc(0.9)) == [CONTINUE] * HORIZON  # no incumbent while it runs
    assert s.finals == {good.trial_id: pytest.approx(acc(0.9)[-1])}
    got = play(s, bad, acc(0.05))
    assert got == [CONTINUE] * (RULE.min_epochs - 1) + [STOP]
    assert bad.trial_id in s.stopped and bad.trial_id not in s.finals
    assert s.histories[bad.trial_id] == [[i + 1.0, pytest.approx(v)]
                                        for i, v in enumerate(acc(0.05)[:RULE.min_epochs])]
    d = decide(pred, [Curve([1, 2], acc(0.05)[:2], HORIZON, bounds=(0, 1))], [acc(0.9)[-1]],
               RULE)[0]
    last = s.decisions[bad.trial_id]
    assert last["stop"] and last["prob_improve"] == pytest.approx(d.prob_improve, abs=1e-6)
    assert "stopped 1 of 2" in s.debug_string()


def test_min_mode_mirrors_max_mode(pred: Predictor) -> None:
    up = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1))
    down = CurvecastScheduler(HORIZON, pred, metric="loss", mode="min", rule=RULE, bounds=(0, 1))
    for top in (0.9, 0.3, 0.95, 0.05):
        a = play(up, Trial("f", stub=True), acc(top))
        b = play(down, Trial("f", stub=True), 1 - acc(top), key="loss")
        assert a == b
    for da, db in zip(up.decisions.values(), down.decisions.values(), strict=True):
        assert da["prob_improve"] == pytest.approx(db["prob_improve"], abs=1e-4)
        assert da["final_mean"] == pytest.approx(1 - db["final_mean"], abs=1e-4)


def test_save_restore_round_trip(pred: Predictor, tmp_path: Path) -> None:
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1),
                           incumbent="observed")
    play(s, Trial("f", stub=True), acc(0.9))
    running = Trial("f", stub=True)
    s.on_trial_add(None, running)  # type: ignore[arg-type]
    s.on_trial_result(None, running, {"training_iteration": 1, "acc": 0.01})  # type: ignore[arg-type]
    path = tmp_path / "sched" / "state.json"
    s.save(str(path))
    state = json.loads(path.read_text())  # plain JSON, not pickle
    assert state["rule"]["delta"] == RULE.delta and len(state["histories"]) == 2
    fresh = CurvecastScheduler(1, pred, rule=StopRule())  # everything comes from the file
    fresh.restore(str(path))
    assert fresh.state_dict() == s.state_dict()
    nxt = {"training_iteration": 2, "acc": 0.02}
    assert fresh.on_trial_result(None, running, nxt) == \
        s.on_trial_result(None, running, dict(nxt))  # type: ignore[arg-type]
    state["version"] = 99
    path.write_text(json.dumps(state))
    with pytest.raises(CurvecastError, match="version"):
        fresh.restore(str(path))


def test_edge_cases(pred: Predictor) -> None:
    s = CurvecastScheduler(HORIZON, pred, rule=RULE)
    with pytest.raises(CurvecastError, match="metric/mode"):
        s.on_trial_add(None, Trial("f", stub=True))  # type: ignore[arg-type]
    assert s.set_search_properties("acc", "max") and not s.set_search_properties("x", "min")
    play(s, Trial("f", stub=True), acc(0.9))
    t = Trial("f", stub=True)
    s.on_trial_add(None, t)  # type: ignore[arg-type]
    r: dict[str, Any] = {"training_iteration": 1, "other": 1.0}
    assert s.on_trial_result(None, t, r) == CONTINUE  # type: ignore[arg-type]  # no metric
    for it in (1, 2, 2):  # the repeated result is ignored
        s.on_trial_result(None, t, {"training_iteration": it, "acc": 0.5})  # type: ignore[arg-type]
    assert len(s.histories[t.trial_id]) == 2
    with pytest.raises(CurvecastError, match="horizon"):
        CurvecastScheduler(0)
    with pytest.raises(CurvecastError, match="mode"):
        CurvecastScheduler(10, mode="maximize")


@pytest.mark.slow
def test_real_tune_run(pred: Predictor, tmp_path: Path) -> None:
    import ray
    from ray import tune

    horizon = HORIZON

    def trainable(config: dict[str, Any]) -> None:  # self-contained: workers import no tests
        import math

        from ray import tune as t

        for i in range(1, horizon + 1):
            t.report({"acc": config["top"] * (1 - math.exp(-i / 2))})

    sched = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1),
                               n_startup_trials=1)  # the grid's first trial gives the incumbent
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tuner = tune.Tuner(
            trainable, param_space={"top": tune.grid_search([0.9, 0.05, 0.08])},
            tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        results = {r.config["top"]: r.metrics["training_iteration"] for r in tuner.fit()}
    finally:
        ray.shutdown()
    assert results[0.9] == HORIZON
    assert results[0.05] == results[0.08] == RULE.min_epochs
    assert len(sched.stopped) == 2 and len(sched.finals) == 1


def test_completed_trials_calibrate_and_survive_restore(pred: Predictor, tmp_path: Path) -> None:
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1))
    assert play(s, Trial("f", stub=True), acc(0.9)) == [CONTINUE] * HORIZON
    short = Trial("f", stub=True)  # ends before the horizon: nothing to learn from
    s.on_trial_add(None, short)  # type: ignore[arg-type]
    s.on_trial_complete(None, short, {"training_iteration": 1, "acc": 0.5})  # type: ignore[arg-type]
    cal = s.decider.calibrator
    assert cal is not None and cal.trials == 1
    path = tmp_path / "state.json"
    s.save(str(path))
    assert len(json.loads(path.read_text())["calibration"]["z"]) == 1
    fresh = CurvecastScheduler(1, pred)
    fresh.restore(str(path))
    assert fresh.decider.calibrator is not None and fresh.decider.calibrator.trials == 1
    assert fresh.state_dict() == s.state_dict()
    off = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", calibrate=False)
    play(off, Trial("f", stub=True), acc(0.9))
    assert off.decider.calibrator is None and off.state_dict()["calibration"] is None


def test_nothing_stops_before_n_startup_trials_completed(pred: Predictor) -> None:
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE, bounds=(0, 1))
    assert s.n_startup_trials == 2
    play(s, Trial("f", stub=True), acc(0.9))
    assert play(s, Trial("f", stub=True), acc(0.05)) == [CONTINUE] * HORIZON  # 1 completed
    assert STOP in play(s, Trial("f", stub=True), acc(0.05))  # 2 completed: the rule decides
    with pytest.raises(CurvecastError, match="n_startup_trials"):
        CurvecastScheduler(HORIZON, pred, n_startup_trials=-1)


def test_budget_gate_and_its_state(pred: Predictor, tmp_path: Path) -> None:
    """A budget that reaches the untried trials vetoes the stop; a short one lets it happen;
    the ended trials (which set the cost per trial) survive save/restore."""
    def sched(epochs: float) -> CurvecastScheduler:
        return CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=RULE,
                                  bounds=(0, 1), n_startup_trials=1,
                                  budget=Budget(n_trials=3, epochs=epochs),
                                  budget_rule="opportunity")

    ample, short = sched(100), sched(20)
    for s in (ample, short):
        play(s, Trial("f", stub=True), acc(0.9))
    # second trial, 2 results: untried 1 x 12 epochs against 100 - 14 left, or 20 - 14
    assert play(ample, Trial("f", stub=True), acc(0.05)[:4]) == [CONTINUE] * 4
    assert "budget reaches every untried" in list(ample.decisions.values())[-1]["reason"]
    assert play(short, Trial("f", stub=True), acc(0.05)) == [CONTINUE, STOP]
    assert short.pressure() == pytest.approx(1 * (12 + 2) / 2 / (20 - 14))
    path = tmp_path / "s.json"
    short.save(str(path))
    fresh = sched(20)
    fresh.restore(str(path))
    assert fresh.ended == short.ended and len(fresh.ended) == 2
    assert fresh.pressure() == short.pressure()
    with pytest.raises(CurvecastError, match="budget"):
        CurvecastScheduler(HORIZON, pred, budget={"n_trials": 3})  # type: ignore[arg-type]


def test_opportunity_rule_stops_what_the_paper_rule_keeps(pred: Predictor,
                                                          tmp_path: Path) -> None:
    """A rule that never stops on its own (delta 0) and a budget far short of 40 trials: once
    three trials ended with predictions, a poor one is stopped for its opportunity cost; the
    predictions survive save/restore, and the shown quantiles are only the asked ones."""
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=StopRule(delta=0.0),
                           bounds=(0, 1), n_startup_trials=1,
                           budget=Budget(n_trials=40, epochs=10 * HORIZON),
                           budget_rule="opportunity")
    for top in (0.9, 0.88, 0.89, 0.87):
        assert STOP not in play(s, Trial("f", stub=True), acc(top))
    poor = Trial("f", stub=True)
    got = play(s, poor, acc(0.05))
    assert got == [CONTINUE] * (RULE.min_epochs - 1) + [STOP]
    last = s.decisions[poor.trial_id]
    assert "opportunity cost" in last["reason"] and set(last["final_quantiles"]) == {
        "0.05", "0.5", "0.95"}
    assert s.budgeted is not None and len(s.budgeted.opportunity.preds) == 4
    path = tmp_path / "s.json"
    s.save(str(path))
    fresh = CurvecastScheduler(1, pred)  # the plan and the budget rule come with the state
    fresh.restore(str(path))
    assert fresh.budgeted is not None and fresh.budgeted.rule == "opportunity"
    assert fresh.budget == Budget(40, 10 * HORIZON)
    assert fresh.budgeted.opportunity.state_dict() == s.budgeted.opportunity.state_dict()
    assert fresh.decider.keep_levels == s.decider.keep_levels


def test_rungs_stop_by_rank_and_survive_save_restore(pred: Predictor, tmp_path: Path) -> None:
    """budget_rule "rungs" (the default with a budget): a poor trial is stopped at its first
    result because it ranks last among the trials that reached that rung, with delta 0 (the
    rule alone never stops); the rung populations survive save/restore."""
    s = CurvecastScheduler(HORIZON, pred, metric="acc", mode="max", rule=StopRule(delta=0.0),
                           bounds=(0, 1), budget=Budget(n_trials=40, epochs=8 * HORIZON))
    assert s.n_startup_trials == 0  # the rungs need no incumbent: none protected
    for top in (0.5, 0.8, 0.9):
        assert STOP not in play(s, Trial("f", stub=True), acc(top))
    poor = Trial("f", stub=True)
    assert play(s, poor, acc(0.05)) == [STOP]
    assert "successive halving at 1 values" in s.decisions[poor.trial_id]["reason"]
    assert s.budgeted is not None
    assert len(s.budgeted.rungs.scores[1]) == 4 and len(s.budgeted.rungs.scores[4]) == 3
    path = tmp_path / "s.json"
    s.save(str(path))
    fresh = CurvecastScheduler(1, pred)
    fresh.restore(str(path))
    assert fresh.budgeted is not None
    assert fresh.budgeted.state_dict() == s.budgeted.state_dict()
    assert fresh.state_dict() == s.state_dict()
