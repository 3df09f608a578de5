"""The shipped models: loaded offline by name, sha256 checked, and what sets them apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pfn import Curve, Predictor
from pfn.io import CONFIG_FILE, DECISION_MODEL, WEIGHTS_DIR, WEIGHTS_FILE, read_config, sha256_file

SHIPPED = sorted(d.name for d in WEIGHTS_DIR.iterdir() if (d / CONFIG_FILE).is_file())


@pytest.fixture(scope="module")
def slow(pred: Predictor) -> Predictor:
    """The slowstart model (after ``pred``, which sets one torch thread for the module)."""
    return Predictor.load("slowstart")


@pytest.fixture(scope="module")
def stage4(pred: Predictor) -> Predictor:
    """The model for decisions (pfn.io.DECISION_MODEL), slowstart's parent."""
    return Predictor.load(DECISION_MODEL)


def test_the_shipped_models_are_default_slowstart_and_stage4() -> None:
    assert SHIPPED == ["default", "slowstart", "stage4"] and DECISION_MODEL == "stage4"
    total = sum((WEIGHTS_DIR / n / WEIGHTS_FILE).stat().st_size for n in SHIPPED)
    assert total <= 25 * 2**20  # the budget for shipped weights


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_by_name_with_its_digest(name: str) -> None:
    loaded = Predictor.load(name)
    assert loaded.sha256 == sha256_file(WEIGHTS_DIR / name / WEIGHTS_FILE)
    meta = read_config(WEIGHTS_DIR / name)["meta"]
    assert meta["prior"] == {"default": "lcpfn", "slowstart": "lcpfn-slowstart0.2",
                             "stage4": "lcpfn"}[name]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_have_their_priors_fitted_tails(name: str) -> None:
    """Every shipped model went through `curvecast refit-tails` (pfn.bar: equal-mass borders
    alone leave tails ten times the prior's; the default inherited refitted borders from the
    model it grew from, so its refit found them already fitted), and a curve flat at its lower
    bound gets a predictive whose spread and extreme quantiles stay near the bounds."""
    loaded = Predictor.load(name)
    rec = read_config(WEIGHTS_DIR / name)["meta"]["tails"]
    assert loaded.bar.tail_scales == pytest.approx((rec["left"], rec["right"]), rel=1e-5)
    assert max(loaded.bar.tail_scales) < 0.3
    assert min(rec["before"]) > 0.3 or rec["before"] == pytest.approx(loaded.bar.tail_scales)
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
def test_slowstart_keeps_a_flat_start_open_and_its_parent_does_not(
        n: int, stage4: Predictor, slow: Predictor) -> None:
    """A run flat at 0.1 for its first n of 100 epochs: the paper's prior has no curve that
    takes off after that, so stage 4 (trained on it) all but rules out a final value above 0.5
    (P < 1%); its fine-tune on the slow-start prior keeps a real chance (> 5%)."""
    curve = flat_start(n)
    p_default = float(stage4.predict([curve])[0].prob_greater(0.5)[-1])
    p_slow = float(slow.predict([curve])[0].prob_greater(0.5)[-1])
    assert p_default < 0.01
    assert p_slow > 0.05


def test_slowstart_and_its_parent_agree_on_an_ordinary_rising_curve(
        stage4: Predictor, slow: Predictor) -> None:
    t = np.arange(1, 11)
    curve = Curve(list(t), list(0.3 + 0.4 * (1 - np.exp(-t / 4))), horizon=100,
                  query_epochs=[100], bounds=(0, 1))
    means = [float(p.predict([curve])[0].mean[-1]) for p in (stage4, slow)]
    assert abs(means[0] - means[1]) < 0.03


def test_default_has_four_blocks_and_trained_step_inputs_and_stage4_has_neither(
        pred: Predictor, stage4: Predictor) -> None:
    """The default model is grow4 (steps4's lineage grown to four blocks: step inputs whose
    encoder was trained, its output layer starting at zero, so all-zero weights would mean an
    untrained copy; the loss weighted per curve) with a Gaussian head trained on grow4's
    frozen body, and since the twentieth session a decay branch trained on that frozen model:
    every other tensor equals grow4's (runs/grow4/model) exactly. Stage 4, the model for
    decisions, has three blocks and no step inputs."""
    cfg = pred.model.cfg
    assert cfg.step_inputs and cfg.n_layers == 4 and pred.model.step_enc is not None
    assert float(pred.model.step_enc[-1].weight.detach().abs().max()) > 0  # trained
    assert not stage4.model.cfg.step_inputs and stage4.model.cfg.n_layers == 3
    assert cfg.gauss_head and pred.model.gauss is not None
    assert float(pred.model.gauss[-1].weight.detach().abs().max()) > 0  # trained
    assert cfg.decay_input and pred.model.decay_adapters is not None
    assert all(float(a[-1].weight.detach().abs().max()) > 0 for a in pred.model.decay_adapters)
    grow4 = Predictor.load(Path(__file__).parents[1] / "runs" / "grow4" / "model")
    assert grow4.sha256.startswith("9dbd00b18481")
    mine = pred.model.state_dict()
    body = grow4.model.state_dict()
    assert set(mine) - set(body) == {n for n in mine if n.startswith(("gauss.", "decay_"))}
    assert all(torch.equal(mine[n], t) for n, t in body.items())
    train = pred.config["meta"]["train_config"]
    assert train["trainable"] == "decay_emb,decay_adapters" and train["prior"] == "lcpfn-anneal1"
    assert pred.config["meta"]["decay_prior"] == "lcpfn-anneal1"
    g4 = grow4.config["meta"]["train_config"]
    assert g4["cutoff_log_share"] == 0.25 and g4["per_curve_loss"] is True
    assert g4["init_from"] == "runs/percurve3/model" and g4["seed"] == 4


def test_the_default_answers_with_the_decay_flag_only_when_told(pred: Predictor) -> None:
    """Curve.lr_decay: at False the default answers as its body (the branch is gated off, so
    the paper protocol's figures stand); told that the learning rate decays, it expects the
    late gains of the decay prior: a higher final median and more room above."""
    t = np.arange(1, 11, dtype=float)
    base = dict(epochs=t.tolist(), values=(0.3 + 0.3 * (1 - np.exp(-t / 5))).tolist(),
                horizon=100, query_epochs=[100], bounds=(0, 1))
    flat, decay = pred.predict([Curve(**base), Curve(**base, lr_decay=True)])  # type: ignore[arg-type]
    assert float(decay.median[0]) > float(flat.median[0]) + 0.01
    assert float(decay.quantile(0.95)[0]) > float(flat.quantile(0.95)[0])


@pytest.mark.parametrize("name", ["default", "stage4"])
def test_a_higher_first_value_never_lowers_the_predicted_final(name: str, pred: Predictor
                                                               ) -> None:
    """One observed epoch of 100, low values (where runs look alike at first): the prior's
    exact posterior median of the final epoch is flat, then rising (importance sampling of 4M
    prior curves, ``bench/first_epochs.py``: 0.289, 0.286, 0.287, 0.291, 0.298, 0.321 for
    0 ... 0.1), so a model's median must not fall as the first value rises; steps2 (shipped
    before steps3) fell from 0.330 to 0.311, which reversed the early-stopping replay's
    first-rung rankings."""
    model = pred if name == "default" else Predictor.load(name)
    values = [0.0, 0.01, 0.02, 0.04, 0.06, 0.1]
    curves = [Curve([1], [v], horizon=100, query_epochs=[100], bounds=(0, 1)) for v in values]
    med = np.array([float(p.median[-1]) for p in model.predict(curves)])
    assert np.all(np.diff(med) >= -1e-3), med
    assert med[-1] > med[0]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_saturated_curve_is_not_predicted_to_collapse(name: str, pred: Predictor) -> None:
    """40 of 50 epochs of smooth, saturating runs ending near 0.81 (a NAS-Bench-NLP shape):
    the final epoch's median stays at the level reached. grow4b (the default trained on for
    1.15M more curves, sixteenth session; not shipped) put the median at 0.07 for the
    logarithmic one, and the mean at 0.11 for a real run of this shape."""
    model = pred if name == "default" else Predictor.load(name)
    t = np.arange(1, 41, dtype=float)
    shapes = [0.83 - 0.175 * t ** -0.55, 0.81 - 0.16 * np.exp(-t / 6),
              np.minimum(0.656 + 0.042 * np.log(t), 0.81)]
    curves = [Curve(t.tolist(), y.tolist(), horizon=50, bounds=(0, 1)) for y in shapes]
    for y, p in zip(shapes, model.predict(curves), strict=True):
        assert abs(float(p.median[-1]) - y[-1]) < 0.02, (name, y[-1], p.median[-1])
        assert float(p.quantile([0.05])[-1][0]) > y[-1] - 0.03
