"""The MCMC reference posterior (prior/reference.py): correctness on small, seeded cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prior import BASES, CurvePrior
from prior.core import _screen
from prior.reference import (
    SETTINGS,
    MCMCSettings,
    _model,
    _union,
    ensemble_ess,
    mcmc_posterior_predictive,
    prior_protocol,
    reference_log_likelihood,
    split_rhat,
)

FAST = dict(n_walkers=64, n_samples=20, thin=2, anneal_sweeps=2, groups=2)  # ~0.1 s per curve


def _curves(n: int, seed: int, prior: CurvePrior | None = None):
    return (prior or CurvePrior()).sample(n, torch.Generator().manual_seed(seed))


def _known(n: int, seed: int, prior: CurvePrior, sigma: float):
    """Curves from known parameters: (x, f (n, m), y (n, m))."""
    g = torch.Generator().manual_seed(seed)
    w, p = prior.sample_params(n, g)
    x = torch.arange(1, prior.n_epochs + 1, dtype=torch.float64)
    f, ok = _screen(prior.components, True, x, w, p)
    assert bool(ok.all())
    y = f + sigma * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return x, f, y


def test_shapes_and_helpers():
    b = _curves(3, 0)
    c, q = 10, 7
    r = mcmc_posterior_predictive(b.x[:c], b.y[:, :c], b.x[c : c + q],
                                  generator=torch.Generator().manual_seed(0), **FAST)
    d = 13  # 3 weights + 3 + 2 + 4 basis parameters + log sigma
    assert r.theta.shape == (3, 64, 10, d) and r.log_prob.shape == (3, 64, 10)
    assert r.n_draws == 640 and len(r.names) == d and r.names[-1] == "log_sigma"
    assert r.rhat.shape == (3, 3) and r.ess.shape == (3, 3) and r.rhat_params.shape == (3,)
    assert r.acceptance.shape == r.n_stages.shape == r.log_evidence.shape == (3,)
    assert bool((r.n_stages >= 1).all()) and bool(torch.isfinite(r.log_evidence).all())
    assert bool(torch.isfinite(r.log_prob).all())
    ld = r.log_density(b.y[:, c : c + q])
    mean = r.mean()
    qs = r.quantile([0.05, 0.5, 0.95])
    assert ld.shape == mean.shape == (3, q) and qs.shape == (3, q, 3)
    assert bool(torch.isfinite(ld).all())
    assert bool((qs[..., 0] < qs[..., 1]).all() and (qs[..., 1] < qs[..., 2]).all())
    s = r.summary()
    assert s["n_curves"] == 3 and s["seconds_per_curve"] > 0 and 0 < s["acceptance_mean"] < 1
    with pytest.raises(ValueError, match="y_query"):
        r.log_density(b.y[:, :c])


def test_protocol_helpers():
    b = _curves(3, 4)
    st = MCMCSettings(**FAST)
    ll, summary = reference_log_likelihood(b.y, 20, None, st, torch.Generator().manual_seed(0),
                                           batch=2)
    assert ll.shape == (3,) and bool(torch.isfinite(ll).all())
    assert summary["n_curves"] == 3 and summary["n_draws"] == 640
    rows = prior_protocol(n=2, cutoffs=(10, 80), settings=st)
    assert [r["cutoff"] for r in rows] == [10, 80]
    assert all(math.isfinite(r["log_likelihood"]) and r["seconds"] > 0 for r in rows)
    with pytest.raises(ValueError, match="cutoff"):
        reference_log_likelihood(b.y, 100)


def test_bad_arguments_name_the_field():
    b = _curves(2, 0)
    x, y, xq = b.x[:5], b.y[:, :5], b.x[5:]
    for kwargs, field in [
        (dict(n_walkers=31), "n_walkers"),
        (dict(n_walkers=24, groups=1), "n_walkers"),  # < 2 * 13
        (dict(n_walkers=102), "groups"),  # 2 groups of 51: halves of unequal size
        (dict(n_samples=7, thin=2), "n_samples"),
        (dict(anneal_ess=1.0), "anneal_ess"),
        (dict(anneal=False, init_pool=16), "init_pool"),
    ]:
        with pytest.raises(ValueError, match=field):
            mcmc_posterior_predictive(x, y, xq, **kwargs)
    with pytest.raises(ValueError, match="y_obs"):
        mcmc_posterior_predictive(x, b.y[:, :4], xq)
    with pytest.raises(ValueError, match="finite"):
        mcmc_posterior_predictive(x, y.clone().fill_(math.nan), xq)


def test_deterministic_given_generator():
    b = _curves(2, 1)
    args = (b.x[:20], b.y[:, :20], b.x[20:])
    for anneal in (True, False):
        kw = dict(FAST, anneal=anneal, init_pool=256)
        r1 = mcmc_posterior_predictive(*args, generator=torch.Generator().manual_seed(5), **kw)
        r2 = mcmc_posterior_predictive(*args, generator=torch.Generator().manual_seed(5), **kw)
        r3 = mcmc_posterior_predictive(*args, generator=torch.Generator().manual_seed(6), **kw)
        assert torch.equal(r1.theta, r2.theta) and torch.equal(r1.log_prob, r2.log_prob)
        assert not torch.equal(r1.theta, r3.theta)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 60), anneal=st.booleans(),
       f64=st.booleans())
def test_every_draw_is_inside_the_prior_support(seed, c, anneal, f64):
    """Every kept draw obeys the prior's rejection rules on the whole grid 1..m, checked with
    the prior's own screen at the sampler's precision."""
    prior = CurvePrior()
    dtype = torch.float64 if f64 else torch.float32
    b = _curves(2, seed)
    r = mcmc_posterior_predictive(b.x[:c], b.y[:, :c], b.x[c:] if c < 100 else b.x[-1:],
                                  generator=torch.Generator().manual_seed(seed),
                                  dtype="float64" if f64 else "float32",
                                  anneal=anneal, init_pool=256, **FAST)
    w, p, sigma = r.params()
    x = torch.arange(1, prior.n_epochs + 1, dtype=dtype)
    f, ok = _screen(prior.components, True, x, w.to(dtype),
                    [{k: v.to(dtype) for k, v in d.items()} for d in p])
    assert bool(ok.all()), f"{int((~ok).sum())} draws outside the support"
    assert bool((sigma > 0).all()) and bool(((w > 0) & (w < 1)).all())


def _theta(m, w, params, ls=-4.0):
    w = torch.tensor([w], dtype=torch.float64)
    p = [{k: torch.tensor([[v]], dtype=torch.float64) for k, v in d.items()} for d in params]
    return m.from_params(w, p, torch.tensor([ls], dtype=torch.float64))


def test_log_density_is_zero_outside_the_support():
    """Parameters whose curve leaves [0, 1] or does not rise have posterior density zero (log
    prior and log likelihood -inf)."""
    prior = CurvePrior()
    m = _model(prior, torch.float64, False)
    x = torch.arange(1, 101, dtype=torch.float64)
    xs, obs = _union(x, x[:5])
    y = torch.full((1, 5), 0.5, dtype=torch.float64)
    jan = {"a": 0.9, "beta": 0.5, "k": 0.1, "delta": 1.0}
    ok = _theta(m, [0.3, 0.3, 0.3], [{"a": 0.1, "c": 0.8, "alpha": 1.0}, {"c": 0.5, "a": 0.1}, jan])
    high = _theta(m, [0.99, 0.99, 0.99], [{"a": 0.1, "c": 1.2, "alpha": 1.0},
                                         {"c": 0.9, "a": 0.1}, jan])
    falls = _theta(m, [0.9, 0.001, 0.001], [{"a": -0.6, "c": 0.125, "alpha": 1.0},
                                            {"c": 0.5, "a": 0.0}, jan])
    f = m.curves(torch.cat([ok, high, falls]), x)[0]
    assert float(f[1].amax()) > 1 and float(f[0].amax()) <= 1
    assert float(f[2].amin()) >= 0 and float(f[2].amax()) <= 1 and float(f[2, -1] - f[2, 0]) < 0
    for th, finite in ((ok, True), (high, False), (falls, False)):
        lpr, ll = m.log_parts(th[:, None], xs, obs, y)
        assert bool(torch.isfinite(lpr).all() & torch.isfinite(ll).all()) == finite


def _density_x(spec, v):
    """log density of a ParamPrior at value v, in the parameter's own units."""
    a, b = spec.a, spec.b
    if spec.dist == "uniform":
        return torch.full_like(v, -math.log(b - a))
    if spec.dist == "normal":
        return -0.5 * ((v - a) / b) ** 2 - math.log(b)
    if spec.dist == "lognormal":
        return -0.5 * ((v.log() - a) / b) ** 2 - math.log(b) - v.log()
    if spec.dist == "exp_uniform":
        return -math.log(b - a) - v.log()
    return -math.log(b - a) - torch.log1p(-v)  # one_minus_exp_uniform


@pytest.mark.parametrize(
    "components", [("pow3", "ilog2", "janoschek"), ("vap", "pow4", "mmf", "log_power")]
)  # the second covers every kind of parameter prior
def test_log_prior_is_the_change_of_variables(components):
    """The sampler's log prior in its coordinates equals the prior's density at the implied
    parameters times the Jacobian of the map (up to one constant), for every kind of prior."""
    prior = CurvePrior(components=components)
    m = _model(prior, torch.float64, False)
    specs = [p for c in components for p in BASES[c].params]
    w, p = prior.sample_params(8, torch.Generator().manual_seed(1))
    th = m.from_params(w, p, torch.linspace(-6, -2, 8, dtype=torch.float64))

    def flat(t):
        wv, pv, ls = m.to_params(t[None])
        vals = [pv[j][s.name][0, 0] for j, c in enumerate(components) for s in BASES[c].params]
        return torch.cat([wv[0], torch.stack(vals), ls])

    got = []
    for t in th:
        jac = torch.autograd.functional.jacobian(flat, t)
        v = flat(t)
        k = len(components)
        lp = sum(_density_x(s, v[k + i : k + i + 1]) for i, s in enumerate(specs))
        lp = lp - 0.5 * (v[-1] + 4) ** 2
        got.append(float(m.log_prior_free(t[None])[0] - lp[0] - torch.linalg.slogdet(jac)[1]))
    assert max(got) - min(got) < 1e-8, got


def test_log_density_is_the_exact_mixture():
    b = _curves(2, 3)
    c, q = 15, 5
    r = mcmc_posterior_predictive(b.x[:c], b.y[:, :c], b.x[c : c + q], **FAST)
    yq = b.y[:, c : c + q].double()
    w, p, sigma = r.params()
    f, _ = _screen(CurvePrior().components, False, b.x[c : c + q].double(), w, p)
    f = f.view(2, r.n_draws, q).numpy()
    s = sigma.view(2, r.n_draws, 1).numpy()
    dens = np.exp(-0.5 * ((yq.numpy()[:, None] - f) / s) ** 2) / (s * math.sqrt(2 * math.pi))
    expected = np.log(dens.mean(1))
    np.testing.assert_allclose(r.log_density(yq).numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r.mean().numpy(), f.mean(1), rtol=1e-9, atol=1e-12)
    # quantiles invert the mixture CDF
    from scipy.stats import norm

    qv = r.quantile([0.1, 0.9])
    cdf = norm.cdf((qv.numpy()[:, None] - f[..., None]) / s[..., None]).mean(1)
    np.testing.assert_allclose(cdf, np.broadcast_to([0.1, 0.9], cdf.shape), atol=1e-6)


def test_recovers_known_curves():
    """Curves with known parameters and small noise: the predictive covers the noise-free
    truth, sigma is recovered, and the predictive log-likelihood is close to the oracle's."""
    prior = CurvePrior()
    sigma = 0.01
    x, f, y = _known(4, 11, prior, sigma)
    c = 30
    r = mcmc_posterior_predictive(x[:c], y[:, :c], x[c:], n_samples=20, thin=4,
                                  generator=torch.Generator().manual_seed(1))
    q = r.quantile([0.005, 0.995])
    inside = ((f[:, c:] >= q[..., 0]) & (f[:, c:] <= q[..., 1])).double().mean()
    assert float(inside) > 0.9
    _, _, s = r.params()
    med = s.view(4, -1).median(1).values
    assert bool(((med > sigma / 1.6) & (med < sigma * 1.6)).all()), med
    oracle = (-0.5 * ((y[:, c:] - f[:, c:]) / sigma) ** 2 - math.log(sigma)
              - 0.5 * math.log(2 * math.pi)).mean(1)
    ll = r.log_density(y[:, c:]).mean(1)
    assert float((oracle - ll).mean()) < 1.0, (ll, oracle)  # the truth is known to the oracle


def test_evidence_matches_brute_force():
    """The annealing's log p(y_obs) agrees with plain Monte Carlo over prior draws."""
    prior = CurvePrior(components=("ilog2",))
    sigma = 0.05
    x, _, y = _known(3, 2, prior, sigma)
    c = 5
    r = mcmc_posterior_predictive(x[:c], y[:, :c], x[-1:], prior=prior, n_walkers=1024,
                                  groups=1, n_samples=8, thin=2, anneal_sweeps=5, anneal_ess=0.8)
    m = _model(prior, torch.float64, False)
    g = torch.Generator().manual_seed(9)
    k = 300_000  # importance sampling from the prior: ESS ~ 700-2300 here
    w, p = prior.sample_params(k, g)
    z = torch.randn(k, generator=g, dtype=torch.float64)
    ls = prior.log_sigma_mean + prior.log_sigma_std * z
    th = m.from_params(w, p, ls)
    xs, obs = _union(x, x[:c])
    _, ll = m.log_parts(th[None].expand(3, -1, -1), xs, obs, y[:, :c])
    brute = torch.logsumexp(ll, 1) - math.log(k)
    np.testing.assert_allclose(r.log_evidence.numpy(), brute.numpy(), atol=0.3)


def test_rhat_near_one_on_an_easy_case():
    """One basis, 50 points, a short weight-amplitude ridge (w * c near 0.9): the walkers agree
    on the noise and the extrapolation (split R-hat < 1.1). The log posterior and the parameters
    mix slower along the ridge, where only the prior decides."""
    prior = CurvePrior(components=("ilog2",))
    x = torch.arange(1, 101, dtype=torch.float64)
    f = 0.95 * (0.95 - 0.3 / torch.log(x + 1))
    y = f + 0.01 * torch.randn(2, 100, generator=torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    c = 50
    r = mcmc_posterior_predictive(x[:c], y[:, :c], x[c:], prior=prior, n_walkers=32, groups=1,
                                  n_samples=3000, burn_in=200, thin=10, anneal_sweeps=2,
                                  generator=torch.Generator().manual_seed(3))
    assert float(r.rhat[:, :2].max()) < 1.1 and float(r.rhat.max()) < 1.2, r.rhat
    assert float(r.ess[:, 1].min()) > 200, r.ess  # extrapolation; NaN = chains too short
    q = r.quantile([0.01, 0.99])
    assert bool(((f[c:] >= q[..., 0]) & (f[c:] <= q[..., 1])).all())


def test_diagnostics_on_synthetic_chains():
    g = torch.Generator().manual_seed(0)
    iid = torch.randn(5, 8, 2000, generator=g, dtype=torch.float64)
    assert torch.allclose(split_rhat(iid), torch.ones(5, dtype=torch.float64), atol=0.01)
    ess = ensemble_ess(iid)
    assert bool(((ess > 0.8 * 16000) & (ess <= 16000 * 1.2)).all()), ess
    apart = iid + torch.arange(8, dtype=torch.float64)[:, None]  # chains disagree
    assert bool((split_rhat(apart) > 2).all())
    # AR(1) with phi = 0.9: integrated autocorrelation time (1 + phi) / (1 - phi) = 19
    e = torch.randn(4, 8, 8000, generator=g, dtype=torch.float64)
    ar = torch.empty_like(e)
    ar[..., 0] = e[..., 0] / math.sqrt(1 - 0.81)
    for t in range(1, e.shape[-1]):
        ar[..., t] = 0.9 * ar[..., t - 1] + e[..., t]
    ratio = ensemble_ess(ar) / (8 * 8000 / 19)
    assert bool(((ratio > 0.7) & (ratio < 1.4)).all()), ratio


@pytest.mark.slow
def test_paper_protocol_smoke():
    """Prior curves at the paper's cutoffs: finite, sensible log-likelihoods (a few minutes)."""
    b = _curves(24, 7)
    for c, lo in ((10, 0.5), (80, 1.5)):
        for name in ("default", "paper"):
            ll, _ = reference_log_likelihood(b.y, c, settings=SETTINGS[name])
            assert bool(torch.isfinite(ll).all()) and float(ll.mean()) > lo
