import math

import pytest
import torch

from pfn.bar import BarDistribution, borders_from_samples, fit_tail_scales, with_tail_scales

torch.set_default_dtype(torch.float32)


@pytest.fixture
def bar() -> BarDistribution:
    return BarDistribution(torch.tensor([0.0, 1.0, 2.0, 4.0, 5.0]))  # 4 buckets


def test_hand_computed_values(bar):
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    # inner bucket [1, 2): density = p / width
    assert float(bar.log_density(logits, torch.tensor(1.5))) == pytest.approx(math.log(0.2))
    assert float(bar.log_density(logits, torch.tensor(3.0))) == pytest.approx(math.log(0.3 / 2))
    # CDF at inner borders is the cumulative mass
    assert float(bar.cdf(logits, torch.tensor(1.0))) == pytest.approx(0.1, abs=1e-6)
    assert float(bar.cdf(logits, torch.tensor(2.0))) == pytest.approx(0.3, abs=1e-6)
    assert float(bar.cdf(logits, torch.tensor(3.0))) == pytest.approx(0.45, abs=1e-6)
    # left tail: half-normal starting at 1 whose median distance is the bucket width (1)
    s = 1.0 / (math.sqrt(2) * torch.erfinv(torch.tensor(0.5)).item())
    want = (math.log(0.1) + math.log(2) - 0.5 * math.log(2 * math.pi) - math.log(s)
            - 0.5 * (0.5 / s) ** 2)
    assert float(bar.log_density(logits, torch.tensor(0.5))) == pytest.approx(want, rel=1e-5)
    assert float(bar.cdf(logits, torch.tensor(0.0))) == pytest.approx(0.05, abs=1e-6)
    # right tail median at 4 + width(1): CDF = 0.6 + 0.4 * 0.5
    assert float(bar.cdf(logits, torch.tensor(5.0))) == pytest.approx(0.8, abs=1e-6)
    assert float(bar.quantile(logits, torch.tensor(0.45))) == pytest.approx(3.0, abs=1e-5)


def _random_bar(seed: int, n: int = 37):
    g = torch.Generator().manual_seed(seed)
    borders = torch.cumsum(torch.rand(n + 1, generator=g) + 0.05, 0) / n
    return BarDistribution(borders), torch.randn(3, n, generator=g) * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_integrates_to_one_and_matches_cdf(seed):
    bar, logits = _random_bar(seed)
    b = bar.borders
    y = torch.linspace(float(b[0]) - 3, float(b[-1]) + 3, 200001, dtype=torch.float64)
    dens = bar.log_density(logits.double()[:, None, :].expand(3, len(y), -1), y.expand(3, -1)).exp()
    dy = y[1] - y[0]
    total = torch.trapezoid(dens, dx=float(dy), dim=-1)
    assert torch.allclose(total, torch.ones(3, dtype=torch.float64), atol=2e-3)
    cdf_num = torch.cumulative_trapezoid(dens, dx=float(dy), dim=-1)
    cdf = bar.cdf(logits.double()[:, None, :].expand(3, len(y), -1), y.expand(3, -1))
    assert torch.allclose(cdf[:, 1:], cdf_num + cdf[:, :1], atol=2e-3)
    assert bool((cdf.diff(dim=-1) >= -1e-7).all())  # monotone
    # mean and variance against numerical integration
    mean_num = torch.trapezoid(dens * y, dx=float(dy), dim=-1)
    var_num = torch.trapezoid(dens * y**2, dx=float(dy), dim=-1) - mean_num**2
    assert torch.allclose(bar.mean(logits.double()), mean_num, atol=2e-3)
    assert torch.allclose(bar.variance(logits.double()), var_num, atol=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_quantile_inverts_cdf(seed):
    bar, logits = _random_bar(seed)
    b = bar.borders
    y = torch.linspace(float(b[0]) - 0.5, float(b[-1]) + 0.5, 301).expand(3, -1)
    c = bar.cdf(logits[:, None, :].expand(3, 301, -1), y)
    ok = (c > 1e-4) & (c < 1 - 1e-4)
    back = bar.quantile(logits[:, None, :].expand(3, 301, -1), c.clamp(1e-6, 1 - 1e-6))
    assert torch.allclose(back[ok], y[ok], atol=2e-4)
    q = torch.tensor([0.01, 0.3, 0.5, 0.99]).expand(3, -1)  # (dists, k)
    assert torch.allclose(bar.cdf(logits, bar.quantile(logits, q)), q, atol=1e-5)


def test_samples_follow_the_distribution():
    bar, logits = _random_bar(3)
    s = bar.sample(logits, 40000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.mean(-1), bar.mean(logits), atol=0.01)


def test_borders_from_samples_equal_mass():
    v = torch.randn(100000, generator=torch.Generator().manual_seed(0))
    b = borders_from_samples(v, 10)
    assert b.shape == (11,) and bool((b.diff() > 0).all())
    counts = torch.histc(v, bins=1, min=float(b[3]), max=float(b[4]))
    assert abs(float(counts) / 1e5 - 0.1) < 0.01


def test_invalid_borders():
    with pytest.raises(ValueError, match="strictly increasing"):
        BarDistribution(torch.tensor([0.0, 1.0, 1.0, 2.0]))


def test_fit_tail_scales_recovers_half_normal_excess():
    g = torch.Generator().manual_seed(1)
    b = torch.tensor([-5.0, 0.0, 0.5, 1.0, 9.0])
    left = -0.3 * torch.randn(20000, generator=g).abs()  # below b[1] = 0, scale 0.3
    right = 1.0 + 0.05 * torch.randn(20000, generator=g).abs()  # above b[-2] = 1, scale 0.05
    inner = torch.rand(20000, generator=g)
    sl, sr = fit_tail_scales(torch.cat([left, inner, right]), b)
    assert sl == pytest.approx(0.3, rel=0.03) and sr == pytest.approx(0.05, rel=0.03)
    with pytest.raises(ValueError, match="beyond an inner border"):
        fit_tail_scales(inner, b)


def test_with_tail_scales_moves_only_the_tails():
    bar, logits = _random_bar(3)
    nb = with_tail_scales(bar.borders, 0.07, 0.4)
    new = BarDistribution(nb)
    assert new.tail_scales == pytest.approx((0.07, 0.4), rel=1e-5)
    assert torch.equal(nb[1:-1], bar.borders[1:-1])
    b = bar.borders
    y_in = torch.linspace(float(b[1]) + 1e-4, float(b[-2]) - 1e-4, 7).expand(3, 7)
    assert torch.allclose(new.log_density(logits, y_in), bar.log_density(logits, y_in))
    assert torch.allclose(new.cdf(logits, y_in), bar.cdf(logits, y_in), atol=1e-6)
    # a tail's mass stays, its reach follows the scale: the quantile at half the left tail's
    # mass is the half-normal's median below b[1], 0.07 * 0.6745
    p0 = torch.softmax(logits, -1)[:, 0]
    q = (0.5 * p0).unsqueeze(-1)  # half of the left tail's mass
    d = b[1] - new.quantile(logits, q).squeeze(-1)
    assert torch.allclose(d, torch.full_like(d, 0.07 * 0.6745), rtol=1e-3)
    with pytest.raises(ValueError, match="positive"):
        with_tail_scales(bar.borders, 0.0, 1.0)


def test_borders_from_samples_fit_the_tails():
    v = torch.randn(200000, generator=torch.Generator().manual_seed(2))
    b = borders_from_samples(v, 20)
    assert BarDistribution(b).tail_scales == pytest.approx(fit_tail_scales(v, b), rel=1e-4)
    # the samples' extremes would give tails several times wider than the samples' own
    assert float(b[0]) > float(v.min()) and float(b[-1]) < float(v.max())


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_nll_is_the_mean_loss_over_gaussian_draws(seed):
    """expected_nll(logits, mu, sd) equals the Monte-Carlo mean of -log_density at draws of
    N(mu, sd^2), for noise inside one bucket, spanning many, and reaching into either tail
    (the closed-form tail moments); its gradient is softmax minus the Gaussian's bucket
    masses, the mean of the draws' gradients."""
    bar, logits = _random_bar(seed)
    b = bar.borders
    mu = torch.tensor([float(b[18] + 0.3 * (b[19] - b[18])), float(b[10]), float(b[1]) - 0.02])
    sd = torch.tensor([0.002, 0.2, 0.05])
    logits = logits.clone().requires_grad_(True)
    want = bar.expected_nll(logits, mu, sd)
    g_want, = torch.autograd.grad(want.sum(), logits)
    draws = mu[:, None] + sd[:, None] * torch.randn(3, 200_000, generator=torch.Generator()
                                                    .manual_seed(seed))
    nll = -bar.log_density(logits, draws)  # (3, k)
    se = nll.detach().std(-1) / nll.shape[-1] ** 0.5
    assert torch.all((nll.detach().mean(-1) - want.detach()).abs() < 4 * se + 1e-5)
    g_mc, = torch.autograd.grad(nll.mean(-1).sum(), logits)
    assert torch.allclose(g_want, g_mc, atol=5e-3)
    assert torch.allclose(g_want.sum(-1), torch.zeros(3), atol=1e-5)  # softmax - masses
    # a different value, far from a draw's loss at the mean when the noise is wide
    assert float(want[1].detach()) > float(-bar.log_density(logits.detach(), mu)[1]) + 0.01
