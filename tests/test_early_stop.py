"""Early-stopping decisions: the rule's semantics, batching, direction symmetry, JSON form."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pfn import Curve, CurveError, Predictor
from pfn.early_stop import (
    Decision,
    StopRule,
    checked_epochs,
    curve_to_dict,
    decide,
    decision_from_dict,
    decision_to_dict,
    early_stop_json,
    rule_from_dict,
    rule_to_dict,
)


@pytest.fixture(scope="module")
def pred() -> Iterator[Predictor]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread beats two on a shared CPU
    yield Predictor.load()
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
