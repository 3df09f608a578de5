"""The shipped models: loaded offline by name, sha256 checked, and what sets them apart."""

from __future__ import annotations

import numpy as np
import pytest

from pfn import Curve, Predictor
from pfn.io import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE, read_config, sha256_file

SHIPPED = sorted(d.name for d in WEIGHTS_DIR.iterdir() if (d / CONFIG_FILE).is_file())


@pytest.fixture(scope="module")
def slow(pred: Predictor) -> Predictor:
    """The slowstart model (after ``pred``, which sets one torch thread for the module)."""
    return Predictor.load("slowstart")


def test_the_shipped_models_are_default_slowstart_and_steps4() -> None:
    assert SHIPPED == ["default", "slowstart", "steps4"]
    total = sum((WEIGHTS_DIR / n / WEIGHTS_FILE).stat().st_size for n in SHIPPED)
    assert total <= 25 * 2**20  # the budget for shipped weights


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_by_name_with_its_digest(name: str) -> None:
    loaded = Predictor.load(name)
    assert loaded.sha256 == sha256_file(WEIGHTS_DIR / name / WEIGHTS_FILE)
    meta = read_config(WEIGHTS_DIR / name)["meta"]
    assert meta["prior"] == {"default": "lcpfn", "slowstart": "lcpfn-slowstart0.2",
                             "steps4": "lcpfn"}[name]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_have_their_priors_fitted_tails(name: str) -> None:
    """Every shipped model went through `curvecast refit-tails` (pfn.bar: equal-mass borders
    alone leave tails ten times the prior's), and a curve flat at its lower bound gets a
    predictive whose spread and extreme quantiles stay near the bounds."""
    loaded = Predictor.load(name)
    rec = read_config(WEIGHTS_DIR / name)["meta"]["tails"]
    assert loaded.bar.tail_scales == pytest.approx((rec["left"], rec["right"]), rel=1e-5)
    assert max(loaded.bar.tail_scales) < 0.3 < min(rec["before"])
    post = loaded.predict([Curve([1, 2, 3, 4, 5], [0.0, 0.0, 0.0, 0.002, 0.0], horizon=50,
                                 query_epochs=[6, 50], bounds=(0, 1))])[0]
    assert (post.std < 0.3).all() and (post.quantile(0.01) > -0.35).all()  # before: 0.41, -2.2
    assert (post.mean > post.quantile(0.05)).all()


def flat_start(n: int) -> Curve:
    rng = np.random.default_rng(n)
    values = 0.1 + 0.003 * rng.standard_normal(n)
    return Curve(list(range(1, n + 1)), list(values), horizon=100, query_epochs=[100],
                 bounds=(0, 1))


@pytest.mark.parametrize("n", [4, 8, 15])
def test_slowstart_keeps_a_flat_start_open_and_default_does_not(
        n: int, pred: Predictor, slow: Predictor) -> None:
    """A run flat at 0.1 for its first n of 100 epochs: the paper's prior has no curve that
    takes off after that, so the default model all but rules out a final value above 0.5
    (P < 1%); the slow-start prior's model keeps a real chance (> 5%)."""
    curve = flat_start(n)
    p_default = float(pred.predict([curve])[0].prob_greater(0.5)[-1])
    p_slow = float(slow.predict([curve])[0].prob_greater(0.5)[-1])
    assert p_default < 0.01
    assert p_slow > 0.05


def test_both_models_agree_on_an_ordinary_rising_curve(pred: Predictor, slow: Predictor
                                                      ) -> None:
    t = np.arange(1, 11)
    curve = Curve(list(t), list(0.3 + 0.4 * (1 - np.exp(-t / 4))), horizon=100,
                  query_epochs=[100], bounds=(0, 1))
    means = [float(p.predict([curve])[0].mean[-1]) for p in (pred, slow)]
    assert abs(means[0] - means[1]) < 0.03


def test_steps4_has_trained_step_inputs_and_default_has_none(pred: Predictor) -> None:
    """steps4 is the shipped model with step inputs, and its step encoder was trained (its
    output layer starts at zero, so all-zero weights would mean an untrained copy of stage 4);
    its last stage weighted the loss per curve, on a fresh seed."""
    steps4 = Predictor.load("steps4")
    assert steps4.model.cfg.step_inputs and not pred.model.cfg.step_inputs
    assert steps4.model.step_enc is not None
    assert float(steps4.model.step_enc[-1].weight.detach().abs().max()) > 0  # trained
    train = steps4.config["meta"]["train_config"]
    assert train["cutoff_log_share"] == 0.25 and train["per_curve_loss"] is True
    assert train["seed"] == 1


@pytest.mark.parametrize("name", ["default", "steps4"])
def test_a_higher_first_value_never_lowers_the_predicted_final(name: str, pred: Predictor
                                                               ) -> None:
    """One observed epoch of 100, low values (where runs look alike at first): the prior's
    exact posterior median of the final epoch is flat, then rising (importance sampling of 4M
    prior curves, ``bench/first_epochs.py``: 0.289, 0.286, 0.287, 0.291, 0.298, 0.321 for
    0 ... 0.1), so a model's median must not fall as the first value rises; steps2 (shipped
    before steps3 and steps4) fell from 0.330 to 0.311, which reversed the early-stopping replay's
    first-rung rankings."""
    model = pred if name == "default" else Predictor.load(name)
    values = [0.0, 0.01, 0.02, 0.04, 0.06, 0.1]
    curves = [Curve([1], [v], horizon=100, query_epochs=[100], bounds=(0, 1)) for v in values]
    med = np.array([float(p.median[-1]) for p in model.predict(curves)])
    assert np.all(np.diff(med) >= -1e-3), med
    assert med[-1] > med[0]
