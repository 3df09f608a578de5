import numpy as np
import pytest
import torch

from pfn import Curve, CurveError, Predictor
from pfn.model import PFN, PFNConfig, anchor_offsets, context_steps, pfn_attention_mask


def test_mask_rule():
    is_ctx = torch.tensor([[True, True, False, False]])
    m = pfn_attention_mask(is_ctx)[0, 0]
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


def _ctx(k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(1, k, generator=g)).values
    return t, torch.rand(1, k, generator=g), torch.ones(1, k, dtype=torch.bool)


def test_query_answer_independent_of_other_queries(tiny_model):
    t, y, m = _ctx()
    q_all = torch.tensor([[0.3, 0.55, 0.8, 1.0]])
    full = tiny_model.predict(t, y, m, q_all)
    for j in range(4):
        alone = tiny_model.predict(t, y, m, q_all[:, j : j + 1])
        assert torch.allclose(full[:, j], alone[:, 0], atol=1e-5)
    perm = tiny_model.predict(t, y, m, q_all[:, [3, 1, 0, 2]])
    assert torch.allclose(perm, full[:, [3, 1, 0, 2]], atol=1e-5)


def test_padding_does_not_change_answers(tiny_model):
    t, y, m = _ctx(5)
    q = torch.tensor([[0.9]])
    ref = tiny_model.predict(t, y, m, q)
    pad_t = torch.cat([t, torch.rand(1, 3)], 1)
    pad_y = torch.cat([y, torch.rand(1, 3)], 1)
    pad_m = torch.cat([m, torch.zeros(1, 3, dtype=torch.bool)], 1)
    assert torch.allclose(tiny_model.predict(pad_t, pad_y, pad_m, q), ref, atol=1e-5)


def test_training_layout_equals_inference_layout(tiny_model):
    """Per-curve cutoffs in one sequence (training) give the inference layout's answers."""
    y = torch.rand(2, 10)
    t = (torch.arange(1, 11) / 10.0).expand(2, 10)
    cut = torch.tensor([3, 6])
    is_ctx = torch.arange(10)[None] < cut[:, None]
    logits = tiny_model(t, y, is_ctx)
    for b in range(2):
        c = int(cut[b])
        inf = tiny_model.predict(t[b : b + 1, :c], y[b : b + 1, :c],
                                 torch.ones(1, c, dtype=torch.bool), t[b : b + 1, c:])
        assert torch.allclose(logits[b, c:], inf[0], atol=1e-5)


@pytest.mark.parametrize(("b", "k", "q"), [(1, 1, 1), (3, 7, 5), (2, 31, 3)])
def test_rows_only_last_block_equals_full_computation(tiny_model, b, k, q):
    """predict() runs the last block on the query rows only; that must equal computing every
    row and slicing (padded contexts included)."""
    g = torch.Generator().manual_seed(k)
    t, y = torch.rand(b, k, generator=g), torch.rand(b, k, generator=g)
    tq = torch.rand(b, q, generator=g)
    m = torch.rand(b, k, generator=g) > 0.3
    m[:, 0] = True
    is_ctx = torch.cat([m, torch.zeros(b, q, dtype=torch.bool)], 1)
    full = tiny_model.bucket_logits(tiny_model.hidden(torch.cat([t, tq], 1),
                                                      torch.cat([y, torch.zeros(b, q)], 1), is_ctx))
    torch.testing.assert_close(tiny_model.predict(t, y, m, tq), full[:, k:],
                               atol=1e-5, rtol=1e-5)


def test_context_steps_follow_epochs_not_token_order():
    """Each context token's step is from the context point just before it in t, wherever the
    tokens sit; the first context point, queries and padding get none."""
    t = torch.tensor([[0.3, 0.1, 0.2, 0.5, 0.4, 0.05]])
    y = torch.tensor([[3.0, 1.0, 2.0, 9.0, 4.5, 7.0]])
    is_ctx = torch.tensor([[True, True, True, False, True, False]])
    dy, dt, has = context_steps(t, y, is_ctx)
    assert has.tolist() == [[True, False, True, False, True, False]]
    assert torch.allclose(dy, torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.5, 0.0]]))
    assert torch.allclose(dt, torch.tensor([[0.1, 0.0, 0.1, 0.0, 0.1, 0.0]]))


def test_anchor_offsets_are_from_the_last_context_point_in_epochs():
    """The anchor is the context point with the largest t, wherever it sits among the tokens;
    queries and padding get dy = 0 and their signed distance in t."""
    t = torch.tensor([[0.3, 0.1, 0.2, 0.5, 0.4, 0.05], [0.2, 0.9, 0.1, 0.0, 0.0, 0.0]])
    y = torch.tensor([[3.0, 1.0, 2.0, 9.0, 4.5, 7.0], [2.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    is_ctx = torch.tensor([[True, True, True, False, True, False],
                           [True, False, True, False, False, False]])
    dy, dt = anchor_offsets(t, y, is_ctx)
    assert torch.allclose(dy, torch.tensor([[-1.5, -3.5, -2.5, 0.0, 0.0, 0.0],
                                            [0.0, 0.0, -1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(dt, torch.tensor([[-0.1, -0.3, -0.2, 0.1, 0.0, -0.35],
                                            [0.0, 0.7, -0.1, -0.2, -0.2, -0.2]]))


def test_answers_do_not_depend_on_context_order(tiny_model):
    """No positional encoding, and the step inputs find the previous point by epoch: shuffling
    the context tokens changes nothing."""
    g = torch.Generator().manual_seed(4)
    t = torch.sort(torch.rand(2, 9, generator=g), 1).values
    y = torch.rand(2, 9, generator=g)
    m = torch.ones(2, 9, dtype=torch.bool)
    q = torch.tensor([[0.7, 1.0], [0.95, 0.5]])
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    ref = tiny_model.predict(t, y, m, q)
    assert torch.allclose(tiny_model.predict(t[:, perm], y[:, perm], m, q), ref, atol=1e-5)


@pytest.mark.parametrize("flag,enc", [("step_inputs", "step_enc"),
                                      ("anchor_inputs", "anchor_enc")])
def test_input_encoders_start_silent_and_then_matter(flag, enc):
    """The step and anchor encoders' output layers start at zero (a warm-started model answers
    as its source); once trained, they change the answer."""
    torch.manual_seed(1)
    base = PFNConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, n_buckets=20, encoder_hidden=8)
    plain = PFN(base, torch.linspace(0, 1, 21)).eval()
    grown = PFN(PFNConfig(**{**base.to_dict(), flag: True}), plain.bar.borders).eval()
    missing, _ = grown.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith(enc + ".") for k in missing)
    t, y, m = _ctx(8)
    q = torch.tensor([[1.0]])
    assert torch.equal(grown.predict(t, y, m, q), plain.predict(t, y, m, q))
    torch.nn.init.normal_(getattr(grown, enc)[-1].weight, std=0.3)
    assert not torch.allclose(grown.predict(t, y, m, q), plain.predict(t, y, m, q), atol=1e-4)


def _decay_model(emb_std: float) -> PFN:
    torch.manual_seed(2)
    cfg = PFNConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, n_buckets=20, encoder_hidden=8,
                    decay_input=True)
    model = PFN(cfg, torch.linspace(0, 1, 21)).eval()
    if emb_std:
        assert model.decay_emb is not None and model.decay_adapters is not None
        torch.nn.init.normal_(model.decay_emb, std=emb_std)
        for a in model.decay_adapters:
            torch.nn.init.normal_(a[-1].weight, std=emb_std)
    return model


def test_decay_input_starts_silent_then_separates_the_flags():
    """The decay branch starts silent (a warm-started model answers as its source, for either
    flag); once trained, flag 1 changes the answer, flag 0 is the same as no flag and as the
    body without the branch (same weights), and each curve of a batch gets its own flag."""
    t, y, m = _ctx(8)
    t, y, m = t.expand(2, -1), y.expand(2, -1), m.expand(2, -1)
    q = torch.tensor([[1.0], [1.0]])
    silent = _decay_model(0.0)
    assert torch.equal(silent.predict(t, y, m, q, torch.tensor([0.0, 1.0])),
                       silent.predict(t, y, m, q))
    model = _decay_model(0.05)
    body = PFN(PFNConfig(**{**model.cfg.to_dict(), "decay_input": False}), model.bar.borders)
    missing, _ = body.eval().load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert torch.equal(model.predict(t, y, m, q, torch.zeros(2)), body.predict(t, y, m, q))
    out = model.predict(t, y, m, q, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], model.predict(t[:1], y[:1], m[:1], q[:1])[0], atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    one = model.predict(t[:1], y[:1], m[:1], q[:1], torch.ones(1))[0]
    assert torch.allclose(out[1], one, atol=1e-6)


def test_lr_decay_reaches_the_model_or_is_refused(predictor):
    """Curve.lr_decay: a model with a decay input answers differently with it; one without
    refuses it with a CurveError naming the field, rather than silently ignoring it."""
    c = dict(epochs=[1, 2, 3, 4], values=[0.2, 0.35, 0.42, 0.47], horizon=20, bounds=(0, 1))
    pred = Predictor(_decay_model(0.05))
    a, b = pred.predict([Curve(**c), Curve(**c, lr_decay=True)])
    assert abs(float(a.mean[0]) - float(b.mean[0])) > 1e-4
    assert np.allclose(a.mean, pred.predict([Curve(**c)])[0].mean, atol=1e-6)
    with pytest.raises(CurveError, match=r"curves\[1\]\.lr_decay.*no decay input"):
        predictor.predict([Curve(**c), Curve(**c, lr_decay=True)])
    with pytest.raises(CurveError, match="lr_decay"):
        pred.predict([Curve(**c, lr_decay="yes")])  # type: ignore[arg-type]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        PFNConfig(d_model=30, n_heads=4)


def test_sharpen_head_starts_as_the_plain_head():
    """reset_sharpen makes the mixture (1 - pi) p + pi p equal p: a warm start changes nothing."""
    torch.manual_seed(3)
    base = PFNConfig(n_layers=1, d_model=16, n_heads=2, d_ff=32, n_buckets=30, encoder_hidden=8)
    plain = PFN(base, torch.linspace(0, 1, 31)).eval()
    sharp = PFN(PFNConfig(**{**base.to_dict(), "sharpen_head": True}), plain.bar.borders).eval()
    missing, _ = sharp.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["sharpen.bias", "sharpen.weight"]
    x = _ctx(9)
    q = torch.tensor([[0.2, 0.7, 1.0]])
    with torch.no_grad():
        want = torch.log_softmax(plain.predict(*x, q), -1)
        assert torch.allclose(sharp.predict(*x, q), want, atol=1e-6)
        sharp.sharpen.weight.normal_(std=0.5)  # once trained, it differs
        assert not torch.allclose(sharp.predict(*x, q), want, atol=1e-3)


def test_sharpen_head_is_the_stated_mixture(tiny_model):
    from pfn.model import LOG_TAU_MAX, LOG_TAU_MIN, SHARPEN_GAIN

    h = torch.randn(5, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    gauss, tiny_model.gauss = tiny_model.gauss, None  # what the Gaussian head mixes with
    try:
        with torch.no_grad():
            out = tiny_model.bucket_logits(h)
    finally:
        tiny_model.gauss = gauss
    with torch.no_grad():
        if tiny_model.sharpen is None:  # the plain head: raw logits
            assert torch.equal(out, tiny_model.head(h))
            return
        a, b = (tiny_model.sharpen(h) * SHARPEN_GAIN).unbind(-1)
        tau = a.clamp(LOG_TAU_MIN, LOG_TAU_MAX).exp()[:, None]
        pi = torch.sigmoid(b)[:, None]
        logits = tiny_model.head(h).double()
        want = (1 - pi) * logits.softmax(-1) + pi * (logits * tau).softmax(-1)
    assert torch.allclose(out.exp().double(), want, atol=1e-6)
    assert torch.allclose(out.logsumexp(-1), torch.zeros(5), atol=1e-5)  # normalised


def _gauss_reference(model, h):
    """The model's output probabilities for hidden states h (k, E), and in float64 what the
    Gaussian head should make of them: (1 - w) p + w g, g from Phi differences at the borders
    around the median and the 15.9-84.1% half-spread of p (BarDistribution.quantile); also w,
    the Gaussian's sd and each inner bucket's width in sd, (n - 2, k)."""
    from pfn.model import GAUSS_LOGIT0

    k = h.shape[0]
    gauss = model.gauss
    with torch.no_grad():
        out = model.bucket_logits(h).double().exp()
        model.gauss = None
        try:
            p = model.bucket_logits(h).double().softmax(-1)
        finally:
            model.gauss = gauss
        a, b = gauss(h).double().unbind(-1)
    q = model.bar.quantile(p.log(), torch.tensor(
        [0.15865525393145707, 0.5, 0.8413447460685429], dtype=torch.float64).expand(k, 3))
    sd = (q[:, 2] - q[:, 0]) / 2 * b.exp()
    z = (model.bar.borders.double()[1:-1, None] - q[:, 1]) / sd  # (n - 1, k)
    c = torch.cat([torch.zeros(1, k), torch.special.ndtr(z), torch.ones(1, k)]).T  # (k, n + 1)
    w = torch.sigmoid(a + GAUSS_LOGIT0)[:, None]
    want = (1 - w) * p + w * (c[:, 1:] - c[:, :-1])
    return out, want, w, sd, model.bar.widths.double()[1:-1, None] / sd


@pytest.mark.parametrize("tiny_model", [(True, True, True)], indirect=True, ids=["gauss"])
def test_gauss_head_is_the_stated_mixture(tiny_model):
    """(1 - w) p + w g, g the bucket masses of N(median, (s sd)^2) with the median and the
    15.9-84.1% half-spread of p itself (found here by BarDistribution.quantile, in float64)."""
    h = torch.randn(7, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    out, want, w, sd, _ = _gauss_reference(tiny_model, h)
    assert (w > 0.01).all() and (sd > 0.02).all()  # the Gaussian carries weight here
    assert torch.allclose(out, want, atol=2e-6)
    assert torch.allclose(out.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("tiny_model", [(True, True, True)], indirect=True, ids=["gauss"])
def test_gauss_head_gradients_are_finite(tiny_model):
    """Training through the head: every parameter's gradient is finite (the midpoint rule's
    unused side of a where, at the outer buckets, once made them NaN)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(64, tiny_model.cfg.d_model, generator=g) * 3
    y = torch.rand(64, generator=g) * 1.6 - 0.3  # inside and beyond the outer borders
    tiny_model.train()
    loss = -tiny_model.bar.log_density(tiny_model.bucket_logits(h), y).mean()
    loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert tiny_model.gauss[0].weight.grad is not None
    assert all(bool(torch.isfinite(gr).all()) for gr in grads)


@pytest.fixture
def predictor(tiny_model):
    return Predictor(tiny_model)


def test_ragged_batch_equals_one_at_a_time(predictor):
    curves = [
        Curve([1, 2, 3], [0.2, 0.3, 0.35], horizon=10, query_epochs=[5, 10]),
        Curve([2, 4, 8, 16, 20], [0.5, 0.6, 0.62, 0.7, 0.71], horizon=50),
        Curve([1, 3], [2.3, 1.9], horizon=30, query_epochs=[4, 10, 30], direction="min"),
        Curve([0.5, 1, 1.5], [0.1, np.nan, 0.3], horizon=3, query_epochs=[2, 3],
              bounds=(0, 1)),
    ]
    batch = predictor.predict(curves)
    for c, pb in zip(curves, batch, strict=True):
        (one,) = predictor.predict([c])
        np.testing.assert_allclose(pb.mean, one.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pb.quantile([0.1, 0.9]), one.quantile([0.1, 0.9]),
                                   rtol=1e-5, atol=1e-6)


def test_min_direction_mirrors_max(predictor):
    """A loss curve is the mirror image of an accuracy curve with the same bounds."""
    e, v = [1, 2, 3, 4], np.array([0.3, 0.4, 0.45, 0.5])
    up = predictor.predict([Curve(e, v, 20, [10, 20], "max", (0.0, 1.0))])[0]
    dn = predictor.predict([Curve(e, 1 - v, 20, [10, 20], "min", (0.0, 1.0))])[0]
    np.testing.assert_allclose(dn.mean, 1 - up.mean, atol=1e-5)
    np.testing.assert_allclose(dn.quantile(0.1), 1 - up.quantile(0.9), atol=1e-4)
    np.testing.assert_allclose(dn.prob_greater(0.4), 1 - up.prob_greater(0.6), atol=1e-5)
    np.testing.assert_allclose(dn.log_density(0.35), up.log_density(0.65), atol=1e-4)


def test_units_affine_equivariance(predictor):
    """Unbounded metrics: scaling the values scales the answers (auto normalisation)."""
    e, v = [1, 2, 3, 5], np.array([10.0, 14.0, 16.0, 17.0])
    a = predictor.predict([Curve(e, v, 20)])[0]
    b = predictor.predict([Curve(e, 3 * v + 7, 20)])[0]
    np.testing.assert_allclose(b.mean, 3 * a.mean + 7, rtol=1e-5)
    np.testing.assert_allclose(b.std, 3 * a.std, rtol=1e-4)
    np.testing.assert_allclose(b.log_density(3 * a.mean + 7), a.log_density(a.mean) - np.log(3),
                               atol=1e-4)


def test_posterior_api_shapes(predictor):
    p = predictor.predict([Curve([1, 2], [0.2, 0.3], 10, [4, 6, 10])])[0]
    assert p.mean.shape == p.std.shape == p.median.shape == (3,)
    assert p.quantile([0.1, 0.5, 0.9]).shape == (3, 3)
    assert p.sample(11, seed=0).shape == (3, 11)
    assert bool((np.diff(p.quantile([0.1, 0.5, 0.9]), axis=1) > 0).all())
    cdf = p.cdf([0.1, 0.5, 0.9])
    assert bool((np.diff(cdf, axis=1) >= 0).all())
    np.testing.assert_allclose(p.prob_greater(0.5), 1 - cdf[:, 1], atol=1e-6)


@pytest.mark.parametrize(
    "curve, field, words",
    [
        (Curve([], [], 10), "epochs", "empty"),
        (Curve([1, 2], [np.nan, np.nan], 10), "values", "all NaN"),
        (Curve([-1, 2], [0.1, 0.2], 10), "epochs", "positive"),
        (Curve([2, 1], [0.1, 0.2], 10), "epochs", "strictly increasing"),
        (Curve([1, 1], [0.1, 0.2], 10), "epochs", "strictly increasing"),
        (Curve([1, 2, 3], [0.1, 0.2], 10), "values", "3"),
        (Curve([1, 2], [0.1, 0.2], -5), "horizon", "positive"),
        (Curve([1, 20], [0.1, 0.2], 10), "epochs", "exceeds horizon"),
        (Curve([1, 2], [0.1, 0.2], 10, query_epochs=[11]), "query_epochs", "horizon"),
        (Curve([1, 2], [0.1, np.inf], 10), "values", "inf"),
        (Curve([1, 2], [0.1, 0.2], 10, direction="up"), "direction", "'max' or 'min'"),
        (Curve([1, 2], [0.1, 0.2], 10, bounds=(1, 0)), "bounds", "lo < hi"),
        (Curve([[1, 2]], [[0.1, 0.2]], 10), "epochs", "one-dimensional"),
    ],
)
def test_user_errors_name_curve_field_and_fix(predictor, curve, field, words):
    ok = Curve([1, 2], [0.1, 0.2], 10)
    with pytest.raises(CurveError) as ei:
        predictor.predict([ok, curve])
    e = ei.value
    assert isinstance(e, ValueError) and e.index == 1 and e.field == field
    assert f"curves[1].{field}" in str(e) and words in str(e) and e.fix


def test_long_curves_are_subsampled(predictor):
    e = np.arange(1, 301)
    v = 1 - 1 / np.sqrt(e)
    prep = predictor.prepare([Curve(e, v, 300)])
    assert int(prep.ctx_mask.sum()) == predictor.max_context
    assert float(prep.t_ctx[0, -1]) == 1.0  # the last point is kept


def test_default_model_loads_and_verifies():
    p = Predictor.load()
    assert len(p.sha256) == 64
    post = p.predict([Curve([1, 2, 3, 4, 5], [0.2, 0.35, 0.45, 0.5, 0.55], 50, bounds=(0, 1))])[0]
    assert np.isfinite(post.mean).all() and 0 < float(post.mean[0]) < 1.2


def test_values_far_beyond_the_bounds_are_clipped(pred: Predictor) -> None:
    """A diverged loss (400 against bounds (0, 0.767)) reaches the model clipped to the bar's
    inner range, i.e. as bad as the bound itself: the same answer as that value, a final-value
    prediction in the bounds' range, and nothing changes for values inside the range."""
    lo, hi = pred.y_range
    assert lo < 0.0 < 1.0 < hi

    def final_median(last: float) -> float:
        c = Curve([1, 2, 3, 4], [0.76, 0.74, 0.73, last], 50, direction="min",
                  bounds=(0.0, 0.767))
        return float(pred.predict([c])[0].quantile(np.array([[0.5]]))[0, 0])

    edge = 0.767 - lo * 0.767  # the raw loss at the clip edge (y_n = lo)
    assert final_median(400.0) == pytest.approx(final_median(edge), abs=1e-6)
    assert final_median(1e6) == pytest.approx(final_median(edge), abs=1e-6)
    assert 0.0 < final_median(400.0) < 1.0
    assert final_median(0.72) != pytest.approx(final_median(edge), abs=1e-3)


def test_gauss_head_of_the_default_model_has_exact_bucket_masses():
    """At the shipped 1000 buckets (many far narrower than the Gaussian's sd, where the float32
    graph takes the midpoint rule, and far tails, where it takes one-sided erfc tails) the
    mixture equals the float64 one built from Phi differences: relative error <= 2e-5 on every
    bucket holding >= 1e-9 of the mass."""
    from pfn.io import load_model

    model, _ = load_model("default")
    h = torch.randn(16, model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    out, want, _, _, dz = _gauss_reference(model, h)
    assert (dz < 0.05).any() and (dz > 0.05).any()  # both rules are exercised
    held = want >= 1e-9
    rel = ((out - want).abs() / want)[held]
    assert float(rel.max()) <= 2e-5, float(rel.max())  # without the midpoint rule: 5.4e-5
