import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prior import BASES, CurvePrior, get_prior, sample_cutoffs
from prior.core import PRIORS, _screen


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1), m=st.integers(2, 120))
def test_bounds_shapes_and_rules(n, seed, m):
    b = CurvePrior(n_epochs=m).sample(n, torch.Generator().manual_seed(seed))
    assert b.y.shape == b.f.shape == (n, m) and b.sigma.shape == (n,)
    assert torch.equal(b.x, torch.arange(1, m + 1, dtype=torch.float32))
    assert bool(((b.f >= 0) & (b.f <= 1)).all())  # noise-free curve stays in [0, 1]
    assert bool((b.f[:, -1] > b.f[:, 0]).all())  # y(m) > y(1)
    assert bool(torch.isfinite(b.y).all()) and bool((b.sigma > 0).all())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_deterministic(seed):
    p = CurvePrior()
    a = p.sample(257, torch.Generator().manual_seed(seed))
    b = p.sample(257, torch.Generator().manual_seed(seed))
    assert torch.equal(a.y, b.y) and torch.equal(a.f, b.f)
    c = p.sample(257, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(a.y, c.y)


def test_noise_model():
    b = CurvePrior().sample(20000, torch.Generator().manual_seed(1))
    ls = b.sigma.log()
    assert abs(float(ls.mean()) + 4) < 0.05 and abs(float(ls.std()) - 1) < 0.05
    z = (b.y - b.f) / b.sigma[:, None]  # standardised noise: i.i.d. N(0, 1)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_basis_formulas_by_hand():
    x = torch.tensor([1.0, 2.0, 10.0], dtype=torch.float64)
    p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in
         {"c": 0.9, "a": 0.5, "alpha": 0.7}.items()}
    assert torch.allclose(BASES["pow3"].fn(x, p)[0], 0.9 - 0.5 * x ** -0.7)
    p = {"c": torch.tensor([[0.8]]).double(), "a": torch.tensor([[0.3]]).double()}
    assert torch.allclose(BASES["ilog2"].fn(x, p)[0], 0.8 - 0.3 / torch.log(x + 1))
    p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in
         {"a": 0.9, "beta": 0.1, "k": 0.2, "delta": 1.3}.items()}
    want = 0.9 - (0.9 - 0.1) * torch.exp(-0.2 * x ** 1.3)
    assert torch.allclose(BASES["janoschek"].fn(x, p)[0], want)


def test_rejection_rules():
    """Each of lcpfn's three rules rejects on its own."""
    x = torch.arange(1, 101, dtype=torch.float32)
    comps = ("pow3",)

    def ok(c, a, alpha):
        p = [{"c": torch.tensor([[c]]), "a": torch.tensor([[a]]), "alpha": torch.tensor([[alpha]])}]
        return bool(_screen(comps, True, x, torch.ones(1, 1), p)[1][0])

    assert ok(0.9, 0.5, 0.5)  # increasing, inside [0, 1]
    assert not ok(0.9, -0.5, 0.5)  # decreasing: y(100) <= y(1)
    assert not ok(1.2, 0.1, 0.5)  # leaves [0, 1]
    assert not ok(float("nan"), 0.1, 0.5)  # NaN


def test_matches_lcpfn_reference_distribution():
    """Same distribution as lcpfn's own sampler (two-sample KS on start, end and mid values)."""
    lcpfn = pytest.importorskip("lcpfn.domhan_prior")
    from scipy.stats import ks_2samp

    rng = np.random.RandomState(0)
    ref = np.stack([lcpfn.sample_from_prior(rng)()[1] for _ in range(1500)])
    ours = CurvePrior().sample(20000, torch.Generator().manual_seed(0)).y.numpy()
    for j in (0, 9, 49, 99):
        assert ks_2samp(ref[:, j], ours[:, j]).pvalue > 1e-3, j


def test_extended_prior_and_registry():
    p = get_prior("domhan")
    assert len(p.components) == 11
    b = get_prior("pow3+weibull").sample(50, torch.Generator().manual_seed(0))
    assert bool(((b.f >= 0) & (b.f <= 1)).all())
    with pytest.raises(ValueError, match="unknown"):
        get_prior("nope")


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 120))
def test_slow_starts_are_shifted_prior_curves(seed, m):
    """With delay_prob > 0 every curve is a paper-prior curve shifted right by t0 epochs
    (flat at its first value before), within the same bounds and rules."""
    n = 200
    plain = CurvePrior(n_epochs=m).sample(n, torch.Generator().manual_seed(seed))
    b = CurvePrior(n_epochs=m, delay_prob=0.5).sample(n, torch.Generator().manual_seed(seed))
    assert b.y.shape == (n, m) and bool(torch.isfinite(b.y).all())
    assert bool(((b.f >= 0) & (b.f <= 1)).all()) and bool((b.f[:, -1] > b.f[:, 0]).all())
    t = torch.arange(m)
    for i in range(n):  # the same proposals before the shift: find each curve's t0
        shifts = [t0 for t0 in range(m // 2 + 1)
                  if torch.equal(b.f[i], plain.f[i, (t - t0).clamp(min=0)])]
        assert shifts, f"curve {i} is not a shifted prior curve"


def test_slow_start_share_and_registry():
    p = get_prior("lcpfn-slowstart")
    assert p.delay_prob == 0.2 and p.name == "lcpfn-slowstart0.2"
    g = torch.Generator().manual_seed(3)
    plain = CurvePrior().sample(4000, torch.Generator().manual_seed(3)).f
    f = p.sample(4000, g).f
    moved = (f != plain).any(1).float().mean()
    assert 0.15 < float(moved) < 0.21  # 0.2, minus zero shifts and dropped peaked ones
    late = f[:, 0] == f[:, 20]  # flat for 20 epochs: essentially only slow starters
    assert float(late.float().mean()) > 0.05
    quarter = get_prior("lcpfn-slowstart0.05")
    assert quarter.name == "lcpfn-slowstart0.05"
    moved_q = (quarter.sample(4000, torch.Generator().manual_seed(3)).f != plain).any(1)
    assert 0.03 < float(moved_q.float().mean()) < 0.06
    with pytest.raises(ValueError, match="delay_prob"):
        CurvePrior(delay_prob=1.5)
    with pytest.raises(ValueError, match="MCMC"):
        p.sample_params(3, g)


def _plain_and_changed(m: int, seed: int, **change: float) -> tuple[torch.Tensor, ...]:
    """Noise-free curves of the paper's prior and of a changed prior from the same seed (same
    proposals), after checking the changed prior's determinism, shape and finiteness; with the
    per-curve range (lo, hi) of the paper's curves."""
    n = 200
    plain = CurvePrior(n_epochs=m).sample(n, torch.Generator().manual_seed(seed)).f
    b = CurvePrior(n_epochs=m, **change).sample(n, torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    again = CurvePrior(n_epochs=m, **change).sample(n, torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    assert torch.equal(b.y, again.y) and b.y.shape == (n, m) and bool(torch.isfinite(b.y).all())
    return plain, b.f, plain.min(1).values, plain.max(1).values


@given(m=st.integers(3, 120), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_early_convergence_compresses_prior_curves(m, seed):
    """Every curve of the converge prior is a prior curve (the same proposals) run faster:
    the same end points, values inside its own range, and a final plateau at f(m) at least as
    long as the original's."""
    plain, f, lo, hi = _plain_and_changed(m, seed, converge_prob=0.5)
    assert torch.allclose(f[:, 0], plain[:, 0]) and torch.allclose(f[:, -1], plain[:, -1])
    assert bool((f >= lo[:, None] - 1e-6).all() and (f <= hi[:, None] + 1e-6).all())

    def plateau(c: torch.Tensor) -> torch.Tensor:  # (n,) trailing epochs equal to the last one
        off = ((c - c[:, -1:]).abs() > 1e-7).flip(1)
        none = torch.full_like(off[:, 0], m, dtype=torch.long)  # flat throughout
        return torch.where(off.any(1), off.int().argmax(1), none)

    assert bool((plateau(f) >= plateau(plain)).all())


def test_early_convergence_share_and_registry():
    p = get_prior("lcpfn-converge0.3")
    assert p.converge_prob == 0.3 and p.name == "lcpfn-converge0.3"
    f = p.sample(4000, torch.Generator().manual_seed(3)).f
    plain = CurvePrior().sample(4000, torch.Generator().manual_seed(3)).f
    moved = ((f - plain).abs().amax(1) > 1e-6).float().mean()
    assert 0.26 < float(moved) < 0.32  # 0.3, minus s within a hair of 1
    tail = (f[:, -10:] - f[:, -1:]).abs().amax(1) < 1e-7  # flat for the last 10 epochs
    assert 0.20 < float(tail.float().mean()) < 0.27  # 0.3 * P(s < 0.9) = 0.24
    both = get_prior("lcpfn-converge0.3-slowstart0.2")
    assert (both.converge_prob, both.delay_prob) == (0.3, 0.2)
    with pytest.raises(ValueError, match="converge_prob"):
        CurvePrior(converge_prob=-0.1)
    with pytest.raises(ValueError, match="converge_min"):
        CurvePrior(converge_min=0.0)
    with pytest.raises(ValueError, match="MCMC"):
        p.sample_params(3, torch.Generator().manual_seed(0))


@given(m=st.integers(3, 120), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_decline_keeps_prior_curves_up_to_their_peak(m, seed):
    """Every curve of the decline prior is a prior curve (the same proposals) up to its peak,
    then never above the peak nor below its first value, and never rising again; seeded."""
    plain, f, lo, hi = _plain_and_changed(m, seed, decline_prob=0.5)
    n = len(f)
    assert torch.equal(f[:, 0], plain[:, 0]) and bool((f[:, -1] > f[:, 0]).all())
    assert bool((f >= lo[:, None] - 1e-6).all() and (f <= hi[:, None] + 1e-6).all())
    changed = (f - plain).abs() > 1e-7  # (n, m)
    first = torch.where(changed.any(1), changed.int().argmax(1), torch.full((n,), m))
    for i in range(n):  # before the first change the curve is the prior's; after, it falls
        c = int(first[i])
        if c < m:
            tail = f[i, c - 1:]
            assert bool((tail[1:] <= tail[:-1] + 1e-6).all())
            assert bool((tail <= plain[i, c - 1] + 1e-6).all() and (tail > f[i, 0]).all())


def test_decline_share_depth_and_registry():
    p = get_prior("lcpfn-decline0.2")
    assert p.decline_prob == 0.2 and p.name == "lcpfn-decline0.2"
    f = p.sample(4000, torch.Generator().manual_seed(3)).f
    plain = CurvePrior().sample(4000, torch.Generator().manual_seed(3)).f
    # the share that peak after epoch 10 and end more than 10% of their rise below the peak:
    # ~0.2 * P(d > 0.1) = 0.16, less the curves the paper's prior already peaks early (its
    # peaked curves peak in the first few epochs: 3% of them count here)
    def late_fall(c: torch.Tensor) -> float:
        fell = (c.amax(1) - c[:, -1]) > 0.1 * (c.amax(1) - c[:, 0])
        return float(((c.argmax(1) >= 10) & fell).float().mean())

    assert late_fall(plain) < 0.05 and 0.12 < late_fall(f) < 0.16
    all3 = get_prior("lcpfn-converge0.3-decline0.2-slowstart0.1")
    assert (all3.converge_prob, all3.decline_prob, all3.delay_prob) == (0.3, 0.2, 0.1)
    assert get_prior(all3.name) == all3
    for bad in (dict(decline_prob=1.5), dict(decline_start=0.0), dict(decline_max=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CurvePrior(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MCMC"):
        p.sample_params(3, torch.Generator().manual_seed(0))


@given(m=st.integers(3, 120), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_anneal_adds_a_late_gain_to_prior_curves(m, seed):
    """Every curve of the anneal prior is a prior curve (the same proposals) plus a gain that
    is zero up to its start, never shrinks, is at most anneal_max of the curve's rise, and
    keeps values <= 1; seeded."""
    plain, f, _, _ = _plain_and_changed(m, seed, anneal_prob=0.5)
    gain = f - plain  # (n, m)
    assert torch.equal(f[:, 0], plain[:, 0]) and bool((f <= 1.0 + 1e-6).all())
    assert bool((gain >= -1e-7).all() and (gain[:, 1:] >= gain[:, :-1] - 1e-6).all())
    rise = (plain[:, -1] - plain[:, 0]).clamp(min=0)
    assert bool((gain[:, -1] <= 0.5 * rise + 1e-6).all())


def test_annealed_flags_mark_the_curves_drawn_under_decay():
    """CurveBatch.annealed (the input of a model with a decay input) marks exactly the curves
    the anneal branch drew: only they may differ from the paper's curve of the same seed, and
    their share is anneal_prob; without the option every flag is False."""
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    plain = CurvePrior().sample(3000, g())
    assert plain.annealed is not None and not bool(plain.annealed.any())
    b = CurvePrior(anneal_prob=0.5).sample(3000, g())
    assert b.annealed is not None and b.annealed.dtype == torch.bool
    moved = (b.f - plain.f).abs().amax(1) > 1e-7
    assert not bool((moved & ~b.annealed).any())
    assert float(moved[b.annealed].float().mean()) > 0.9  # a drawn curve with no rise stays
    assert 0.47 < float(b.annealed.float().mean()) < 0.53
    assert bool(CurvePrior(anneal_prob=1.0).sample(50, g()).annealed.all())  # type: ignore[union-attr]


def test_anneal_share_size_and_registry():
    p = get_prior("lcpfn-anneal0.2")
    assert p.anneal_prob == 0.2 and p.name == "lcpfn-anneal0.2"
    f = p.sample(4000, torch.Generator().manual_seed(3)).f
    plain = CurvePrior().sample(4000, torch.Generator().manual_seed(3)).f
    gain = f[:, -1] - plain[:, -1]
    rise = plain[:, -1] - plain[:, 0]
    # gains are b * rise, b ~ U(0, 0.5), capped at 1 - max f: the share gaining more than a
    # tenth of their rise is at most 0.2 * P(b > 0.1) = 0.16 (less the capped, the jumps that
    # start late and slowly, and the curves with no rise)
    big = float(((gain > 0.1 * rise) & (rise > 0)).float().mean())
    assert 0.08 < big < 0.16
    assert float((gain.abs() > 1e-7).float().mean()) < 0.2
    all4 = get_prior("lcpfn-converge0.3-decline0.2-anneal0.1-slowstart0.1")
    assert (all4.decline_prob, all4.anneal_prob, all4.delay_prob) == (0.2, 0.1, 0.1)
    assert get_prior(all4.name) == all4
    for bad in (dict(anneal_prob=-0.1), dict(anneal_start=0.0), dict(anneal_max=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CurvePrior(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MCMC"):
        p.sample_params(3, torch.Generator().manual_seed(0))


def test_flat_runs_share_level_and_registry():
    """A flat_prob share of the curves never learns: constant at a level in [0, f(1)] of the
    paper's curve from the same proposals; the others are the paper's curves."""
    p = get_prior("lcpfn-flat0.3")
    assert p.flat_prob == 0.3 and p.name == "lcpfn-flat0.3"
    b = p.sample(4000, torch.Generator().manual_seed(3))
    plain = CurvePrior().sample(4000, torch.Generator().manual_seed(3)).f
    flat = (b.f.amax(1) - b.f.amin(1)) < 1e-9
    assert 0.27 < float(flat.float().mean()) < 0.33
    assert bool((b.f[flat, 0] <= plain[flat, 0] + 1e-7).all() and (b.f[flat, 0] >= 0).all())
    assert 0.3 < float((b.f[flat, 0] < 0.5 * plain[flat, 0]).float().mean()) < 0.7
    assert torch.equal(b.f[~flat], plain[~flat])
    assert get_prior("lcpfn-anneal0.1-flat0.1-slowstart0.2").flat_prob == 0.1
    with pytest.raises(ValueError, match="flat_prob"):
        CurvePrior(flat_prob=2.0)
    with pytest.raises(ValueError, match="MCMC"):
        p.sample_params(3, torch.Generator().manual_seed(0))


def test_cutoffs_per_curve():
    c = sample_cutoffs(5000, 100, torch.Generator().manual_seed(0))
    assert int(c.min()) == 1 and int(c.max()) == 99 and len(torch.unique(c)) == 99


@given(n=st.integers(1, 400), m=st.integers(2, 150), low=st.integers(0, 5),
       share=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_cutoffs_log_share_bounds_and_determinism(n, m, low, share, seed):
    low = min(low, m - 1)
    c = sample_cutoffs(n, m, torch.Generator().manual_seed(seed), low=low, log_share=share)
    again = sample_cutoffs(n, m, torch.Generator().manual_seed(seed), low=low, log_share=share)
    assert c.shape == (n,) and torch.equal(c, again)
    assert int(c.min()) >= max(low, 1 if share == 1.0 else low) and int(c.max()) <= m - 1


def test_cutoffs_log_share_moves_mass_to_few_epochs():
    g = torch.Generator().manual_seed(0)
    base = sample_cutoffs(100_000, 100, torch.Generator().manual_seed(0))
    assert torch.equal(base, sample_cutoffs(100_000, 100, g, log_share=0.0))  # stream unchanged
    c = sample_cutoffs(100_000, 100, torch.Generator().manual_seed(0), log_share=0.25)
    p = torch.bincount(c, minlength=100).double() / len(c)
    # 0.75 / 99 + 0.25 * log(2) / log(100) = 0.045 at one epoch; 0.75 / 99 + 0.25 * log(81/80) /
    # log(100) = 0.0083 at 80
    assert 0.042 < float(p[1]) < 0.048 and 0.0074 < float(p[80]) < 0.0092
    assert len(torch.unique(c)) == 99
    with pytest.raises(ValueError, match="log_share"):
        sample_cutoffs(3, 100, g, log_share=1.5)


@pytest.mark.parametrize("prior", [*PRIORS.values(), CurvePrior(components=("pow3", "vap"),
                                                                 delay_prob=0.3),
                                   CurvePrior(converge_prob=0.25, delay_prob=0.1),
                                   CurvePrior(converge_prob=0.25, decline_prob=0.2,
                                              delay_prob=0.1),
                                   CurvePrior(decline_prob=0.1, anneal_prob=0.2),
                                   CurvePrior(anneal_prob=0.1, flat_prob=0.1, delay_prob=0.1)],
                         ids=lambda p: p.name)
def test_every_prior_name_resolves_to_that_prior(prior):
    """A model's config records ``prior.name``; ``get_prior`` must give that prior back
    (`curvecast refit-tails` fits on it)."""
    assert get_prior(prior.name) == prior
    for bad in ("lcpfn-slowstart0", "lcpfn-slowstart2", "lcpfn-slowstartx", "nope-slowstart0.2",
                "lcpfn-converge0", "lcpfn-converge1.5", "nope-converge0.2",
                "lcpfn-decline0", "lcpfn-decline1.5", "nope-decline0.2",
                "lcpfn-anneal0", "lcpfn-anneal2", "nope-anneal0.1", "lcpfn-flat0",
                "nope-flat0.1"):
        with pytest.raises(ValueError, match="unknown name"):
            get_prior(bad)
