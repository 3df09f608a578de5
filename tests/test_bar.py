import math

import pytest
import torch

from pfn.bar import BarDistribution, borders_from_samples

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
