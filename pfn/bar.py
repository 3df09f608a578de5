"""The bar ("Riemann") output distribution with half-normal tails.

``n`` buckets between ``n + 1`` sorted borders. Inner buckets ``1..n-2`` carry uniform density
over their interval. The outer buckets are replaced by half-normal tails that start at the inner
borders ``b[1]`` (to the left) and ``b[n-1]`` (to the right) and extend to -inf / +inf, so the
distribution has full support. Each tail's scale is chosen so that half of its mass lies within
the width of the bucket it replaces (as in PFNs' ``FullSupportBarDistribution``): the outer
borders ``b[0]`` and ``b[n]`` serve only to encode the two tails' scales.

The tails' scales are not learned: the log-density of a value in a tail is the tail bucket's
log-probability plus a half-normal term that does not depend on the logits, so training
moves the tail *mass* and never its shape. ``borders_from_samples`` therefore sets the outer
borders so that each tail's scale is the maximum-likelihood half-normal scale of the samples
beyond its inner border (``fit_tail_scales``, ``with_tail_scales``); equal-mass borders alone
would put them at the samples' minimum and maximum, whose widths (1.6 and 2.1 on the LC-PFN
prior) give scales ten times the prior's (2.4 and 3.2 against 0.22 and 0.25).

All functions take logits ``(..., n)`` and broadcast over leading dimensions; values ``y`` and
probabilities ``q`` have shape ``(...)`` or ``(..., k)`` with ``k`` values per distribution.
The same maths serves the training loss, the predictor and the Triton kernel's twin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)
_HALF_MASS = 0.5  # share of a tail's mass within the width of the bucket it replaces


def _tail_scale(width: Tensor) -> Tensor:
    # half-normal scale s with P(|N(0,s)| < width) = 0.5: width = s * sqrt(2) * erfinv(0.5)
    return width / (_SQRT2 * torch.erfinv(torch.tensor(_HALF_MASS, dtype=width.dtype)))


class BarDistribution(torch.nn.Module):
    """Bucketed density over y; ``borders`` (n+1,) strictly increasing."""

    borders: Tensor

    def __init__(self, borders: Tensor) -> None:
        super().__init__()
        if borders.ndim != 1 or borders.numel() < 4 or not bool((borders.diff() > 0).all()):
            raise ValueError("borders: need >= 4 strictly increasing values (>= 3 buckets)")
        self.register_buffer("borders", borders.detach().clone().float())

    @property
    def n_buckets(self) -> int:
        return int(self.borders.numel()) - 1

    @property
    def widths(self) -> Tensor:
        return self.borders.diff()

    def _scales(self) -> tuple[Tensor, Tensor]:
        w = self.widths
        return _tail_scale(w[0]), _tail_scale(w[-1])

    @property
    def tail_scales(self) -> tuple[float, float]:
        """The half-normal scales of the left and right tails, in y units."""
        sl, sr = self._scales()
        return float(sl), float(sr)

    @staticmethod
    def _expand(y: Tensor, logits: Tensor) -> tuple[Tensor, bool]:
        """y as (..., k): a trailing value axis per distribution."""
        if y.ndim == logits.ndim - 1:
            return y.unsqueeze(-1), True
        return y, False

    def bucket_of(self, y: Tensor) -> Tensor:
        """Index of the bucket holding y; outer buckets cover (-inf, b1) and [b_{n-1}, inf)."""
        inner = self.borders[1:-1].contiguous()
        return torch.searchsorted(inner, y.contiguous(), right=True)

    def log_density(self, logits: Tensor, y: Tensor) -> Tensor:
        """log p(y); logits (..., n), y (...) or (..., k)."""
        y, squeeze = self._expand(y.to(logits.dtype), logits)
        logp = torch.log_softmax(logits, -1)
        idx = self.bucket_of(y).clamp(0, self.n_buckets - 1)
        lp = logp.gather(-1, idx)
        b, w = self.borders, self.widths
        sl, sr = self._scales()
        inner = lp - torch.log(w[idx])
        # half-normal log-density: log(2) + log N(d; 0, s), d = distance from the inner border
        dl = (b[1] - y).clamp_min(0)
        dr = (y - b[-2]).clamp_min(0)
        c = 0.5 * math.log(2.0 / math.pi)
        left = lp + c - torch.log(sl) - 0.5 * (dl / sl) ** 2
        right = lp + c - torch.log(sr) - 0.5 * (dr / sr) ** 2
        out = torch.where(idx == 0, left, torch.where(idx == self.n_buckets - 1, right, inner))
        return out.squeeze(-1) if squeeze else out

    def expected_nll(self, logits: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
        """E[-log p(Y)] for Y ~ N(mu, sd^2), in closed form; logits (..., n), mu and sd (...).

        The training loss with Rao-Blackwellised targets: a prior curve's later value is its
        noise-free value plus Gaussian noise of a known scale, so the expected loss over that
        noise replaces the loss at one noisy draw. Its gradient is softmax(logits) minus the
        Gaussian's bucket masses (one draw: minus a one-hot), the same in expectation and
        with less variance wherever the noise spans several buckets. Inner buckets take their
        Gaussian mass; each tail its mass times (its log-probability plus the half-normal's
        log-normaliser) and the Gaussian's truncated second moment beyond the inner border,
        E[d^2; d > 0] = sd^2 ((a^2 + 1) Phi(a) + a phi(a)), a the border's z-score."""
        f64 = torch.float64
        mu, sd = mu.to(f64).unsqueeze(-1), sd.to(f64).clamp_min(1e-12).unsqueeze(-1)  # (..., 1)
        b = self.borders.to(f64)
        cdf = torch.special.ndtr((b[1:-1] - mu) / sd)  # (..., n - 1) at the inner borders
        mass = torch.cat([cdf[..., :1], cdf.diff(dim=-1), 1 - cdf[..., -1:]], -1)  # (..., n)
        logp = torch.log_softmax(logits, -1)
        w = self.widths.to(logits.dtype)
        sl, sr = self._scales()
        c = 0.5 * math.log(2.0 / math.pi)
        # per-bucket log-density terms (the tails' quadratic parts apart): (..., n)
        const = torch.cat([(c - torch.log(sl)).reshape(1), -torch.log(w[1:-1]),
                           (c - torch.log(sr)).reshape(1)]).to(logits.dtype)
        nll = -(mass.to(logits.dtype) * (logp + const)).sum(-1)

        def second_moment(a: Tensor) -> Tensor:  # E[(a - Z)^2; Z < a] for standard normal Z
            pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
            return (a * a + 1) * torch.special.ndtr(a) + a * pdf

        a_left = ((b[1] - mu) / sd)[..., 0]
        a_right = ((mu - b[-2]) / sd)[..., 0]
        quad = 0.5 * sd[..., 0] ** 2 * (second_moment(a_left) / float(sl) ** 2
                                         + second_moment(a_right) / float(sr) ** 2)
        return nll + quad.to(logits.dtype)

    def cdf(self, logits: Tensor, y: Tensor) -> Tensor:
        """P(Y <= y); logits (..., n), y (...) or (..., k)."""
        y, squeeze = self._expand(y.to(logits.dtype), logits)
        p = torch.softmax(logits, -1)
        cum = torch.cumsum(p, -1)
        before = torch.nn.functional.pad(cum, (1, 0))[..., :-1]  # mass of buckets left of i
        idx = self.bucket_of(y).clamp(0, self.n_buckets - 1)
        b, w = self.borders, self.widths
        sl, sr = self._scales()
        pi = p.gather(-1, idx)
        lo = before.gather(-1, idx)
        frac = ((y - b[idx]) / w[idx]).clamp(0, 1)
        inner = lo + pi * frac
        dl = (b[1] - y).clamp_min(0)
        dr = (y - b[-2]).clamp_min(0)
        left = pi * torch.erfc(dl / (sl * _SQRT2))  # P(Y<=y) = p0 * P(HN >= d)
        right = lo + pi * torch.erf(dr / (sr * _SQRT2))
        out = torch.where(idx == 0, left, torch.where(idx == self.n_buckets - 1, right, inner))
        out = out.clamp(0, 1)
        return out.squeeze(-1) if squeeze else out

    def quantile(self, logits: Tensor, q: Tensor) -> Tensor:
        """Inverse CDF; logits (..., n), q (...) or (..., k) in (0, 1)."""
        q, squeeze = self._expand(q.to(logits.dtype), logits)
        q = q.expand(*logits.shape[:-1], q.shape[-1]).contiguous()
        p = torch.softmax(logits, -1)
        cum = torch.cumsum(p, -1)
        idx = torch.searchsorted(cum.contiguous(), q, right=False).clamp(0, self.n_buckets - 1)
        before = torch.nn.functional.pad(cum, (1, 0))[..., :-1]
        lo = before.gather(-1, idx)
        pi = p.gather(-1, idx).clamp_min(1e-30)
        u = ((q - lo) / pi).clamp(1e-7, 1 - 1e-7)  # position inside bucket idx, in mass
        b, w = self.borders, self.widths
        sl, sr = self._scales()
        inner = b[idx] + u * w[idx]
        left = b[1] - sl * _SQRT2 * torch.erfinv(1 - u)
        right = b[-2] + sr * _SQRT2 * torch.erfinv(u)
        out = torch.where(idx == 0, left, torch.where(idx == self.n_buckets - 1, right, inner))
        return out.squeeze(-1) if squeeze else out

    def bucket_means(self) -> Tensor:
        """Mean of each bucket's component (n,); the outer ones are the half-normal means."""
        b = self.borders
        sl, sr = self._scales()
        m = (b[1:] + b[:-1]) / 2
        m = m.clone()
        m[0] = b[1] - sl * math.sqrt(2 / math.pi)
        m[-1] = b[-2] + sr * math.sqrt(2 / math.pi)
        return m

    def bucket_second_moments(self) -> Tensor:
        b, w = self.borders, self.widths
        sl, sr = self._scales()
        m2 = (b[1:] ** 2 + b[1:] * b[:-1] + b[:-1] ** 2) / 3  # E[Y^2] for U(b_i, b_{i+1})
        m2 = m2.clone()
        hn = math.sqrt(2 / math.pi)
        m2[0] = b[1] ** 2 - 2 * b[1] * sl * hn + sl**2
        m2[-1] = b[-2] ** 2 + 2 * b[-2] * sr * hn + sr**2
        del w
        return m2

    def mean(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, -1) @ self.bucket_means().to(logits.dtype)

    def variance(self, logits: Tensor) -> Tensor:
        p = torch.softmax(logits, -1)
        mu = p @ self.bucket_means().to(logits.dtype)
        return (p @ self.bucket_second_moments().to(logits.dtype) - mu**2).clamp_min(0)

    def sample(self, logits: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws per distribution: (..., n)."""
        u = torch.rand(*logits.shape[:-1], n, generator=generator, dtype=logits.dtype)
        return self.quantile(logits, u.clamp(1e-6, 1 - 1e-6))


def fit_tail_scales(values: Tensor, borders: Tensor) -> tuple[float, float]:
    """Maximum-likelihood half-normal scales of the samples beyond the inner borders ``b[1]``
    (left) and ``b[-2]`` (right): ``sqrt(mean(d^2))`` of their distances d from the border."""
    v = values.flatten().double()
    v = v[torch.isfinite(v)]
    b = borders.double()
    out = []
    for d in (b[1] - v[v < b[1]], v[v > b[-2]] - b[-2]):
        if d.numel() == 0:
            raise ValueError("fit_tail_scales: no sample beyond an inner border; draw more")
        out.append(float(d.pow(2).mean().sqrt()))
    return out[0], out[1]


def with_tail_scales(borders: Tensor, left: float, right: float) -> Tensor:
    """``borders`` with the outer two moved so that the tails' scales are ``left`` and
    ``right`` (the inner borders, hence every inner bucket, are unchanged)."""
    if not (left > 0 and right > 0 and math.isfinite(left) and math.isfinite(right)):
        raise ValueError(f"tail scales: need positive finite values, got {left}, {right}")
    half = _SQRT2 * float(torch.erfinv(torch.tensor(_HALF_MASS, dtype=torch.float64)))
    b = borders.detach().clone().double()
    b[0] = b[1] - left * half
    b[-1] = b[-2] + right * half
    return b.float()


def borders_from_samples(values: Tensor, n_buckets: int) -> Tensor:
    """Equal-mass bucket borders from samples (the prior's noisy values), n_buckets + 1 of them,
    the outer two set by the tails' fitted scales (``fit_tail_scales``)."""
    v = values.flatten().double()
    v = v[torch.isfinite(v)].sort().values
    q = torch.linspace(0, 1, n_buckets + 1, dtype=torch.float64)
    pos = q * (v.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    borders = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    # strictly increasing (ties can occur in float data): enforce a minimum spacing
    eps = 1e-6 * float(v[-1] - v[0])
    for i in range(1, borders.numel()):
        if borders[i] <= borders[i - 1] + eps:
            borders[i] = borders[i - 1] + eps
    try:
        return with_tail_scales(borders, *fit_tail_scales(v, borders))
    except ValueError:  # too few samples to reach beyond the inner borders: min and max
        return borders.float()
