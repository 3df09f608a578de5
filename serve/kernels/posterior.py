"""The fused posterior head: bucket logits -> posterior summaries, in one pass over the buckets.

For each row (one query of one curve) the kernel loads the row's logits once (the whole row
sits in registers: ``n_buckets <= MAX_BUCKETS``) and computes, without writing the
probabilities anywhere:

* ``lse``: the softmax normaliser (log-sum-exp of the logits);
* ``mean``, ``var``, ``std`` of the bar distribution;
* ``quantiles``: the inverse CDF at the requested probabilities (half-normal tails);
* ``prob_greater``: P(Y > t) at the requested thresholds;
* ``log_density``: log p(y) at the requested values.

The maths is ``pfn.bar.BarDistribution``'s (the twin calls it): inner buckets uniform, the two
outer buckets half-normal tails from ``b[1]`` / ``b[n-1]``. Two formulations differ, both
exact in real arithmetic: the CDF is ``sum_i p_i F_i(t)`` with each bucket's own CDF ``F_i``
(no prefix sums needed), and the variance is ``sum_i p_i ((m_i - mean)^2 + v_i)`` with the
bucket means ``m_i`` and within-bucket variances ``v_i`` (no ``E[Y^2] - mean^2``
cancellation, so the kernel is the more accurate of the two in fp32). Everything is fp32
inside; fp16/bf16 logits are loaded and cast.

Thresholds and values are on the model's normalised scale (that of the borders); a caller
with per-curve affine units passes per-row values (shape (..., k)) already normalised, and
per-row quantile levels ``1 - q`` where the map is decreasing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from pfn.bar import BarDistribution
from serve.kernels._common import (
    KernelInputError,
    KernelMode,
    Launch,
    check_float,
    is_interpreted,
    next_pow2,
    use_triton,
)

MAX_BUCKETS = 8192  # one row of logits is held in registers
MAX_VALUES = 64  # per request kind (quantiles, thresholds, values): the loops are unrolled
_SQRT2 = math.sqrt(2.0)
_HN_MEAN = math.sqrt(2.0 / math.pi)  # E|N(0, 1)|
_LOG_HN_NORM = 0.5 * math.log(2.0 / math.pi)  # log(2 / sqrt(2 pi))

Values = Sequence[float] | np.ndarray | Tensor


@dataclass(frozen=True)
class PosteriorSummary:
    """fp32 summaries; leading shape (...) is the logits' without the bucket axis."""

    lse: Tensor  # (...) log-sum-exp of the logits (softmax normaliser)
    mean: Tensor  # (...)
    var: Tensor  # (...)
    std: Tensor  # (...)
    quantiles: Tensor  # (..., n_quantiles)
    prob_greater: Tensor  # (..., n_thresholds) P(Y > threshold)
    log_density: Tensor  # (..., n_values) log p(value)


@triton.jit
def _erfinv(x):
    """Giles (2010) single-precision erfinv, max relative error ~3e-7 on (-1, 1)."""
    w = -tl.log((1.0 - x) * (1.0 + x))
    a = w - 2.5
    p = 2.81022636e-08
    p = 3.43273939e-07 + p * a
    p = -3.5233877e-06 + p * a
    p = -4.39150654e-06 + p * a
    p = 0.00021858087 + p * a
    p = -0.00125372503 + p * a
    p = -0.00417768164 + p * a
    p = 0.246640727 + p * a
    p = 1.50140941 + p * a
    c = tl.sqrt(w) - 3.0
    r = -0.000200214257
    r = 0.000100950558 + r * c
    r = 0.00134934322 + r * c
    r = -0.00367342844 + r * c
    r = 0.00573950773 + r * c
    r = -0.0076224613 + r * c
    r = 0.00943887047 + r * c
    r = 1.00167406 + r * c
    r = 2.83297682 + r * c
    return tl.where(w < 5.0, p, r) * x


@triton.jit
def _posterior_kernel(
    X, sx_r,  # logits (R, N), unit stride along buckets
    TABLE,  # (4, N) fp32: left border, width, bucket mean, within-bucket variance
    QS, sq_r, THR, st_r, VAL, sv_r,  # (R or 1, NQ / NT / NV) fp32, row stride 0 = shared
    STATS,  # (4, R) fp32 out: lse, mean, var, std
    OQ, OP, OL,  # (R, NQ), (R, NT), (R, NV) fp32 out, contiguous
    R, N,
    b_lo, b_hi, s_lo, s_hi,  # inner borders b[1], b[N-1] and the tails' half-normal scales
    NQ: tl.constexpr, NT: tl.constexpr, NV: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # requested values handled together (a (R, K, N) tile)
    BLOCK_N: tl.constexpr,  # >= N: the whole row
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    r_ok = rows < R
    c_ok = cols < N
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * sx_r + cols[None, :], mask=r_ok[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_N)
    x = tl.where(c_ok[None, :], x, float("-inf"))
    mx = tl.max(x, 1)
    e = tl.exp(x - mx[:, None])
    z = tl.sum(e, 1)
    p = e / z[:, None]  # probabilities: registers only
    lse = mx + tl.log(z)

    left = tl.load(TABLE + cols, mask=c_ok, other=0.0)
    width = tl.load(TABLE + N + cols, mask=c_ok, other=1.0)
    bmean = tl.load(TABLE + 2 * N + cols, mask=c_ok, other=0.0)
    bvar = tl.load(TABLE + 3 * N + cols, mask=c_ok, other=0.0)
    mean = tl.sum(p * bmean[None, :], 1)
    dev = bmean[None, :] - mean[:, None]
    var = tl.sum(p * (dev * dev + bvar[None, :]), 1)
    tl.store(STATS + rows, lse, mask=r_ok)
    tl.store(STATS + R + rows, mean, mask=r_ok)
    tl.store(STATS + 2 * R + rows, var, mask=r_ok)
    tl.store(STATS + 3 * R + rows, tl.sqrt(var), mask=r_ok)

    # requests: (BLOCK_R, BLOCK_K) values against the (BLOCK_R, 1, BLOCK_N) row
    p3 = p[:, None, :]
    x3 = x[:, None, :]
    cols3 = cols[None, None, :]
    in3 = (cols3 < N) & (cols3 >= 1)  # buckets 1..N-1: their left borders are inner borders
    left3 = left[None, None, :]
    inv_w3 = (1.0 / width)[None, None, :]

    # P(Y > t) = 1 - sum_i p_i F_i(t), F_i the CDF of bucket i's own component
    for k0 in tl.static_range(0, NT, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rk_ok = r_ok[:, None] & (ks < NT)[None, :]
        t = tl.load(THR + rows64[:, None] * st_r + ks[None, :], mask=rk_ok, other=0.0)
        f_in = tl.minimum(tl.maximum((t[:, :, None] - left3) * inv_w3, 0.0), 1.0)
        f_lo = 1.0 - tl.erf(tl.maximum(b_lo - t, 0.0) / (s_lo * 1.4142135623730951))
        f_hi = tl.erf(tl.maximum(t - b_hi, 0.0) / (s_hi * 1.4142135623730951))
        f = tl.where(cols3 == 0, f_lo[:, :, None], tl.where(cols3 == N - 1, f_hi[:, :, None], f_in))
        cdf = tl.minimum(tl.maximum(tl.sum(p3 * f, 2), 0.0), 1.0)
        tl.store(OP + rows64[:, None] * NT + ks[None, :], 1.0 - cdf, mask=rk_ok)

    # log p(y): the bucket's log-probability plus its component's log-density
    for k0 in tl.static_range(0, NV, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        rk_ok = r_ok[:, None] & (ks < NV)[None, :]
        y = tl.load(VAL + rows64[:, None] * sv_r + ks[None, :], mask=rk_ok, other=0.0)
        # bucket of y = number of inner borders b[1..N-1] <= y
        idx = tl.sum((in3 & (left3 <= y[:, :, None])).to(tl.int32), 2)
        lp = tl.sum(tl.where(cols3 == idx[:, :, None], x3, 0.0), 2) - lse[:, None]
        w_idx = tl.load(TABLE + N + idx, mask=rk_ok, other=1.0)
        d_lo = tl.maximum(b_lo - y, 0.0) / s_lo
        d_hi = tl.maximum(y - b_hi, 0.0) / s_hi
        # half-normal: log 2 + log N(d; 0, s) = 0.5 log(2/pi) - log s - d^2/2
        ld_lo = lp - 0.22579135264472744 - tl.log(s_lo) - 0.5 * d_lo * d_lo
        ld_hi = lp - 0.22579135264472744 - tl.log(s_hi) - 0.5 * d_hi * d_hi
        ld = tl.where(idx == 0, ld_lo, tl.where(idx == N - 1, ld_hi, lp - tl.log(w_idx)))
        tl.store(OL + rows64[:, None] * NV + ks[None, :], ld, mask=rk_ok)

    # quantiles: the first bucket whose cumulative mass reaches q, then invert inside it
    if NQ > 0:
        cum3 = tl.cumsum(p, 1)[:, None, :]
        for k0 in tl.static_range(0, NQ, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            rk_ok = r_ok[:, None] & (ks < NQ)[None, :]
            q = tl.load(QS + rows64[:, None] * sq_r + ks[None, :], mask=rk_ok, other=0.5)
            idx = tl.sum(((cum3 < q[:, :, None]) & (cols3 < N)).to(tl.int32), 2)
            idx = tl.minimum(idx, N - 1)
            p_idx = tl.sum(tl.where(cols3 == idx[:, :, None], p3, 0.0), 2)
            lo = tl.sum(tl.where(cols3 == idx[:, :, None] - 1, cum3, 0.0), 2)  # mass before
            u = (q - lo) / tl.maximum(p_idx, 1e-30)
            u = tl.minimum(tl.maximum(u, 1e-7), 1.0 - 1e-7)  # position inside bucket, in mass
            inner = (tl.load(TABLE + idx, mask=rk_ok, other=0.0)
                     + u * tl.load(TABLE + N + idx, mask=rk_ok, other=0.0))
            q_lo = b_lo - s_lo * 1.4142135623730951 * _erfinv(1.0 - u)
            q_hi = b_hi + s_hi * 1.4142135623730951 * _erfinv(u)
            out = tl.where(idx == 0, q_lo, tl.where(idx == N - 1, q_hi, inner))
            tl.store(OQ + rows64[:, None] * NQ + ks[None, :], out, mask=rk_ok)


INTERPRETED = is_interpreted(_posterior_kernel)


# --------------------------------------------------------------------------- the bucket table


@dataclass(frozen=True)
class BucketTable:
    """Per-bucket constants of one set of borders, computed in float64, stored fp32."""

    table: Tensor  # (4, n) fp32: left border, width, bucket mean, within-bucket variance
    b_lo: float  # b[1]
    b_hi: float  # b[n-1]
    s_lo: float  # left tail's half-normal scale
    s_hi: float  # right tail's half-normal scale

    @property
    def n_buckets(self) -> int:
        return int(self.table.shape[1])

    @staticmethod
    def build(borders: Tensor) -> BucketTable:
        try:
            BarDistribution(borders)  # the same validation as the model's
        except ValueError as e:
            raise KernelInputError("borders", str(e), "pass the model's bar.borders") from e
        b = borders.detach().to("cpu", torch.float64)
        w = b.diff()
        half = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(0.5, dtype=torch.float64)))
        s_lo, s_hi = float(w[0]) / half, float(w[-1]) / half
        mean = (b[1:] + b[:-1]) / 2
        var = w**2 / 12  # uniform on the bucket
        mean[0], var[0] = b[1] - s_lo * _HN_MEAN, s_lo**2 * (1 - 2 / math.pi)  # half-normals
        mean[-1], var[-1] = b[-2] + s_hi * _HN_MEAN, s_hi**2 * (1 - 2 / math.pi)
        table = torch.stack([b[:-1], w, mean, var]).float().to(borders.device)
        return BucketTable(table, float(b[1]), float(b[-2]), s_lo, s_hi)


# id(borders) -> (weak reference, _version, device, table); borders are long-lived model buffers
_TABLES: dict[int, tuple[weakref.ref[Tensor], int, torch.device, BucketTable]] = {}


def bucket_table(borders: Tensor, device: torch.device) -> BucketTable:
    """The table for ``borders`` on ``device``, cached while ``borders`` lives unchanged."""
    hit = _TABLES.get(id(borders))
    version = borders._version if not borders.is_inference() else 0
    if hit is not None and hit[0]() is borders and hit[1] == version and hit[2] == device:
        return hit[3]
    tab = BucketTable.build(borders.to(device))
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[id(borders)] = (weakref.ref(borders), version, device, tab)
    return tab


# ------------------------------------------------------------------------------ the wrapper


def _rows_of(name: str, v: Values | None, lead: tuple[int, ...], device: torch.device,
             unit_interval: bool = False) -> Tensor:
    """Requested values as fp32 (1, k) shared by all rows, or (R, k) per row."""
    if v is None:
        return torch.empty(1, 0, device=device)
    if not isinstance(v, Tensor):
        a = np.asarray(v, dtype=np.float64)
        if a.ndim > 1 or not np.isfinite(a).all():
            raise KernelInputError(name, f"must be a finite 1-D sequence, got {v!r}",
                                   f"pass {name} as a list of numbers")
        if unit_interval and a.size and not ((a > 0) & (a < 1)).all():
            raise KernelInputError(name, f"must lie strictly in (0, 1), got {a.tolist()}",
                                   "pass probabilities such as [0.05, 0.5, 0.95]")
        v = torch.as_tensor(a.reshape(-1), dtype=torch.float32)
    if v.device != device:
        v = v.to(device)
    if not v.is_floating_point():
        raise KernelInputError(name, f"dtype must be floating point, got {v.dtype}",
                               f"pass {name} as floats")
    if v.ndim == 0:
        v = v.reshape(1)
    k = v.shape[-1]
    if v.ndim == 1:
        out = v.reshape(1, k)
    elif tuple(v.shape[:-1]) == lead:
        out = v.reshape(-1, k)
    else:
        raise KernelInputError(name, f"shape {tuple(v.shape)} fits neither (k,) nor "
                               f"{(*lead, 'k')}", "pass one set for all rows or one per row")
    if k > MAX_VALUES:
        raise KernelInputError(name, f"at most {MAX_VALUES} per call, got {k}",
                               "split the request")
    return out.float().contiguous()


def posterior_torch(logits: Tensor, borders: Tensor, quantiles: Tensor, thresholds: Tensor,
                    values: Tensor) -> PosteriorSummary:
    """The twin: ``BarDistribution`` on fp32 logits (R, n); requests as from ``_rows_of``."""
    try:
        bar = BarDistribution(borders.to(logits.device))
    except ValueError as e:
        raise KernelInputError("borders", str(e), "pass the model's bar.borders") from e
    x = logits.float()
    R = x.shape[0]

    def rows(v: Tensor) -> Tensor:
        return v.expand(R, v.shape[1])

    var = bar.variance(x)
    return PosteriorSummary(
        lse=torch.logsumexp(x, -1), mean=bar.mean(x), var=var, std=var.sqrt(),
        quantiles=bar.quantile(x, rows(quantiles)) if quantiles.shape[1] else x.new_empty(R, 0),
        prob_greater=1.0 - bar.cdf(x, rows(thresholds)) if thresholds.shape[1]
        else x.new_empty(R, 0),
        log_density=bar.log_density(x, rows(values)) if values.shape[1] else x.new_empty(R, 0),
    )


def _row_stride(v: Tensor) -> int:
    return v.stride(0) if v.shape[0] > 1 else 0  # 0: one set shared by all rows


def posterior_launch(logits: Tensor, tab: BucketTable, quantiles: Tensor, thresholds: Tensor,
                     values: Tensor, stats: Tensor, oq: Tensor, op: Tensor, ol: Tensor,
                     block_r: int | None = None, block_k: int | None = None) -> Launch:
    R, n = logits.shape
    nq, nt, nv = quantiles.shape[1], thresholds.shape[1], values.shape[1]
    block_n = max(16, next_pow2(n))
    k_max = next_pow2(max(nq, nt, nv, 1))
    if INTERPRETED:  # few, wide programs: each interpreted program costs milliseconds
        block_r = block_r or min(16, next_pow2(R))
        block_k = block_k or min(16, k_max)
    else:  # a (BLOCK_R, BLOCK_K, BLOCK_N) tile of <= 4096 fp32 values
        block_r = block_r or max(1, min(16, 1024 // block_n))
        block_k = block_k or max(1, min(k_max, 4096 // (block_r * block_n)))
    return Launch(
        grid=(triton.cdiv(R, block_r),),
        args=dict(X=logits, sx_r=logits.stride(0), TABLE=tab.table,
                  QS=quantiles, sq_r=_row_stride(quantiles),
                  THR=thresholds, st_r=_row_stride(thresholds),
                  VAL=values, sv_r=_row_stride(values),
                  STATS=stats, OQ=oq, OP=op, OL=ol, R=R, N=n,
                  b_lo=tab.b_lo, b_hi=tab.b_hi, s_lo=tab.s_lo, s_hi=tab.s_hi),
        constexprs=dict(NQ=nq, NT=nt, NV=nv, BLOCK_R=block_r, BLOCK_K=block_k,
                        BLOCK_N=block_n),
        num_warps=4 if block_r * block_k * block_n <= 2048 else 8,
    )


def posterior_triton(logits: Tensor, borders: Tensor, quantiles: Tensor, thresholds: Tensor,
                     values: Tensor, block_r: int | None = None,
                     block_k: int | None = None) -> PosteriorSummary:
    """The kernel on logits (R, n) with unit bucket stride; requests as from ``_rows_of``."""
    R, _ = logits.shape
    tab = bucket_table(borders, logits.device)
    dev = logits.device
    stats = torch.empty(4, R, device=dev, dtype=torch.float32)
    oq = torch.empty(R, quantiles.shape[1], device=dev, dtype=torch.float32)
    op = torch.empty(R, thresholds.shape[1], device=dev, dtype=torch.float32)
    ol = torch.empty(R, values.shape[1], device=dev, dtype=torch.float32)
    if R:
        posterior_launch(logits, tab, quantiles, thresholds, values, stats, oq, op, ol,
                         block_r, block_k).run(_posterior_kernel)
    return PosteriorSummary(stats[0], stats[1], stats[2], stats[3], oq, op, ol)


def posterior_summary(logits: Tensor, borders: Tensor, quantiles: Values | None = None,
                      thresholds: Values | None = None, values: Values | None = None,
                      mode: KernelMode = "auto") -> PosteriorSummary:
    """Summaries of the bar distributions given by ``logits`` (..., n_buckets) and ``borders``
    (n_buckets + 1,), on the borders' (normalised) scale.

    ``quantiles`` (levels in (0, 1)), ``thresholds`` (for P(Y > t)) and ``values`` (for
    log p(y)): each a sequence of k numbers shared by all rows, or a tensor (k,) or (..., k)
    per row. ``mode``: "auto" runs the fused kernel on CUDA and the torch twin elsewhere.
    """
    if not isinstance(logits, Tensor) or logits.ndim < 1:
        raise KernelInputError("logits", "must be a tensor (..., n_buckets)",
                               "pass the model's logits")
    check_float("logits", logits)
    if not isinstance(borders, Tensor) or borders.ndim != 1:
        raise KernelInputError("borders", "must be a 1-D tensor (n_buckets + 1,)",
                               "pass the model's bar.borders")
    n = logits.shape[-1]
    if borders.numel() != n + 1:
        raise KernelInputError("borders", f"need n_buckets + 1 = {n + 1} values, got "
                               f"{borders.numel()}", "pass the borders of the model that "
                               "produced the logits")
    if n > MAX_BUCKETS:
        raise KernelInputError("logits", f"at most {MAX_BUCKETS} buckets, got {n}",
                               "use mode 'torch'")
    lead = tuple(logits.shape[:-1])
    dev = logits.device
    qs = _rows_of("quantiles", quantiles, lead, dev, unit_interval=True)
    th = _rows_of("thresholds", thresholds, lead, dev)
    va = _rows_of("values", values, lead, dev)
    x = logits.reshape(-1, n)  # (R, n)
    if use_triton(mode, x, INTERPRETED, torch.is_grad_enabled() and x.requires_grad):
        out = posterior_triton(x if x.stride(-1) == 1 else x.contiguous(), borders, qs, th, va)
    else:
        out = posterior_torch(x, borders, qs, th, va)
    return PosteriorSummary(
        lse=out.lse.reshape(lead), mean=out.mean.reshape(lead), var=out.var.reshape(lead),
        std=out.std.reshape(lead), quantiles=out.quantiles.reshape(*lead, -1),
        prob_greater=out.prob_greater.reshape(*lead, -1),
        log_density=out.log_density.reshape(*lead, -1),
    )
