"""MCMC reference posterior predictive for the curve prior (the paper's MCMC-PP baseline).

Given the first observed points of noisy curves, :func:`mcmc_posterior_predictive` samples the
posterior of every curve parameter, the component weights and the noise scale under exactly the
prior and likelihood :class:`~prior.core.CurvePrior` defines, and returns the posterior
predictive as the mixture over the draws of ``N(y; f_theta(x), sigma^2)``.

Model. ``theta`` is an unconstrained vector per curve: ``logit`` of each ``U(0,1)`` weight; for
each basis parameter, its *standard draw* as :meth:`ParamPrior.transform` reads it (``logit`` of
the ``U(0,1)`` draw for uniform kinds, the ``N(0,1)`` draw itself for normal / lognormal kinds);
the standardised ``log sigma``. The log prior in these coordinates is the standard densities
with the logit Jacobians, ``-inf`` unless the noise-free curve over the prior's whole epoch grid
``1..m`` satisfies the prior's rules (``f(m) > f(1)``, inside ``[0, 1]``, no NaN); the
likelihood is i.i.d. Gaussian noise at the observed epochs.

Sampler. The affine-invariant ensemble sampler with the stretch move (Goodman & Weare 2010; the
emcee algorithm the paper used), vectorised over curves x walkers: one tensor holds all walkers
of a chunk of curves, each half-ensemble update is one batched log-posterior evaluation. Walkers
start at the best ``n_walkers`` (by posterior density, noise profiled) of a shared pool of
accepted prior draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from prior.basis import BASES, ParamPrior
from prior.core import CurvePrior

Tensor = torch.Tensor
_UNIFORM_KINDS = ("uniform", "exp_uniform", "one_minus_exp_uniform")
_STRETCH_A = 2.0  # stretch-move scale (emcee's default)
_EPS = 1e-12


class _Model:
    """The unconstrained parameterisation of a CurvePrior and its log posterior."""

    def __init__(self, prior: CurvePrior, dtype: torch.dtype) -> None:
        self.prior = prior
        self.dtype = dtype  # dtype of curve evaluation
        self.k = len(prior.components)
        self.specs: list[tuple[int, ParamPrior]] = [
            (j, p) for j, c in enumerate(prior.components) for p in BASES[c].params
        ]
        self.uniform = torch.tensor([p.dist in _UNIFORM_KINDS for _, p in self.specs])
        self.dim = self.k + len(self.specs) + 1
        self.names = (
            [f"w_{c}" for c in prior.components]
            + [f"{prior.components[j]}.{p.name}" for j, p in self.specs]
            + ["log_sigma"]
        )

    # --- coordinates -------------------------------------------------------------------------
    def to_params(self, th: Tensor) -> tuple[Tensor, list[dict[str, Tensor]], Tensor]:
        """theta (B, D) -> weights (B, K), per-component params (B, 1), log sigma (B,)."""
        w = torch.sigmoid(th[:, : self.k])
        params: list[dict[str, Tensor]] = [{} for _ in range(self.k)]
        for i, (j, p) in enumerate(self.specs):
            u = th[:, self.k + i]
            r = torch.sigmoid(u) if p.dist in _UNIFORM_KINDS else u
            params[j][p.name] = p.transform(r)[:, None]
        ls = self.prior.log_sigma_mean + self.prior.log_sigma_std * th[:, -1]
        return w, params, ls

    def from_params(self, w: Tensor, params: list[dict[str, Tensor]], ls: Tensor) -> Tensor:
        """Inverse of :meth:`to_params` (float64)."""
        cols = [_logit(w[:, j].double()) for j in range(self.k)]
        for j, p in self.specs:
            cols.append(_standard(p, params[j][p.name][:, 0].double()))
        cols.append((ls.double() - self.prior.log_sigma_mean) / self.prior.log_sigma_std)
        return torch.stack(cols, 1)

    def log_prior_free(self, th: Tensor) -> Tensor:
        """Unconstrained log prior density of theta (B, D), without the support rules."""
        u = th[:, self.k : -1]
        uni = self.uniform.to(th.device)
        lu = torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u)
        lw = th[:, : self.k]
        lw = torch.nn.functional.logsigmoid(lw) + torch.nn.functional.logsigmoid(-lw)
        return lw.sum(1) + torch.where(uni, lu, -0.5 * u * u).sum(1) - 0.5 * th[:, -1] ** 2

    def curves(self, th: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Noise-free curves f (B, L) at x (L,) in ``self.dtype`` and log sigma (B,)."""
        w, params, ls = self.to_params(th)
        w = w.to(self.dtype)
        p = [{nm: v.to(self.dtype) for nm, v in d.items()} for d in params]
        comps = self.prior.components
        f = w[:, :1] * BASES[comps[0]].fn(x, p[0])
        for j in range(1, self.k):
            f = f + w[:, j : j + 1] * BASES[comps[j]].fn(x, p[j])
        return f, ls

    def log_parts(self, th: Tensor, xs: Tensor, obs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Log prior (-inf outside the support) and log likelihood (up to constants) of theta
        (N, H, D) given y (N, c) at xs[obs]; xs (L,) starts with the prior's grid 1..m."""
        n, h, d = th.shape
        flat = th.reshape(n * h, d)
        f, ls = self.curves(flat, xs)  # (N*H, L)
        m = self.prior.n_epochs
        g = f[:, :m]
        ok = (g[:, -1] > g[:, 0]) & ~g.isnan().any(1)
        if self.prior.range_constraint:
            ok &= ((g >= 0) & (g <= 1)).all(1)
        r = (y.to(self.dtype)[:, None, :] - f[:, obs].view(n, h, -1)) * torch.exp(-ls).view(
            n, h, 1
        ).to(self.dtype)  # (N, H, c) standardised residuals
        ll = -0.5 * r.square().sum(2).double() - obs.numel() * ls.view(n, h)
        lpr = self.log_prior_free(flat).view(n, h)
        ok = ok.view(n, h) & ~ll.isnan() & ~lpr.isnan()
        inf = torch.full_like(ll, -math.inf)
        return torch.where(ok, lpr, inf), torch.where(ok, ll, inf)

    def log_post(self, th: Tensor, xs: Tensor, obs: Tensor, y: Tensor) -> Tensor:
        lpr, ll = self.log_parts(th, xs, obs, y)
        return lpr + ll


def _logit(r: Tensor) -> Tensor:
    r = r.clamp(_EPS, 1 - _EPS)
    return torch.log(r) - torch.log1p(-r)


def _standard(p: ParamPrior, v: Tensor) -> Tensor:
    """The unconstrained coordinate of value v of parameter prior p (inverse of transform)."""
    if p.dist == "normal":
        return (v - p.a) / p.b
    if p.dist == "lognormal":
        return (v.log() - p.a) / p.b
    if p.dist == "exp_uniform":
        v = v.log()
    elif p.dist == "one_minus_exp_uniform":
        v = torch.log1p(-v)
    return _logit((v - p.a) / (p.b - p.a))


def _union(grid: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Points grid + (x not on the grid), and the index of each x in them."""
    hit = x[:, None] == grid[None, :]
    found = hit.any(1)
    extra = x[~found]
    xs = torch.cat([grid, extra])
    idx = hit.to(torch.int64).argmax(1)
    idx[~found] = grid.numel() + torch.arange(extra.numel())
    return xs, idx


# --- diagnostics ------------------------------------------------------------------------------
def split_rhat(chains: Tensor) -> Tensor:
    """Split R-hat (Gelman et al. 2013) of chains (..., C, T) over the last two dims -> (...)."""
    t = chains.shape[-1] // 2
    c = torch.cat([chains[..., :t], chains[..., t : 2 * t]], -2).double()  # (..., 2C, t)
    w = c.var(-1).mean(-1)
    b_over_n = c.mean(-1).var(-1)
    var = (t - 1) / t * w + b_over_n
    return torch.sqrt(var / w.clamp_min(_EPS * _EPS))


def ensemble_ess(chains: Tensor, c: float = 5.0) -> Tensor:
    """Effective sample size of walkers (..., W, T): W*T / tau, with tau the integrated
    autocorrelation time of the walker-averaged autocorrelation function and Sokal's automatic
    window (the estimator emcee recommends for ensembles)."""
    w, t = chains.shape[-2:]
    x = chains.double() - chains.double().mean(-1, keepdim=True)
    nfft = 1 << (2 * t - 1).bit_length()
    fx = torch.fft.rfft(x, n=nfft)
    acf = torch.fft.irfft(fx * fx.conj(), n=nfft)[..., :t].mean(-2)  # (..., T)
    acf = acf / acf[..., :1].clamp_min(1e-300)
    taus = 2.0 * acf.cumsum(-1) - 1.0  # tau estimate for each window size M
    m = torch.arange(t, dtype=taus.dtype)
    ok = m < c * taus
    window = torch.where(ok.all(-1), t - 1, (~ok).to(torch.int64).argmax(-1))
    tau = taus.gather(-1, window[..., None])[..., 0].clamp_min(1.0)
    return w * t / tau


# --- result -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCMCSettings:
    """How a reference posterior was sampled."""

    n_walkers: int  # ensemble size per curve
    n_samples: int  # stretch-move steps per walker after burn-in
    burn_in: int  # discarded steps per walker
    thin: int  # keep every thin-th step after burn-in
    init_pool: int  # accepted prior draws scored to pick the starting walkers
    dtype: str  # dtype of the curve evaluation ("float32" or "float64")
    de_fraction: float = 0.0  # share of differential-evolution moves (rest: stretch moves)


@dataclass(frozen=True)
class MCMCResult:
    """Posterior draws for n curves and their posterior predictive at ``x_query``.

    Draws are kept per walker and step (thinned) so diagnostics can be recomputed; the
    predictive is the equal-weight mixture over all ``n_walkers * n_kept`` draws."""

    prior: CurvePrior  # the prior sampled under
    x_query: Tensor  # (Q,) query epochs
    theta: Tensor  # (n, W, T, D) float32 unconstrained draws (see module docstring)
    log_prob: Tensor  # (n, W, T) float64 log posterior (up to a constant) of each draw
    acceptance: Tensor  # (n,) share of accepted stretch moves (burn-in included)
    rhat: Tensor  # (n, 3) split R-hat of (log sigma, f at last query epoch, log posterior)
    ess: Tensor  # (n, 3) ensemble effective sample size of the same quantities
    rhat_params: Tensor  # (n,) max split R-hat over all D coordinates of theta
    seconds: float  # wall time of the whole call
    settings: MCMCSettings
    names: tuple[str, ...] = field(default=())  # names of the D coordinates of theta
    chunk: int = 64  # curves per chunk when evaluating the predictive

    @property
    def n_curves(self) -> int:
        return int(self.theta.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self.theta.shape[1] * self.theta.shape[2])

    @property
    def seconds_per_curve(self) -> float:
        return self.seconds / max(self.n_curves, 1)

    def draws(self) -> Tensor:
        """(n, S, D) float64 draws, S = W * T."""
        return self.theta.flatten(1, 2).double()

    def _predictive(self) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Per chunk of curves: (rows, f at x_query (n_c, S, Q) float64, sigma (n_c, S, 1))."""
        model = _Model(self.prior, torch.float64)
        th = self.draws()
        for s in range(0, self.n_curves, self.chunk):
            t = th[s : s + self.chunk]
            nc, ns, d = t.shape
            f, ls = model.curves(t.reshape(nc * ns, d), self.x_query.double())
            yield slice(s, s + nc), f.view(nc, ns, -1), ls.exp().view(nc, ns, 1)

    def log_density(self, y_query: Tensor) -> Tensor:
        """log p(y_query | observed) (n, Q): the exact mixture over the draws (logsumexp)."""
        if y_query.shape != (self.n_curves, self.x_query.numel()):
            raise ValueError(
                f"y_query: expected shape {(self.n_curves, self.x_query.numel())}, "
                f"got {tuple(y_query.shape)}"
            )
        out = torch.empty(y_query.shape, dtype=torch.float64)
        yq = y_query.double()
        for rows, f, sig in self._predictive():
            z = (yq[rows][:, None, :] - f) / sig
            lp = -0.5 * z * z - sig.log() - 0.5 * math.log(2 * math.pi)
            out[rows] = torch.logsumexp(lp, 1) - math.log(f.shape[1])
        return out

    def mean(self) -> Tensor:
        """Posterior predictive mean (n, Q)."""
        out = torch.empty(self.n_curves, self.x_query.numel(), dtype=torch.float64)
        for rows, f, _ in self._predictive():
            out[rows] = f.mean(1)
        return out

    def quantile(self, qs: Sequence[float], iters: int = 50) -> Tensor:
        """Posterior predictive quantiles (n, Q, len(qs)) by bisection on the mixture CDF."""
        q = torch.tensor(list(qs), dtype=torch.float64)
        if q.numel() == 0 or bool(((q <= 0) | (q >= 1)).any()):
            raise ValueError(f"qs: need probabilities strictly inside (0, 1), got {list(qs)}")
        out = torch.empty(self.n_curves, self.x_query.numel(), q.numel(), dtype=torch.float64)
        for rows, f, sig in self._predictive():
            lo = (f - 8 * sig).amin(1)[..., None].expand(-1, -1, q.numel()).clone()
            hi = (f + 8 * sig).amax(1)[..., None].expand(-1, -1, q.numel()).clone()
            for _ in range(iters):
                mid = 0.5 * (lo + hi)  # (n_c, Q, nq)
                z = (mid[:, None] - f[..., None]) / sig[..., None]  # (n_c, S, Q, nq)
                cdf = torch.special.ndtr(z).mean(1)
                below = cdf < q
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            out[rows] = 0.5 * (lo + hi)
        return out

    def summary(self) -> dict[str, float]:
        """Convergence and cost in a few numbers (medians and tails over curves)."""
        r = self.rhat.max(1).values
        e = self.ess.min(1).values
        return {
            "n_curves": float(self.n_curves),
            "n_draws": float(self.n_draws),
            "rhat_median": float(r.median()),
            "rhat_p90": float(r.quantile(0.9)),
            "rhat_max": float(r.max()),
            "frac_rhat_below_1.1": float((r < 1.1).double().mean()),
            "rhat_params_median": float(self.rhat_params.median()),
            "ess_median": float(e.median()),
            "ess_p10": float(e.quantile(0.1)),
            "acceptance_mean": float(self.acceptance.mean()),
            "seconds": self.seconds,
            "seconds_per_curve": self.seconds_per_curve,
        }


# --- sampler ------------------------------------------------------------------------------------
def _initial_walkers(
    model: _Model,
    pool: Tensor,
    pool_f: Tensor,
    pool_lp: Tensor,
    y: Tensor,
    n_walkers: int,
) -> Tensor:
    """The n_walkers best pool draws for each curve (N, W, D), log sigma at its conditional
    mode given the draw's residuals."""
    c = y.shape[1]
    y = y.double()
    sse = (y * y).sum(1, keepdim=True) - 2 * y @ pool_f.T + (pool_f * pool_f).sum(1)  # (N, P)
    sse = sse.clamp_min(1e-12)
    # mode of -c*ls - sse/(2 e^{2 ls}) - ((ls - mu)/s)^2/2: a few Newton steps from 0.5 log(sse/c)
    mu, s = model.prior.log_sigma_mean, model.prior.log_sigma_std
    ls = 0.5 * torch.log(sse / c)
    for _ in range(8):
        e = sse * torch.exp(-2 * ls)
        grad = -c + e - (ls - mu) / s**2
        hess = -2 * e - 1 / s**2
        ls = ls - grad / hess
    z = (ls - mu) / s
    score = -c * ls - 0.5 * sse * torch.exp(-2 * ls) - 0.5 * z * z + pool_lp
    best = score.topk(n_walkers, 1).indices  # (N, W)
    th = pool[best].clone()  # (N, W, D)
    th[..., -1] = z.gather(1, best)
    return th


def _run_chunk(
    model: _Model,
    xs: Tensor,
    obs: Tensor,
    y: Tensor,
    th: Tensor,
    settings: MCMCSettings,
    g: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stretch-move ensemble MCMC for a chunk of curves; returns kept theta (N, W, T, D),
    log posterior (N, W, T), acceptance rate (N,)."""
    n, w, d = th.shape
    h = w // 2
    lp = model.log_post(th, xs, obs, y)
    n_keep = settings.n_samples // settings.thin
    kept = torch.empty(n, w, n_keep, d, dtype=torch.float32)
    kept_lp = torch.empty(n, w, n_keep, dtype=torch.float64)
    accepted = torch.zeros(n, dtype=torch.float64)
    a = _STRETCH_A
    gamma = 2.38 / math.sqrt(2 * d)
    total = settings.burn_in + settings.n_samples
    for step in range(total):
        for half in (0, 1):
            act = slice(0, h) if half == 0 else slice(h, w)
            oth = slice(h, w) if half == 0 else slice(0, h)
            u = torch.rand(n, h, 3, generator=g, dtype=torch.float64)
            j = torch.randint(0, h, (n, h, 2), generator=g)  # partners in the other half
            zs = ((a - 1.0) * u[..., 0] + 1.0) ** 2 / a  # (N, H), density ~ 1/sqrt(z) on [1/a, a]
            xk = th[:, act]
            other = th[:, oth]
            xj = other.gather(1, j[..., 0:1].expand(-1, -1, d))
            prop = xj + zs[..., None] * (xk - xj)
            log_q = (d - 1) * zs.log()
            if settings.de_fraction > 0:
                # differential evolution (ter Braak 2006): x_k + gamma (x_j1 - x_j2), symmetric
                xj2 = other.gather(1, j[..., 1:2].expand(-1, -1, d))
                gam = torch.where(u[..., 2:3] < 0.1, 1.0, gamma)  # gamma = 1: jumps between modes
                de = xk + gam * (xj - xj2) * (1 + 1e-4 * torch.randn(n, h, 1, generator=g, dtype=torch.float64))
                use = (torch.rand(n, h, generator=g, dtype=torch.float64) < settings.de_fraction) & (j[..., 0] != j[..., 1])
                prop = torch.where(use[..., None], de, prop)
                log_q = torch.where(use, 0.0, log_q)
            lp_new = model.log_post(prop, xs, obs, y)
            log_ratio = log_q + lp_new - lp[:, act]
            acc = u[..., 1].log() < log_ratio  # -inf -> -inf: nan < ... is False
            th[:, act] = torch.where(acc[..., None], prop, xk)
            lp[:, act] = torch.where(acc, lp_new, lp[:, act])
            accepted += acc.double().sum(1)
        kept_step = step - settings.burn_in
        if kept_step >= 0 and (kept_step + 1) % settings.thin == 0:
            i = (kept_step + 1) // settings.thin - 1
            if i < n_keep:
                kept[:, :, i] = th
                kept_lp[:, :, i] = lp
    return kept, kept_lp, accepted / (total * w)


def mcmc_posterior_predictive(
    x_obs: Tensor,
    y_obs: Tensor,
    x_query: Tensor,
    prior: CurvePrior | None = None,
    n_walkers: int = 64,
    n_samples: int = 1000,
    burn_in: int = 500,
    thin: int = 20,
    generator: torch.Generator | None = None,
    init_pool: int = 8192,
    chunk: int = 256,
    dtype: torch.dtype = torch.float32,
    de_fraction: float = 0.0,
) -> MCMCResult:
    """Sample the posterior of n curves' parameters, weights and noise given observed points.

    x_obs (c,) observed epochs (shared), y_obs (n, c) observed noisy values, x_query (Q,) epochs
    of the predictive. ``n_walkers`` (even, >= 2 * D) walkers per curve run ``burn_in`` +
    ``n_samples`` stretch-move steps; every ``thin``-th step after burn-in is kept, so each curve
    has ``n_walkers * (n_samples // thin)`` draws. ``chunk`` curves are sampled together (one
    tensor of chunk x n_walkers walkers); ``dtype`` is the precision of the curve evaluation
    (state and log densities are float64). Deterministic for a given generator state.
    """
    prior = prior if prior is not None else CurvePrior()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    model = _Model(prior, dtype)
    x_obs = torch.as_tensor(x_obs).reshape(-1)
    x_query = torch.as_tensor(x_query).reshape(-1)
    y_obs = torch.as_tensor(y_obs)
    if y_obs.dim() != 2 or y_obs.shape[1] != x_obs.numel() or x_obs.numel() == 0:
        raise ValueError(
            f"y_obs: expected shape (n, {x_obs.numel()}) matching x_obs (c,) with c >= 1, "
            f"got {tuple(y_obs.shape)}"
        )
    if not bool(torch.isfinite(y_obs).all()) or not bool(torch.isfinite(x_obs).all()):
        raise ValueError("y_obs / x_obs: all values must be finite; drop missing epochs")
    if x_query.numel() == 0:
        raise ValueError("x_query: need at least one query epoch")
    if n_walkers % 2 or n_walkers < 2 * model.dim:
        raise ValueError(
            f"n_walkers: need an even number >= 2 * {model.dim} (twice the dimension), "
            f"got {n_walkers}"
        )
    if burn_in < 0 or thin < 1 or n_samples < 2 * thin:
        raise ValueError(
            f"n_samples/burn_in/thin: need burn_in >= 0, thin >= 1 and n_samples >= 2 * thin "
            f"(>= 2 kept steps), got {n_samples}/{burn_in}/{thin}"
        )
    if init_pool < n_walkers:
        raise ValueError(f"init_pool: need >= n_walkers ({n_walkers}), got {init_pool}")
    settings = MCMCSettings(
        n_walkers, n_samples, burn_in, thin, init_pool, str(dtype).removeprefix("torch."),
        de_fraction,
    )
    t0 = time.perf_counter()
    grid = torch.arange(1, prior.n_epochs + 1, dtype=dtype)
    xs, obs = _union(grid, x_obs.to(dtype))

    # a shared pool of accepted prior draws, scored per curve to start the walkers
    w0, p0 = prior.sample_params(init_pool, g)
    pool = model.from_params(w0, p0, torch.zeros(init_pool, dtype=torch.float64))
    pool_f = model.curves(pool, xs)[0][:, obs].double()  # (P, c)
    pool_lp = model.log_prior_free(pool)  # sigma column is 0 here: scored separately

    n = y_obs.shape[0]
    q_last = x_query[-1:].to(dtype)
    thetas, lps, accs = [], [], []
    for s in range(0, n, chunk):
        y = y_obs[s : s + chunk].double()
        th = _initial_walkers(model, pool, pool_f, pool_lp, y, n_walkers)
        kept, kept_lp, acc = _run_chunk(model, xs, obs, y, th, settings, g)
        thetas.append(kept)
        lps.append(kept_lp)
        accs.append(acc)
    theta = torch.cat(thetas) if thetas else torch.empty(0, n_walkers, n_samples // thin, model.dim)
    log_prob = torch.cat(lps) if lps else torch.empty(0, n_walkers, n_samples // thin)
    acceptance = torch.cat(accs) if accs else torch.empty(0)

    # diagnostics on log sigma, the curve's value at the last query epoch and the log posterior
    nn, w, t, d = theta.shape
    f_last = torch.empty(nn, w, t, dtype=torch.float64)
    m64 = _Model(prior, torch.float64)
    for s in range(0, nn, chunk):
        part = theta[s : s + chunk].double()
        f_last[s : s + chunk] = m64.curves(part.reshape(-1, d), q_last.double())[0].view(-1, w, t)
    quantities = torch.stack([theta[..., -1].double(), f_last, log_prob.clamp_min(-1e300)], 1)
    rhat = split_rhat(quantities) if nn else torch.empty(0, 3)
    ess = ensemble_ess(quantities) if nn else torch.empty(0, 3)
    rhat_params = (
        split_rhat(theta.permute(0, 3, 1, 2)).amax(1) if nn else torch.empty(0)
    )
    return MCMCResult(
        prior=prior,
        x_query=x_query.double(),
        theta=theta,
        log_prob=log_prob,
        acceptance=acceptance,
        rhat=rhat,
        ess=ess,
        rhat_params=rhat_params,
        seconds=time.perf_counter() - t0,
        settings=settings,
        names=tuple(model.names),
    )
