"""Early-stopping decisions: the rule's semantics, batching, direction symmetry, JSON form."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from pfn import Curve, CurveError, Predictor
from pfn.early_stop import (
    CAL_LEVELS,
    OPPORTUNITY_LEVELS,
    Budget,
    Calibrator,
    Decision,
    Opportunity,
    Rungs,
    StopRule,
    budget_pressure,
    calibrate_decision,
    calibration_prefixes,
    checked_epochs,
    curve_to_dict,
    decide,
    decision_from_dict,
    decision_to_dict,
    early_stop_json,
    expected_gain,
    final_score,
    gate_by_budget,
    is_rung,
    rule_from_dict,
    rule_to_dict,
)
from pfn.io import DECISION_MODEL


@pytest.fixture(scope="module")
def pred() -> Iterator[Predictor]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread beats two on a shared CPU
    yield Predictor.load(DECISION_MODEL)  # the model decisions use by default
    torch.set_num_threads(n)


def _acc(n: int = 5, horizon: float = 40, top: float = 0.6) -> Curve:
    e = np.arange(1, n + 1, dtype=float)
    return Curve(e, top * (1 - np.exp(-e / 3)), horizon=horizon, bounds=(0, 1))


def test_checked_epochs_grid() -> None:
    np.testing.assert_array_equal(checked_epochs(3, 7), [4, 5, 6, 7])
    np.testing.assert_array_equal(checked_epochs(3.5, 6.5), [4, 5, 6, 6.5])
    g = checked_epochs(2, 1000, max_points=10)
    assert g[0] == 3 and g[-1] == 1000 and len(g) == 10 and (np.diff(g) > 0).all()
    np.testing.assert_array_equal(checked_epochs(10, 10), [10])
    np.testing.assert_array_equal(checked_epochs(5, 50, given=[2, 20, 30]), [20, 30, 50])


def test_probability_matches_posterior_and_rule(pred: Predictor) -> None:
    c = _acc()
    incs = [0.2, 0.55, 0.7, 0.95]
    ds = decide(pred, [c] * len(incs), incs)
    grid = checked_epochs(5, 40)
    post = pred.predict([Curve(c.epochs, c.values, 40, query_epochs=grid, bounds=(0, 1))])[0]
    for inc, d in zip(incs, ds, strict=True):
        pg = post.prob_greater(inc)
        assert d.prob_improve == pytest.approx(float(pg.max()), abs=1e-6)
        assert d.prob_improve_final == pytest.approx(float(pg[-1]), abs=1e-6)
        assert d.final_mean == pytest.approx(float(post.mean[-1]), abs=1e-6)
        assert d.stop == (d.prob_improve <= 0.05)
        assert d.expected_remaining_epochs == (0.0 if d.stop else 35.0)
    p = [d.prob_improve for d in ds]
    assert p == sorted(p, reverse=True) and p[0] > 0.5 > p[-1]
    assert not ds[0].stop and ds[-1].stop  # incumbent far below / far above the curve


def test_batch_equals_one_by_one(pred: Predictor) -> None:
    cs = [_acc(3), _acc(7, horizon=100, top=0.8), _acc(2, horizon=10, top=0.3)]
    incs = [0.5, 0.9, 0.1]
    together = decide(pred, cs, incs)
    for c, inc, d in zip(cs, incs, together, strict=True):
        alone = decide(pred, [c], [inc])[0]
        assert alone.prob_improve == pytest.approx(d.prob_improve, abs=1e-5)
        assert alone.final_quantiles == pytest.approx(d.final_quantiles, abs=1e-5)
        assert alone.stop == d.stop


def test_minimised_metric_mirrors_maximised(pred: Predictor) -> None:
    e = np.arange(1.0, 6.0)
    loss = 2.0 * np.exp(-e / 4) + 0.3
    lo, hi = 0.0, 2.5
    mins = Curve(e, loss, horizon=30, direction="min", bounds=(lo, hi))
    maxs = Curve(e, -loss, horizon=30, direction="max", bounds=(-hi, -lo))
    for inc in (0.4, 0.9, 1.5):
        a, b = decide(pred, [mins, maxs], [inc, -inc], quantiles=(0.1, 0.9))
        assert a.prob_improve == pytest.approx(b.prob_improve, abs=1e-5)
        assert a.final_mean == pytest.approx(-b.final_mean, abs=1e-5)
        assert a.final_quantiles[0.1] == pytest.approx(-b.final_quantiles[0.9], abs=1e-4)
        assert a.expected_improvement == pytest.approx(b.expected_improvement, abs=1e-4)
    # a loss: improving means going below the incumbent
    lo_inc, hi_inc = decide(pred, [mins, mins], [0.05, 2.4])
    assert lo_inc.prob_improve < hi_inc.prob_improve
    assert lo_inc.final_quantiles[0.05] < lo_inc.final_quantiles[0.95]


def test_min_epochs_no_incumbent_and_horizon(pred: Predictor) -> None:
    one = Curve([1], [0.05], horizon=50, bounds=(0, 1))
    d = decide(pred, [one, one, _acc()], [0.99, 0.99, None])
    assert not d[0].stop and "from 2 on" in d[0].reason
    assert decide(pred, [one], [0.99], StopRule(min_epochs=1))[0].stop
    assert not d[2].stop and d[2].prob_improve == 1.0 and math.isnan(d[2].expected_improvement)
    done = Curve([1, 2, 3], [0.1, 0.2, 0.3], horizon=3, bounds=(0, 1))
    d = decide(pred, [done], [0.1])[0]
    assert not d.stop and d.expected_remaining_epochs == 0 and "horizon" in d.reason


def test_final_epoch_and_expected_improvement_rules(pred: Predictor) -> None:
    c = _acc()
    inc = 0.6
    base = decide(pred, [c], [inc])[0]
    delta = (base.prob_improve_final + 1e-3)  # just above the final-epoch probability
    fin = decide(pred, [c], [inc], StopRule(kind="final_epoch", delta=delta))[0]
    assert fin.stop and base.prob_improve_final <= delta
    ei = base.expected_improvement
    assert ei >= max(0.0, base.final_mean - inc) - 1e-3  # Jensen: E[max(0, X)] >= max(0, E[X])
    per_epoch = ei / 35
    assert decide(pred, [c], [inc], StopRule(kind="expected_improvement",
                                             min_gain_per_epoch=per_epoch * 1.01))[0].stop
    assert not decide(pred, [c], [inc], StopRule(kind="expected_improvement",
                                                 min_gain_per_epoch=per_epoch * 0.99))[0].stop


@pytest.mark.parametrize("kw, field", [
    ({"kind": "sometimes"}, "rule.kind"),
    ({"delta": 1.5}, "rule.delta"),
    ({"delta": -0.1}, "rule.delta"),
    ({"min_epochs": 0}, "rule.min_epochs"),
    ({"kind": "expected_improvement"}, "rule.min_gain_per_epoch"),
    ({"min_gain_per_epoch": 0.1}, "rule.min_gain_per_epoch"),
])
def test_rule_validation(kw: dict, field: str) -> None:
    with pytest.raises(CurveError) as e:
        StopRule(**kw)
    assert e.value.field == field


def test_errors_name_the_field(pred: Predictor) -> None:
    with pytest.raises(CurveError, match="incumbents"):
        decide(pred, [_acc()], [0.5, 0.6])
    with pytest.raises(CurveError) as e:
        decide(pred, [_acc(), Curve([1, 2], [0.1, 0.2], horizon=1)], [0.5, 0.5])
    assert e.value.index == 1 and e.value.field == "epochs"
    with pytest.raises(CurveError, match="incumbent"):
        decide(pred, [_acc()], ["high"])  # type: ignore[list-item]


def test_json_round_trip(pred: Predictor) -> None:
    curves = [_acc(), Curve([1, 2, 3], [2.0, 1.6, 1.5], 20, direction="min")]
    rule = StopRule(kind="final_epoch", delta=0.1, min_epochs=3)
    req = {"curves": [curve_to_dict(c) for c in curves], "incumbents": [0.5, None],
           "rule": rule_to_dict(rule), "quantiles": [0.25, 0.75]}
    resp = json.loads(json.dumps(early_stop_json(pred, json.loads(json.dumps(req)))))
    assert resp["model"]["sha256"] == pred.sha256
    direct = decide(pred, curves, [0.5, None], rule, (0.25, 0.75))
    for got, want in zip(resp["decisions"], direct, strict=True):
        assert set(got["final_quantiles"]) == {"0.25", "0.75"}
        back = decision_from_dict(got)
        assert isinstance(back, Decision) and back.stop == want.stop
        assert back.prob_improve == pytest.approx(want.prob_improve, abs=1e-6)
        assert back.final_quantiles == pytest.approx(want.final_quantiles, abs=1e-6)
    assert resp["decisions"][1]["expected_improvement"] is None  # no incumbent
    assert decision_from_dict(decision_to_dict(direct[0])).reason == direct[0].reason
    assert rule_from_dict(rule_to_dict(rule)) == rule and rule_from_dict(None) == StopRule()


@pytest.mark.parametrize("req, field", [
    ({"curves": [{"epochs": [1], "values": [0.1], "horizon": 5}], "incumbents": [0.1],
      "extra": 1}, "extra"),
    ({"curves": [{"epochs": [1], "values": [0.1], "horizon": 5, "thresholds": [1]}],
      "incumbents": [0.1]}, "thresholds"),
    ({"curves": [{"epochs": [1], "values": [0.1], "horizon": 5}]}, "incumbents"),
    ({"curves": [{"epochs": [1], "values": [0.1], "horizon": 5}], "incumbents": [0.1],
      "rule": {"delta": 0.1, "patience": 3}}, "rule.patience"),
    ({"curves": [{"epochs": [1], "values": [0.1], "horizon": 5}], "incumbents": [0.1],
      "quantiles": [0, 0.5]}, "quantiles[0]"),
])
def test_json_rejects_bad_requests(pred: Predictor, req: dict, field: str) -> None:
    with pytest.raises(CurveError) as e:
        early_stop_json(pred, req)
    assert e.value.field == field


# ---------------------------------------------------------------------------------------------
# online calibration


def test_calibrator_formula_matching_and_state() -> None:
    cal = Calibrator(prior_weight=4.0, match=1.5)
    p = np.array([0.2, 0.01])
    assert np.allclose(cal.prob_improve(0.05, p, [1.0, 9.0]), p)  # empty: the model's
    cal.add([0.05, 0.1, 0.4], [5.0, 1.0, -2.0])  # trial 1
    cal.add([0.06, 0.5], [3.0, 0.0])  # trial 2
    cal.add([0.9], [7.0])  # trial 3: only late prefixes
    assert cal.trials == 3
    # at progress 0.055 trial 1 matches with its 0.05 prefix (z 5), trial 2 with 0.06 (z 3);
    # trial 3 is too far (0.9 > 1.5 x 0.055)
    assert np.allclose(cal.scores_at(0.055), [3.0, 5.0])
    for z_inc, hits in ((6.0, 0), (5.0, 1), (4.0, 1), (3.0, 2), (-1.0, 2)):
        got = cal.prob_improve(0.055, 0.01, z_inc)
        assert float(got) == pytest.approx((4 * 0.01 + hits) / (4 + 2))
    assert np.allclose(cal.scores_at(0.45), [-2.0, 0.0])  # nearest in log-progress
    assert np.allclose(cal.scores_at(0.8), [7.0])
    assert cal.scores_at(0.2).size == 0  # 0.1 and 0.4 are both off by a factor of 2
    assert float(cal.prob_improve(0.2, 0.1, -3.0)) == pytest.approx(0.1)
    # vectorised over progress, and the state survives a JSON round trip
    got = cal.prob_improve([0.055, 0.45], [0.01, 0.1], [3.0, -3.0])
    back = Calibrator.from_state_dict(json.loads(json.dumps(cal.state_dict())))
    assert np.allclose(back.prob_improve([0.055, 0.45], [0.01, 0.1], [3.0, -3.0]), got)
    assert back.trials == 3


@pytest.mark.parametrize("kw, field", [({"prior_weight": 0}, "calibration.prior_weight"),
                                       ({"match": 1.0}, "calibration.match"),
                                       ({"prior_weight": float("nan")},
                                        "calibration.prior_weight")])
def test_calibrator_validation(kw: dict, field: str) -> None:
    with pytest.raises(CurveError, match=field.replace(".", r"\.")):
        Calibrator(**kw)


def test_calibration_prefixes() -> None:
    full = Curve(np.arange(1, 41), np.linspace(0.1, 0.8, 40), horizon=40, bounds=(0, 1))
    pre, prog, final = calibration_prefixes(full, min_epochs=2, max_prefixes=16)
    assert 12 <= len(pre) <= 16 and final == pytest.approx(0.8)
    n_pts = [len(np.asarray(c.epochs)) for c in pre]
    assert n_pts[:4] == [2, 3, 4, 5] and n_pts[-1] == 39 and n_pts == sorted(set(n_pts))
    assert np.allclose(prog, [float(np.asarray(c.epochs)[-1]) / 40 for c in pre])
    short = Curve(np.arange(1, 11), np.linspace(0.1, 0.8, 10), horizon=40, bounds=(0, 1))
    assert calibration_prefixes(short)[0] == []  # never reached its horizon


@pytest.mark.parametrize("direction", ["max", "min"])
def test_calibration_keeps_a_slow_starter_the_model_would_stop(pred: Predictor,
                                                               direction: str) -> None:
    """A study whose completed runs all started flat and took off late: a new flat start is
    stopped by the model alone, kept once the calibrator has seen such runs. Calibration never
    stops what the model keeps."""
    h = 60.0
    e = np.arange(1, 61, dtype=float)
    sign = 1.0 if direction == "max" else -1.0
    base = 0.0 if direction == "max" else 1.0

    def slow(top: float) -> np.ndarray:  # ~flat for 10 epochs, then a sigmoid take-off
        return base + sign * (0.005 + top / (1 + np.exp(-(e - 20) / 4)))

    def curve(v: np.ndarray, n: int) -> Curve:
        return Curve(e[:n], v[:n], horizon=h, direction=direction, bounds=(0, 1))  # type: ignore[arg-type]

    inc = float(slow(0.7)[-1])
    new = curve(slow(0.75), 5)  # indistinguishable from the others after 5 epochs
    raw = decide(pred, [new], [inc])[0]
    assert raw.stop  # the model, trained on curves without slow starts, gives up on it
    cal = Calibrator()
    for top in (0.6, 0.7, 0.8):
        pre, prog, final = calibration_prefixes(curve(slow(top), 60))
        ds = decide(pred, pre, [final] * len(pre))
        fq = np.array([[d.final_quantiles[q] for q in CAL_LEVELS] for d in ds])
        cal.add(prog, final_score(final, fq[:, 1], fq[:, 0], fq[:, 2], direction))
    kept = decide(pred, [new], [inc], calibrator=cal)[0]
    assert not kept.stop and kept.prob_improve > 0.05 and "calibrated on 3" in kept.reason
    assert kept.expected_remaining_epochs == pytest.approx(55.0)
    assert set(kept.final_quantiles) == {0.05, 0.5, 0.95}
    # a trial the model keeps stays kept, and its probabilities only grow
    good = curve(slow(0.9), 40)
    a, b = decide(pred, [good], [inc])[0], decide(pred, [good], [inc], calibrator=cal)[0]
    assert not a.stop and not b.stop and b.prob_improve >= a.prob_improve
    # a trial far worse than anything seen is still stopped
    bad = Curve(e[:30], np.full(30, base + sign * 0.02), horizon=h, direction=direction,  # type: ignore[arg-type]
                bounds=(0, 1))
    assert decide(pred, [bad], [inc], calibrator=cal)[0].stop


def test_calibrate_decision_leaves_what_it_cannot_calibrate(pred: Predictor) -> None:
    cal = Calibrator()
    cal.add([0.05, 0.1], [50.0, 50.0])  # a study whose runs all beat the model by far
    c = _acc(n=3, horizon=40, top=0.1)
    d = decide(pred, [c], [0.9])[0]
    assert d.stop
    kept = calibrate_decision(d, cal, c, 0.9, StopRule())
    assert not kept.stop and kept.expected_remaining_epochs == pytest.approx(37.0)
    no_levels = Decision(**{**d.__dict__, "final_quantiles": {0.5: 0.2}})  # e.g. a remote one
    assert calibrate_decision(no_levels, cal, c, 0.9, StopRule()) is no_levels
    assert calibrate_decision(d, cal, c, None, StopRule()) is d  # no incumbent
    ei = StopRule(kind="expected_improvement", min_gain_per_epoch=0.0)
    assert calibrate_decision(d, cal, c, 0.9, ei) is d
    assert calibrate_decision(d, Calibrator(), c, 0.9, StopRule()) is d  # nothing learned yet


@pytest.mark.parametrize("direction", ["max", "min"])
def test_min_delta_shifts_what_counts_as_improving(pred: Predictor, direction: str) -> None:
    e = np.arange(1, 8, dtype=float)
    v = 0.6 * (1 - np.exp(-e / 3))
    c = Curve(e, v if direction == "max" else 1 - v, horizon=30, direction=direction,  # type: ignore[arg-type]
              bounds=(0, 1))
    inc, md = (0.55, 0.03) if direction == "max" else (0.45, 0.03)
    shifted = inc + md if direction == "max" else inc - md
    a = decide(pred, [c], [inc], StopRule(delta=0.2, min_delta=md))[0]
    b = decide(pred, [c], [shifted], StopRule(delta=0.2))[0]
    assert (a.stop, a.prob_improve, a.prob_improve_final, a.expected_improvement) == \
        (b.stop, b.prob_improve, b.prob_improve_final, b.expected_improvement)
    plain = decide(pred, [c], [inc], StopRule(delta=0.2))[0]
    assert a.prob_improve < plain.prob_improve  # a margin makes improving harder
    r = StopRule(min_delta=md)
    assert rule_from_dict(json.loads(json.dumps(rule_to_dict(r)))) == r
    assert "min_delta" not in rule_to_dict(StopRule())  # the default stays off the wire
    with pytest.raises(CurveError, match=r"rule\.min_delta"):
        StopRule(min_delta=-0.1)


def test_budget_pressure_and_gate(pred: Predictor) -> None:
    """Pressure = untried trials x mean epochs of the ended ones / epochs left; the gate
    vetoes a stop only below 1, keeps the numbers, and says why."""
    b = Budget(n_trials=10, epochs=100)
    assert budget_pressure(b, started=4, spent=40, ended=[10, 20, 6]) == pytest.approx(
        6 * 12 / 60)
    assert budget_pressure(b, 4, 40, []) == math.inf  # no cost estimate yet
    assert budget_pressure(b, 4, 100, [10]) == math.inf  # budget spent: stopping is all left
    assert budget_pressure(b, 12, 40, [10]) == 0.0  # every planned trial started
    for kw, field in (({"n_trials": 0, "epochs": 5}, "budget.n_trials"),
                      ({"n_trials": 3, "epochs": math.nan}, "budget.epochs"),
                      ({"n_trials": True, "epochs": 5}, "budget.n_trials")):
        with pytest.raises(CurveError) as e:
            Budget(**kw)
        assert e.value.field == field
    c = _acc(n=5, horizon=40, top=0.2)
    d = decide(pred, [c], [0.9], StopRule(delta=0.5))[0]
    assert d.stop and d.expected_remaining_epochs == 0
    kept = gate_by_budget(d, 0.5, c)
    assert not kept.stop and kept.expected_remaining_epochs == 35
    assert "budget" in kept.reason and kept.prob_improve == d.prob_improve
    assert gate_by_budget(d, 1.0, c) is d and gate_by_budget(d, math.inf, c) is d
    going = decide(pred, [c], [0.0])[0]
    assert not going.stop and gate_by_budget(going, 0.1, c) is going


def _point(v: float, stop: bool = False) -> Decision:
    """A decision whose predicted final value is the point v (every quantile)."""
    return Decision(stop=stop, prob_improve=0.5, prob_improve_final=0.5, final_mean=v,
                    final_quantiles={q: v for q in OPPORTUNITY_LEVELS}, reason="",
                    expected_remaining_epochs=8.0)


def test_opportunity_rule_prices_the_remaining_epochs() -> None:
    """Stop when E[gain] < (1 - 1/pressure) x share of the run left x the ended trials' mean
    E[gain] at the same point; never with an ample budget, too few ended trials, before
    min_epochs, or for a trial the rule already stops."""
    def at(n: int, horizon: float = 10) -> Curve:
        return Curve(list(range(1, n + 1)), [0.3] * n, horizon)

    opp = Opportunity()
    for t, finals in (("a", {2: 0.7, 5: 0.95}), ("b", {2: 0.6}), ("c", {2: 0.8})):
        for n, v in finals.items():
            assert opp.record(t, at(n), _point(v))
    assert not opp.record("x", at(2), replace(_point(0.5), final_quantiles={0.5: 0.5}))
    ended = ["a", "b", "c"]
    assert opp.reference(2, 0.5, "max", ended) == (pytest.approx(0.2), 3)
    assert opp.reference(6, 0.5, "max", ended)[0] == pytest.approx((0.45 + 0.1 + 0.3) / 3)
    assert opp.reference(2, 0.5, "min", ended)[0] == 0.0  # a loss: nothing predicted below
    # the bar at 2 of 10 epochs, pressure 5: 0.8 x 0.8 x 0.2 = 0.128
    for own, stops in ((0.62, True), (0.63, False)):
        opp.record("r", at(2), _point(own))
        got = opp.apply(_point(own), "r", at(2), 0.5, 5.0, ended)
        assert got.stop is stops
        if stops:
            assert "opportunity cost" in got.reason and got.expected_remaining_epochs == 0
    opp.record("r", at(2), _point(0.5))
    d = _point(0.5)
    assert opp.apply(d, "r", at(2), 0.5, 1.0, ended) is d  # budget reaches everything
    assert opp.apply(d, "r", at(2), 0.5, math.inf, ended) is d  # no cost estimate / spent
    assert opp.apply(d, "r", at(2), 0.5, 5.0, ended[:2]) is d  # too few ended trials
    assert opp.apply(d, "r", at(2), 0.5, 5.0, ended, min_epochs=3) is d
    assert opp.apply(d, "r", at(2), None, 5.0, ended) is d
    assert opp.apply(d, "new", at(2), 0.5, 5.0, ended) is d  # no recorded prediction
    assert opp.apply(d, "r", at(2), 0.5, 5.0, ended).stop
    back = Opportunity.from_state_dict(json.loads(json.dumps(opp.state_dict())))
    assert back.state_dict() == opp.state_dict() and back.preds["a"][5].dtype == np.float32


def test_rungs_keep_the_top_share_the_pressure_sets() -> None:
    """Rungs at 1, 4, 16 values; every decision at a rung joins its population; a trial is
    stopped unless within the top max(1/eta, 1/pressure) share (at least one); never between
    rungs, at the horizon, with pressure <= 1 or inf; losses rank by the lowest median."""
    assert [n for n in range(1, 70) if is_rung(n)] == [1, 4, 16, 64]
    assert [n for n in range(1, 30) if is_rung(n, eta=3, first=2)] == [2, 6, 18]

    def at(n: int, horizon: float = 40, direction: str = "max") -> Curve:
        return Curve(list(range(1, n + 1)), [0.3] * n, horizon,
                     direction=direction)  # type: ignore[arg-type]

    r = Rungs()
    for t, v in (("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6), ("e", 0.5), ("f", 0.4),
                 ("g", 0.3)):
        r.apply(_point(v), t, at(1), 1.0)  # pressure 1: recorded, nothing stopped
    assert len(r.scores[1]) == 7
    # 8 trials, pressure 10: the top max(1/4, 1/10) x 8 = 2 go on
    assert not r.apply(_point(0.85), "h", at(1), 10.0).stop  # 2nd of 8
    got = r.apply(_point(0.75), "i", at(1), 10.0)  # 3rd of 9: int(9 / 4) = 2
    assert got.stop and got.expected_remaining_epochs == 0
    assert "ranks 4 of the 9" in got.reason and "top 2 (25%" in got.reason
    # pressure 1.5: the top 2/3 go on
    assert not r.apply(_point(0.65), "j", at(1), 1.5).stop  # 6th of 10: int(10 x 2/3) = 6
    assert r.apply(_point(0.55), "k", at(1), 1.5).stop  # 8th of 11: int(11 x 2/3) = 7
    d = _point(0.0)
    for pressure in (1.0, 0.5, math.inf):
        assert r.apply(d, "z", at(1), pressure) is d
    assert r.apply(d, "z", at(2), 10.0) is d  # between rungs
    assert r.apply(d, "z", at(4, horizon=4), 10.0) is d  # complete
    stopped = _point(0.99, stop=True)
    assert r.apply(stopped, "y", at(4), 10.0) is stopped and r.scores[4] == {"z": 0.0,
                                                                          "y": 0.99}
    lo = Rungs(eta=2)
    lo.apply(_point(0.2), "a", at(1, direction="min"), 5.0)
    assert lo.apply(_point(0.3), "b", at(1, direction="min"), 5.0).stop  # a higher loss
    assert not lo.apply(_point(0.1), "c", at(1, direction="min"), 5.0).stop
    back = Rungs.from_state_dict(json.loads(json.dumps(r.state_dict())))
    assert back.state_dict() == r.state_dict()
    with pytest.raises(CurveError, match="eta"):
        Rungs(eta=1)
    # decisions every other value (1, 3, 5, ...): the rung of 4 is judged at 5, once
    late = Rungs()
    for t, v in (("a", 0.9), ("b", 0.8)):
        late.apply(_point(v), t, at(4), 10.0)
    assert late.apply(_point(0.7), "c", at(3), 10.0).stop is False  # rung 1, late: alone there
    got = late.apply(_point(0.7), "c", at(5), 10.0)
    assert got.stop and "at 4 values (5 observed)" in got.reason and len(late.scores[4]) == 3
    d = _point(0.1)
    assert late.apply(d, "c", at(7), 10.0) is d  # judged at this rung already
    assert late.apply(d, "a", at(4), 10.0).stop  # at the rung itself: judged again


def test_expected_gain_of_a_gaussian_and_its_mirror() -> None:
    """The trapezoid estimate on OPPORTUNITY_LEVELS against the closed form
    sigma * (phi(z) - z * (1 - Phi(z))), z = (inc - mu) / sigma; a loss mirrors an accuracy."""
    lv = torch.tensor(OPPORTUNITY_LEVELS, dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.5, dtype=torch.float64),
                                        torch.tensor(0.1, dtype=torch.float64))
    q = normal.icdf(lv).numpy()
    for inc in (0.3, 0.5, 0.6, 0.7):
        z = (inc - 0.5) / 0.1
        exact = 0.1 * (math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
                       - z * 0.5 * math.erfc(z / math.sqrt(2)))
        assert expected_gain(q, inc) == pytest.approx(exact, rel=0.08)
        assert expected_gain(1 - q[::-1], 1 - inc, "min") == pytest.approx(expected_gain(q, inc))
    rows = expected_gain(np.stack([q, q + 0.2]), 0.5)
    assert rows.shape == (2,) and rows[0] == pytest.approx(expected_gain(q, 0.5))
