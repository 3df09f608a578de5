"""The replay benchmark (bench/early_stopping.py): protocol invariants, the threshold shortcut
against decide(), and its JSON on a small file in real_curves.npz's format."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pfn import Curve, Predictor
from pfn.early_stop import (
    MAX_CHECKED_EPOCHS,
    Budget,
    Decision,
    Opportunity,
    StopRule,
    budget_pressure,
    decide,
    final_score,
)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "early_stopping.py"


@pytest.fixture(scope="module")
def es():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_early_stopping", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def synthetic(n: int = 30, T: int = 10, seed: int = 0, minimise: bool = False,
              ragged: bool = True) -> dict[str, np.ndarray]:
    """Arrays in real_curves.npz's format: saturating curves, some crashing early."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, T + 1, dtype=np.float64)
    top = rng.uniform(0.1, 0.9, n)
    y = top[:, None] * (1 - np.exp(-t[None] / rng.uniform(1, 4, n)[:, None]))
    y = np.clip(y + 0.01 * rng.standard_normal((n, T)), 0, 1)
    lengths = np.where(rng.random(n) < 0.2, rng.integers(1, T, n), T) if ragged \
        else np.full(n, T)
    y[np.arange(T)[None] >= lengths[:, None]] = np.nan
    raw = 2.3 * (1 - y) if minimise else y
    return {"y": y.astype(np.float32), "y_raw": raw.astype(np.float32),
            "x": np.tile(t, (n, 1)).astype(np.float32), "lengths": lengths.astype(np.int32),
            "source": np.array(["syn"] * n), "task": np.array([f"task{seed}"] * n),
            "metric": np.array(["loss" if minimise else "acc"] * n),
            "metric_direction": np.array(["min" if minimise else "max"] * n),
            "x_unit": np.array(["epoch"] * n), "config": np.array(["{}"] * n),
            "budget": np.full(n, T, np.int32), "complete": lengths == T,
            "truncated_nonfinite": np.zeros(n, bool),
            "norm_zero": np.full(n, 2.3 if minimise else 0.0, np.float32),
            "norm_one": np.full(n, 0.0 if minimise else 1.0, np.float32)}


def write(path: Path, *parts: dict[str, np.ndarray]) -> Path:
    np.savez(path, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return path


def test_replay_protocol_invariants(es, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    task = es.load_tasks(write(tmp_path / "c.npz", synthetic(n=40)))[0]
    orders = np.stack([np.random.default_rng(i).permutation(task.n) for i in range(4)])

    class StopAfter2(es.Policy):
        name = "stop-after-2"

        def decide(self, rs, task):  # type: ignore[no-untyped-def]
            return [r.k >= 2 for r in rs]

    res = {"none": es.run_policy(task, orders, es.Policy()),
           "stop-after-2": es.run_policy(task, orders, StopAfter2()),
           "patience-0": es.run_policy(task, orders, es.Patience(0))}
    for name, reps in res.items():
        for r, o in zip(reps, orders, strict=True):
            trials = [i for i, _ in r.runs]
            assert trials == list(o[: len(trials)])  # in order, none resumed or repeated
            assert sum(k for _, k in r.runs) == r.spent == len(r.revealed) <= task.budget
            assert all(1 <= k <= task.lengths[i] for i, k in r.runs)
            if name == "stop-after-2":
                assert all(k == min(2, task.lengths[i]) for i, k in r.runs)
            if len(trials) < task.n:
                assert r.spent == task.budget  # only the budget ends a replay early
    assert all(r.spent == task.budget for r in res["none"])
    # stopping early lets a policy try more trials within the same budget
    assert np.mean([len(r.runs) for r in res["stop-after-2"]]) > \
        np.mean([len(r.runs) for r in res["none"]])
    reg = es.regret_curves(task, res["none"])
    assert reg.shape == (4, task.budget) and (np.diff(reg, axis=1) <= 1e-12).all()
    assert (reg >= 0).all()
    rows = {r["policy"]: r for r in es.summarize(task, res)}
    assert rows["none"]["speedup"] == 1.0
    target = rows["none"]["regret"]
    e_none = rows["none"]["epochs_to_target"]
    for name, r in rows.items():
        mean = es.regret_curves(task, res[name]).mean(0)
        e = r["epochs_to_target"]
        if e is None:
            assert (mean > target).all() and r["speedup"] is None
        else:  # the first epoch at which the policy's mean regret matches none's final one
            assert mean[e - 1] <= target + 1e-12 and (e == 1 or mean[e - 2] > target)
            assert r["speedup"] == pytest.approx(e_none / e)


def cached_task(es, pred: Predictor, tmp_path: Path, minimise: bool, seed: int,  # type: ignore[no-untyped-def]
                deltas: tuple[float, ...]) -> tuple:
    """A 6-trial synthetic task, its ThresholdCache filled at 2, 5 and 9 points, the pairs,
    and for each pair the Curve the model saw."""
    f = write(tmp_path / "c.npz", synthetic(n=6, T=12, seed=seed, minimise=minimise,
                                            ragged=False))
    task = es.load_tasks(f, values="raw", min_trials=1)[0]
    cache = es.ThresholdCache(pred, task, deltas, max_checked=MAX_CHECKED_EPOCHS)
    pairs = [(i, k) for i in range(task.n) for k in (2, 5, 9)]
    cache.compute(pairs)
    curves = [Curve(task.x[i, :k], task.model_values[i, :k], float(task.horizon[i]),
                    direction=task.direction, bounds=task.bounds) for i, k in pairs]
    return task, cache, pairs, curves


@pytest.mark.parametrize("minimise", [False, True])
def test_threshold_shortcut_equals_decide(es, pred: Predictor, tmp_path: Path,
                                          minimise: bool) -> None:  # type: ignore[no-untyped-def]
    """The cached incumbent thresholds give exactly decide()'s all-epochs verdicts."""
    deltas = (0.05, 0.3)
    task, cache, pairs, curves = cached_task(es, pred, tmp_path, minimise, 3, deltas)
    sign = -1.0 if minimise else 1.0
    for (i, k), c in zip(pairs, curves, strict=True):
        thr = cache.get(i, k)
        for j, delta in enumerate(deltas):
            # incumbents just below and above the threshold, in the metric's units
            incs = [sign * (thr[j] - 0.02), sign * (thr[j] + 0.02)]
            ds = decide(pred, [c, c], incs, StopRule(delta=delta))
            assert [d.stop for d in ds] == [False, True], (i, k, delta, thr[j])


def test_json_rows_on_a_curve_file(es, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    f = write(tmp_path / "c.npz", synthetic(n=25, T=6, seed=1),
              synthetic(n=22, T=6, seed=2, minimise=True))
    out = tmp_path / "o.json"
    es.main(["--curves", str(f), "--json", "--orderings", "2", "--deltas", "0.05,0.2",
             "--out", str(out)])
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    policies = ["none", "curvecast-d0.05", "curvecast-d0.2"] + \
        [f"curvecast-cal{v}-d{d}" for v in ("0", "2", "0x") for d in ("0.05", "0.2")] + \
        [f"patience-{k}" for k in es.PATIENCES] + ["optuna-median", "optuna-sha",
                                                   "optuna-hyperband"]
    got = [(r["task"], r["policy"]) for r in doc["rows"]]
    assert got == [(t, p) for t in ("task1", "task2") for p in policies]
    for r in doc["rows"]:
        assert {"task", "policy", "n_trials", "speedup", "regret", "epochs_used"} <= set(r)
        assert r["n_trials"] == (25 if r["task"] == "task1" else 22)
        assert 0 <= r["regret"] <= 1 and 0 < r["epochs_used"] <= r["budget"]
    inf = doc["inference"]
    assert inf["decisions"] >= inf["model_evaluations"] > 0
    assert inf["ms_single_decision_batch1"] > 0


@pytest.mark.parametrize("minimise", [False, True])
def test_calibrated_policy_pieces_match_the_api(es, pred: Predictor, tmp_path: Path,
                                                minimise: bool) -> None:  # type: ignore[no-untyped-def]
    """The replay's cached scores and final-value probabilities are the API's, and the
    calibrated policy keeps the raw rule's verdicts while its calibrator is empty."""
    task, cache, pairs, curves = cached_task(es, pred, tmp_path, minimise, 4, (0.05,))
    sign = -1.0 if minimise else 1.0
    for (i, k), c in zip(pairs, curves, strict=True):
        final = float(task.model_values[i, -1])
        d = decide(pred, [c], [final])[0]
        fq = d.final_quantiles
        z = final_score(final, fq[0.5], fq[0.05], fq[0.95], task.direction)
        assert cache.score[(i, k)] == pytest.approx(float(z), rel=1e-3, abs=1e-3)
        # P(final improves) at an incumbent near the predicted median: interpolated, close
        inc = fq[0.5]
        p, zi = cache.final_prob_and_score(i, k, sign * inc)
        assert p == pytest.approx(decide(pred, [c], [inc])[0].prob_improve_final, abs=0.02)
        assert zi == pytest.approx(0.0, abs=1e-3)
    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(3)])
    raw = es.run_policy(task, orders, es.CurvecastPolicy(cache, 0))
    cal = es.run_policy(task, orders, es.CalibratedPolicy(cache, 0, startup=0,
                                                          prior_weight=1e9))
    assert [r.runs for r in raw] == [r.runs for r in cal]  # a huge prior weight: the model's


@pytest.mark.parametrize("minimise", [False, True])
def test_opportunity_policy_pieces(es, pred: Predictor, tmp_path: Path,
                                   minimise: bool) -> None:  # type: ignore[no-untyped-def]
    """ei_rows is the cache's expected improvement (and the API's), a point mass gives
    max(0, f - inc), and the opportunity rule only adds stops to the paper's rule: with c = 0
    it is the paper's rule, with a large c it stops at least as early."""
    task, cache, pairs, curves = cached_task(es, pred, tmp_path, minimise, 5, (0.05,))
    sign = -1.0 if minimise else 1.0
    for (i, k), c in zip(pairs, curves, strict=True):
        gq, med, _ = cache.final[(i, k)]
        for inc in (gq[0] - 0.1, med, gq[-1] + 0.1):
            ei = float(es.ei_rows(gq[None, :], inc)[0])
            assert ei == pytest.approx(cache.expected_improvement(i, k, inc), abs=2e-3)
        # against the API's (evenly spaced draws, which ignore the far tails the grid sees)
        api = decide(pred, [c], [sign * med])[0].expected_improvement
        assert api > 0
        assert float(es.ei_rows(gq[None, :], med)[0]) == pytest.approx(api, rel=0.15, abs=5e-3)
    point = np.full((2, len(es.TAIL_GRID)), 0.7)
    assert es.ei_rows(point, 0.5).tolist() == pytest.approx([0.2, 0.2])
    assert es.ei_rows(point, 0.9).tolist() == [0.0, 0.0]
    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(3)])
    paper = es.run_policy(task, orders, es.CurvecastPolicy(cache, 0))
    zero = es.run_policy(task, orders, es.OpportunityPolicy(cache, 0.0, 0, min_pop=1))
    assert [r.runs for r in paper] == [r.runs for r in zero]
    eager = es.run_policy(task, orders, es.OpportunityPolicy(cache, 1e6, 0, min_pop=1))
    for p, e in zip(paper, eager, strict=True):
        seen = dict(p.runs)
        assert all(k <= seen[i] for i, k in e.runs if i in seen)
    assert sum(r.spent for r in eager) < sum(r.spent for r in paper)


def test_budget_policy_is_the_paper_rule_gated_by_pressure(es, pred: Predictor,
                                                           tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """60 trials, a budget of 20 runs: the gate-only policy stops exactly when the paper's rule
    would and the API's budget pressure of the replay is >= 1; both sides of 1 occur."""
    f = write(tmp_path / "b.npz", synthetic(n=60, T=12, seed=4, ragged=False))
    task = es.load_tasks(f, min_trials=1)[0]
    cache = es.ThresholdCache(pred, task, (0.05,), max_checked=4)
    paper = es.CurvecastPolicy(cache, 0)
    seen: list[float] = []

    class Spy(es.BudgetPolicy):  # type: ignore[name-defined,misc]
        def decide(self, rs, task):  # type: ignore[no-untyped-def]
            got = super().decide(rs, task)
            for r, g, p in zip(rs, got, paper.decide(rs, task), strict=True):
                pr = es.replay_pressure(r)
                assert g == (p and pr >= 1.0)
                assert pr == pytest.approx(budget_pressure(
                    Budget(task.n, task.budget), r.pos + 1, r.spent, [k for _, k in r.runs]))
                seen.append(pr)
            return got

    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(2)])
    reps = es.run_policy(task, orders, Spy(cache, 0, opportunity=False))
    assert min(seen) < 1.0 <= max(seen)
    assert all(r.spent == r.budget for r in reps)  # the gate spends the budget
    assert Spy(cache, 0).name == "curvecast-d0.05-bud"

    # the opportunity half is the API's Opportunity.apply on the same predictions
    checked: list[bool] = []

    class Twin(es.BudgetPolicy):  # type: ignore[name-defined,misc]
        def opportunity_stop(self, i, k, r, task, pressure):  # type: ignore[no-untyped-def]
            got = super().opportunity_stop(i, k, r, task, pressure)
            opp = Opportunity()
            for n, rows in enumerate(r.ctx["pop"]):
                opp.preds[str(n)] = {self.min_epochs + m: rows[m].tolist()
                                     for m in range(len(rows))}
            own = es.opportunity_draws(self.cache.final[(i, k)][0])[0]
            opp.preds["run"] = {k: own.tolist()}
            curve = Curve(task.x[i, :k], task.s[i, :k], float(task.horizon[i]))
            d = Decision(stop=False, prob_improve=1.0, prob_improve_final=1.0, final_mean=0.0,
                         final_quantiles={}, expected_remaining_epochs=1.0, reason="")
            api = opp.apply(d, "run", curve, r.best_s, pressure,
                            [str(n) for n in range(len(r.ctx["pop"]))]).stop
            assert got == api
            checked.append(got)
            return got

    strict = es.ThresholdCache(pred, task, (1e-4,), max_checked=4)  # the rule stops less
    es.run_policy(task, orders, Twin(strict, 0))
    assert True in checked and False in checked


def test_calibrated_budget_policy_protects_the_first_trials(es, pred: Predictor,
                                                            tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The integrations' default with a budget: the first two trials of every ordering run to
    their end; later trials are stopped (by the calibrated rule or the opportunity rule)."""
    f = write(tmp_path / "b.npz", synthetic(n=60, T=12, seed=4, ragged=False))
    task = es.load_tasks(f, min_trials=1)[0]
    cache = es.ThresholdCache(pred, task, (0.05,), max_checked=4)
    pol = es.CalibratedBudgetPolicy(cache, 0)
    assert pol.name == "curvecast-cal2-d0.05-bud"
    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(2)])
    reps = es.run_policy(task, orders, pol)
    for r in reps:
        assert [k for _, k in r.runs[:2]] == [12, 12]
        assert any(k < 12 for _, k in r.runs[2:])  # something was stopped later


@pytest.mark.parametrize("score", ["median", "value", "peak"])
def test_rung_policy_stops_only_at_rungs_and_never_the_leader(es, pred: Predictor,
                                                               tmp_path: Path,
                                                               score: str) -> None:  # type: ignore[no-untyped-def]
    """The integrations' default with a budget (pfn.early_stop.Rungs per ordering): stops
    happen at 1 or 4 points only, never to the trial leading its rung, and the pressure's
    cut lets the ordering spend its whole budget."""
    f = write(tmp_path / "r.npz", synthetic(n=60, T=12, seed=5, ragged=False))
    task = es.load_tasks(f, min_trials=1)[0]
    cache = es.ThresholdCache(pred, task, (0.05,), max_checked=4)
    pol = es.RungPolicy(cache, None, score=score)
    assert pol.name == f"curvecast-rung{score}4f1"
    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(2)])
    reps = es.run_policy(task, orders, pol)
    for r in reps:
        stopped = [(i, k) for i, k in r.runs[:-1] if k < task.lengths[i]]  # last: budget
        assert stopped and {k for _, k in stopped} <= {1, 4}
        assert r.spent == r.budget
        sc = r.ctx["rungs"].scores
        for i, k in stopped:
            assert sc[k][str(i)] < max(sc[k].values())
        if score == "value":  # successive halving's ranking: the best value so far
            for k, pop in sc.items():
                for i, v in pop.items():
                    assert v == pytest.approx(float(np.max(task.s[int(i), :k])))
        if score == "peak":  # the best per-epoch median; the horizon is one of the epochs
            for k, pop in sc.items():
                for i, v in list(pop.items())[:3]:
                    post, _ = pred.posterior_all([cache.curve(int(i), k)])
                    assert v == pytest.approx(float(post.quantile([0.5]).max()), abs=1e-5)
                    assert v >= cache.final[(int(i), k)][1] - 1e-6


def test_oracle_rung_policy_needs_no_model_and_keeps_the_best_trial(es, tmp_path: Path,
                                                                     ) -> None:  # type: ignore[no-untyped-def]
    """The diagnostic bound (family "oracle"): the rung rule ranking by the best value a trial
    will ever reveal. It asks no model, scores every trial by that value, and never stops the
    best trial of the task, so an ordering that reaches it within the budget ends at 0 regret."""
    f = write(tmp_path / "o.npz", synthetic(n=60, T=12, seed=7, ragged=False))
    task = es.load_tasks(f, min_trials=1)[0]
    with pytest.raises(ValueError, match="ThresholdCache"):
        es.RungPolicy(None, None, score="median")
    pol = es.RungPolicy(None, None, score="oracle")
    assert pol.name == "oracle-rung4"
    orders = np.stack([np.random.default_rng(s).permutation(task.n) for s in range(3)])
    reps = es.run_policy(task, orders, pol)
    best = int(np.argmax(np.nanmax(task.s, 1)))
    for r in reps:
        for pop in r.ctx["rungs"].scores.values():
            for i, v in pop.items():
                assert v == pytest.approx(float(np.nanmax(task.s[int(i)])))
        ran = dict(r.runs)
        if best in ran:
            assert ran[best] == task.lengths[best] or r.runs[-1][0] == best  # budget's end
    reached = [r for r in reps if best in dict(r.runs[:-1])]
    assert reached, "no ordering reached the best trial before its budget ran out"
    rows = es.summarize(task, {"none": es.run_policy(task, orders, es.Policy()),
                               pol.name: reps}, None)
    got = {row["policy"]: row for row in rows}
    assert got[pol.name]["regret"] <= got["none"]["regret"]


def test_blend_weight_is_the_model_until_enough_trials_then_least_squares(es) -> None:  # type: ignore[no-untyped-def]
    """The "rungsb" ablation's weight: 1 (the model's score) with fewer than BLEND_MIN
    completed trials; then the least-squares slope of final - o on p - o, clipped to [0, 1]."""
    rng = np.random.default_rng(3)
    p, o = rng.uniform(0.2, 0.9, 40), rng.uniform(0.1, 0.8, 40)
    few = [(a, b, b + 0.3 * (a - b)) for a, b in zip(p, o, strict=True)][: es.BLEND_MIN - 1]
    assert es.blend_weight(few) == 1.0
    for w in (0.0, 0.3, 0.8):
        done = [(a, b, b + w * (a - b) + 0.05) for a, b in zip(p, o, strict=True)]
        assert es.blend_weight(done) == pytest.approx(w, abs=1e-9)
    against = [(a, b, b - 2.0 * (a - b)) for a, b in zip(p, o, strict=True)]
    assert es.blend_weight(against) == 0.0  # the prediction points the wrong way: values only
    beyond = [(a, b, b + 3.0 * (a - b)) for a, b in zip(p, o, strict=True)]
    assert es.blend_weight(beyond) == 1.0
