"""Fused posterior head vs its twin (pfn.bar.BarDistribution), under the Triton interpreter.

Tolerances, kernel vs twin (both fp32 inside; fp16/bf16 logits are cast to fp32 first):
lse 1e-5 abs + 1e-6 rel; mean, var 2e-6 abs; P(Y > t) 2e-6 abs; log p(y) 1e-4 abs + 1e-5
rel; quantiles at levels 0.001..0.95: 5e-5 abs. Quantiles at every level (1e-6..1-1e-6,
where fp32 prefix sums are ill-conditioned and the two differ by more) must bracket the
level in float64: F(x - 1e-5) <= q + 2e-6 and F(x + 1e-5) >= q - 2e-6. The kernel's
variance avoids the twin's E[Y²] - mean² cancellation, so var and std are also held to the
float64 truth: 1e-4 rel (+ 1e-9 / 1e-7 abs); the twin's std can be off by 2x at tiny
variances.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before serve.kernels imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pfn.bar import BarDistribution  # noqa: E402
from serve.kernels import INTERPRETED, KernelInputError, posterior_summary  # noqa: E402
from serve.kernels.posterior import (  # noqa: E402
    MAX_BUCKETS,
    MAX_VALUES,
    BucketTable,
    _rows_of,
    posterior_triton,
)

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 at import")

LEVELS = [1e-6, 0.001, 0.05, 0.5, 0.95, 0.999, 1 - 1e-6]
WELL_CONDITIONED = slice(1, 5)  # 0.001 .. 0.95


def make_borders(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    inner = torch.sort(torch.rand(n - 1, generator=g)).values * 1.2 - 0.1
    return torch.cat([torch.tensor([-0.3]), inner, torch.tensor([1.3])])


def make_logits(R: int, n: int, seed: int = 0) -> torch.Tensor:
    """Broad, peaked and tail-heavy rows (row 0: left tail, row 1: right tail)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0])[torch.arange(R) % 5]
    x = torch.randn(R, n, generator=g) * scale[:, None]
    x[0, 0] += 20
    if R > 1:
        x[1, -1] += 20
    return x


def probe_points(borders: torch.Tensor) -> list[float]:
    """Both tails, the inner borders' ends, exact borders and interior points."""
    n = borders.numel() - 1
    return [-1.0, -0.3, float(borders[1]), 0.0, float(borders[n // 2]), 0.4,
            float(borders[-2]), 1.31, 2.0]


def bracket_ok(logits: torch.Tensor, borders: torch.Tensor, x: torch.Tensor,
               q: torch.Tensor) -> None:
    bar = bar64(borders)
    lo = bar.cdf(logits.double(), x.double() - 1e-5)
    hi = bar.cdf(logits.double(), x.double() + 1e-5)
    assert float((lo - q).max()) <= 2e-6
    assert float((q - hi).max()) <= 2e-6


def bar64(borders: torch.Tensor) -> BarDistribution:
    bar = BarDistribution(borders)
    bar.borders = borders.double()  # the reference maths in float64
    return bar


def compare(x: torch.Tensor, borders: torch.Tensor, levels, points) -> None:
    a = posterior_summary(x, borders, levels, points, points, mode="triton")
    b = posterior_summary(x, borders, levels, points, points, mode="torch")
    torch.testing.assert_close(a.lse, b.lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(a.mean, b.mean, atol=2e-6, rtol=0)
    torch.testing.assert_close(a.var, b.var, atol=2e-6, rtol=0)
    var64 = bar64(borders).variance(x.double().reshape(-1, x.shape[-1])).reshape(a.var.shape)
    torch.testing.assert_close(a.var.double(), var64, atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(a.std.double(), var64.sqrt(), atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(a.prob_greater, b.prob_greater, atol=2e-6, rtol=0)
    torch.testing.assert_close(a.log_density, b.log_density, atol=1e-4, rtol=1e-5)
    if len(levels) == len(LEVELS):
        torch.testing.assert_close(a.quantiles[..., WELL_CONDITIONED],
                                   b.quantiles[..., WELL_CONDITIONED], atol=5e-5, rtol=0)
    q = torch.tensor(levels, dtype=torch.float64).expand(*a.quantiles.shape)
    bracket_ok(x.float().reshape(-1, x.shape[-1]), borders,
               a.quantiles.reshape(-1, len(levels)), q.reshape(-1, len(levels)))


@pytest.mark.parametrize("n", [3, 13, 127, 1000])
def test_fp32_matches_twin(n):
    borders = make_borders(n)
    compare(make_logits(7, n), borders, LEVELS, probe_points(borders))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_logits_match_twin(dtype):
    borders = make_borders(1000, seed=1)
    compare(make_logits(5, 1000, seed=1).to(dtype), borders, LEVELS, probe_points(borders))


def test_several_programs_and_request_chunks():
    """Small row and request blocks: rows and requests split over programs and chunks."""
    n, R = 127, 7
    borders = make_borders(n, seed=2)
    x = make_logits(R, n, seed=2)
    qs = _rows_of("quantiles", LEVELS, (R,), x.device)
    pts = _rows_of("thresholds", probe_points(borders), (R,), x.device)
    a = posterior_triton(x, borders, qs, pts, pts, block_r=2, block_k=2)
    b = posterior_triton(x, borders, qs, pts, pts, block_r=8, block_k=16)
    for f in ("lse", "mean", "var", "std", "quantiles", "prob_greater", "log_density"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=1e-6, rtol=1e-6)


def test_per_row_requests_and_leading_dims():
    """(B, Q, n) logits; thresholds per row (B, Q, k), as a caller with per-curve units."""
    B, Q, n = 2, 3, 50
    borders = make_borders(n, seed=3)
    x = make_logits(B * Q, n, seed=3).reshape(B, Q, n)
    g = torch.Generator().manual_seed(3)
    thr = torch.rand(B, Q, 4, generator=g) * 1.6 - 0.3
    q = torch.rand(B, Q, 2, generator=g) * 0.9 + 0.05
    a = posterior_summary(x, borders, q, thr.double(), thr, mode="triton")  # float64 is cast
    b = posterior_summary(x, borders, q, thr, thr, mode="torch")
    assert a.mean.shape == (B, Q) and a.prob_greater.shape == (B, Q, 4)
    assert a.quantiles.shape == (B, Q, 2)
    torch.testing.assert_close(a.prob_greater, b.prob_greater, atol=2e-6, rtol=0)
    torch.testing.assert_close(a.log_density, b.log_density, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.quantiles, b.quantiles, atol=5e-5, rtol=0)


def test_no_requests_and_single_row():
    borders = make_borders(13)
    x = make_logits(1, 13)[0]  # (n,): one distribution
    a = posterior_summary(x, borders, mode="triton")
    b = posterior_summary(x, borders, mode="torch")
    assert a.mean.shape == () and a.quantiles.shape == (0,)
    torch.testing.assert_close(a.mean, b.mean, atol=2e-6, rtol=0)


def test_matches_bar_distribution_directly():
    """The twin is the model's own maths: check the kernel against BarDistribution calls."""
    n = 50
    borders = torch.linspace(-0.2, 1.2, n + 1)
    bar = BarDistribution(borders)
    x = make_logits(4, n, seed=4)
    s = posterior_summary(x, borders, [0.1, 0.9], [0.5], [0.25], mode="triton")
    torch.testing.assert_close(s.mean, bar.mean(x), atol=2e-6, rtol=0)
    torch.testing.assert_close(s.var, bar.variance(x), atol=2e-6, rtol=0)
    levels = torch.tensor([0.1, 0.9]).expand(4, 2)
    torch.testing.assert_close(s.quantiles, bar.quantile(x, levels), atol=5e-5, rtol=0)
    torch.testing.assert_close(s.prob_greater[:, 0], 1 - bar.cdf(x, torch.full((4,), 0.5)),
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(s.log_density[:, 0], bar.log_density(x, torch.full((4,), 0.25)),
                               atol=1e-4, rtol=1e-5)


def test_bucket_table_matches_bar_distribution():
    borders = make_borders(127, seed=5)
    bar = BarDistribution(borders)
    tab = BucketTable.build(borders).table
    torch.testing.assert_close(tab[2], bar.bucket_means(), atol=1e-6, rtol=1e-6)
    m2 = tab[3].double() + tab[2].double() ** 2  # within-bucket variance + mean^2 = E[Y^2]
    torch.testing.assert_close(m2.float(), bar.bucket_second_moments(), atol=1e-6, rtol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(3, 300), R=st.integers(1, 9), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.01, 1.0, 8.0, 40.0]))
def test_property_random_shapes(n, R, seed, scale):
    borders = make_borders(n, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n, generator=g) * scale
    compare(x, borders, LEVELS, probe_points(borders))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"borders": torch.linspace(0, 1, 13)}, "borders"),  # n + 2 values
        ({"borders": torch.tensor([0.0, 1.0, 0.5, 2.0] + [3.0] * 8)}, "borders"),  # unsorted
        ({"logits": torch.zeros(2, 11, dtype=torch.int32)}, "logits"),
        ({"quantiles": [0.5, 1.0]}, "quantiles"),
        ({"quantiles": [[0.5]]}, "quantiles"),
        ({"thresholds": [float("nan")]}, "thresholds"),
        ({"values": torch.zeros(3, 2)}, "values"),  # rows do not match (2,)
        ({"values": [0.0] * (MAX_VALUES + 1)}, "values"),
        ({"mode": "gpu"}, "mode"),
    ],
)
def test_wrapper_rejects_bad_inputs(kwargs, field):
    args = {"logits": torch.zeros(2, 11), "borders": torch.linspace(0, 1, 12), **kwargs}
    with pytest.raises(KernelInputError, match=f"^{field}:"):
        posterior_summary(**args)


def test_bucket_limit():
    n = MAX_BUCKETS + 1
    with pytest.raises(KernelInputError, match=f"at most {MAX_BUCKETS} buckets"):
        posterior_summary(torch.zeros(1, n), torch.linspace(0, 1, n + 1))
