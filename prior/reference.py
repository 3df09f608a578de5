"""MCMC reference posterior predictive for the curve prior (the paper's MCMC-PP baseline).

Given the first observed points of noisy curves, :func:`mcmc_posterior_predictive` samples the
posterior of every curve parameter, the component weights and the noise scale under exactly the
prior and likelihood :class:`~prior.core.CurvePrior` defines, and returns the posterior
predictive as the equal-weight mixture over the draws of ``N(y; f_theta(x), sigma^2)``.

Model. ``theta`` is an unconstrained vector per curve: ``logit`` of each ``U(0,1)`` weight; for
each basis parameter its *standard draw* as :meth:`ParamPrior.transform` reads it (``logit`` of
the ``U(0,1)`` draw for uniform kinds, the ``N(0,1)`` draw itself for normal / lognormal kinds);
the standardised ``log sigma``. The log prior in these coordinates is the standard densities
plus the logit Jacobians, and ``-inf`` unless the noise-free curve on the prior's whole epoch
grid ``1..m`` obeys the prior's rules (``f(m) > f(1)``, inside ``[0, 1]``, no NaN): the prior's
rejection step makes these rules its support. The likelihood is i.i.d. Gaussian noise at the
observed epochs.

Sampler. The affine-invariant ensemble sampler with the stretch move (Goodman & Weare 2010;
emcee's algorithm, which the paper used), vectorised over curves x walkers: one tensor holds all
walkers of a chunk of curves and each half-ensemble update is one batched log-density call.
Walkers start either (``anneal=True``, default) from an adaptive tempering run (a sequential
Monte Carlo sampler: prior draws, likelihood raised from power 0 to 1 in steps that keep the
effective sample size at ``anneal_ess`` of the walkers, resampling, ``anneal_sweeps`` stretch
sweeps per step), which spreads the walkers over the posterior's modes in proportion to their
mass, or (``anneal=False``, the paper's recipe) at the best ``n_walkers`` of ``init_pool``
accepted prior draws, followed by ``burn_in`` sweeps. Annealed walkers form ``groups``
independent populations per curve, so R-hat across groups checks convergence between runs.
``SETTINGS`` names the default, the paper's recipe and a slow "gold" one.

Mixing is slow on this prior: the data fix only weight x amplitude products, so each component
has a curved ridge that affine moves do not follow; split R-hat across the paper-style walkers
stays near 2 after 4000 steps. docs/mcmc.md has the measurements.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from prior.basis import BASES, ParamPrior
from prior.core import CurvePrior

Tensor = torch.Tensor
_UNIFORM_KINDS = ("uniform", "exp_uniform", "one_minus_exp_uniform")
_STRETCH_A = 2.0  # stretch-move scale (emcee's default)
_EPS = 1e-12
_MAX_STAGES = 1000  # annealing gives up (jumps to the posterior) after this many steps
_F64 = torch.float64
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _Model:
    """The unconstrained parameterisation of a CurvePrior and its log densities."""

    def __init__(self, prior: CurvePrior, dtype: torch.dtype, compiled: bool) -> None:
        self.prior = prior
        self.dtype = dtype  # dtype of the curve evaluation (state and densities: float64)
        self.k = len(prior.components)
        self.specs: list[tuple[int, ParamPrior]] = [
            (j, p) for j, c in enumerate(prior.components) for p in BASES[c].params
        ]
        self.uniform = torch.tensor([p.dist in _UNIFORM_KINDS for _, p in self.specs])
        self.dim = self.k + len(self.specs) + 1
        self.names = tuple(
            [f"w_{c}" for c in prior.components]
            + [f"{prior.components[j]}.{p.name}" for j, p in self.specs]
            + ["log_sigma"]
        )
        self.log_parts: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = (
            torch.compile(self._log_parts, dynamic=True) if compiled else self._log_parts
        )

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
        """Inverse of :meth:`to_params`: theta (B, D) float64."""
        cols = [_logit(w[:, j].double()) for j in range(self.k)]
        cols += [_standard(p, params[j][p.name][:, 0].double()) for j, p in self.specs]
        cols.append((ls.double() - self.prior.log_sigma_mean) / self.prior.log_sigma_std)
        return torch.stack(cols, 1)

    def log_prior_free(self, th: Tensor) -> Tensor:
        """Log prior density of theta (B, D) up to a constant, without the curve rules: logistic
        densities for logit coordinates, standard normal for the others."""
        logsig = torch.nn.functional.logsigmoid
        u = th[:, self.k : -1]
        lu = torch.where(self.uniform, logsig(u) + logsig(-u), -0.5 * u * u)
        lw = th[:, : self.k]
        return (logsig(lw) + logsig(-lw)).sum(1) + lu.sum(1) - 0.5 * th[:, -1] ** 2

    def curves(self, th: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Noise-free curves f (B, L) at x (L,) in ``x.dtype``, and log sigma (B,)."""
        w, params, ls = self.to_params(th)
        w = w.to(x.dtype)
        p = [{nm: v.to(x.dtype) for nm, v in d.items()} for d in params]
        comps = self.prior.components
        f = w[:, :1] * BASES[comps[0]].fn(x, p[0])
        for j in range(1, self.k):
            f = f + w[:, j : j + 1] * BASES[comps[j]].fn(x, p[j])
        return f, ls

    def _log_parts(self, th: Tensor, xs: Tensor, obs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Log prior (-inf outside the support) and log likelihood (-inf there too; up to
        constants) of theta (N, H, D) given y (N, c) at xs[obs]; xs (L,) starts with the grid
        1..m on which the support rules are checked."""
        n, h, d = th.shape
        flat = th.reshape(n * h, d)
        f, ls = self.curves(flat, xs)  # (N*H, L)
        g = f[:, : self.prior.n_epochs]
        ok = g[:, -1] > g[:, 0]
        if self.prior.range_constraint:  # NaN fails both comparisons
            ok = ok & (g.amin(1) >= 0) & (g.amax(1) <= 1)
        else:
            ok = ok & ~g.isnan().any(1)
        inv = torch.exp(-ls).to(f.dtype).view(n, h, 1)
        r = (y.to(f.dtype)[:, None, :] - f[:, obs].view(n, h, -1)) * inv  # (N, H, c)
        ll = -0.5 * r.square().sum(2).double() - obs.numel() * (ls.view(n, h) + _HALF_LOG_2PI)
        lpr = self.log_prior_free(flat).view(n, h)
        ok = ok.view(n, h) & ~ll.isnan() & torch.isfinite(lpr)
        inf = torch.full_like(ll, -math.inf)
        return torch.where(ok, lpr, inf), torch.where(ok, ll, inf)


@functools.lru_cache(maxsize=16)
def _model(prior: CurvePrior, dtype: torch.dtype, compiled: bool) -> _Model:
    return _Model(prior, dtype, compiled)


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
    """Points ``grid`` followed by the x not on it, and the index of each x in them."""
    hit = x[:, None] == grid[None, :]
    found = hit.any(1)
    extra = x[~found]
    idx = hit.to(torch.int64).argmax(1)
    idx[~found] = grid.numel() + torch.arange(extra.numel())
    return torch.cat([grid, extra]), idx


# --- diagnostics ------------------------------------------------------------------------------
def rhat(chains: Tensor) -> Tensor:
    """Potential scale reduction (Gelman-Rubin) of chains (..., C, T) -> (...); values near 1
    mean the C chains agree (NaN for T < 2)."""
    c = chains.double()
    t = c.shape[-1]
    if t < 2:
        return torch.full(c.shape[:-2], math.nan, dtype=_F64)
    within = c.var(-1).mean(-1)
    between = c.mean(-1).var(-1)  # B / T
    return torch.sqrt(((t - 1) / t * within + between) / within.clamp_min(1e-300))


def split_rhat(chains: Tensor) -> Tensor:
    """Split R-hat (Gelman et al. 2013) of chains (..., C, T) -> (...): each chain's halves
    count as two chains, so a drifting chain disagrees with itself."""
    t = chains.shape[-1] // 2
    return rhat(torch.cat([chains[..., :t], chains[..., t : 2 * t]], -2))  # (..., 2C, t)


def ensemble_ess(chains: Tensor, c: float = 5.0) -> Tensor:
    """Effective sample size of walkers (..., W, T) -> (...): W*T / tau, tau the integrated
    autocorrelation time of the walker-averaged autocorrelation function with Sokal's window
    (emcee's estimator); NaN where the chains are too short to tell (T < 50 tau, as emcee)."""
    w, t = chains.shape[-2:]
    x = chains.double() - chains.double().mean(-1, keepdim=True)
    nfft = 1 << (2 * t - 1).bit_length()
    fx = torch.fft.rfft(x, n=nfft)
    acf = torch.fft.irfft(fx * fx.conj(), n=nfft)[..., :t].mean(-2)  # (..., T)
    acf = acf / acf[..., :1].clamp_min(1e-300)
    taus = 2.0 * acf.cumsum(-1) - 1.0  # tau for each window size M
    ok = torch.arange(t, dtype=taus.dtype) < c * taus
    window = torch.where(ok.all(-1), t - 1, (~ok).to(torch.int64).argmax(-1))
    tau = taus.gather(-1, window[..., None])[..., 0].clamp_min(1.0)
    return torch.where(t >= 50 * tau, w * t / tau, math.nan)


# --- result -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCMCSettings:
    """How the reference posterior is sampled; validated on construction."""

    n_walkers: int = 1024  # walkers per curve (each group: even, >= twice the dimension)
    n_samples: int = 100  # stretch-move sweeps per walker after burn-in
    burn_in: int = 0  # discarded sweeps per walker (after the annealing, if any)
    thin: int = 10  # keep every thin-th sweep after burn-in
    anneal: bool = True  # start from a tempering (SMC) run rather than the best prior draws
    anneal_ess: float = 0.5  # tempering steps keep this share of the walkers as effective draws
    anneal_sweeps: int = 10  # stretch sweeps after each tempering step
    groups: int = 2  # annealed start: independent walker groups per curve (R-hat across them)
    init_pool: int = 8192  # prior draws scored to pick the starting walkers when not annealing
    chunk: int = 128  # curves sampled together in one tensor (memory ~ chunk * n_walkers)
    dtype: str = "float32"  # curve-evaluation precision (state and densities are float64)
    compiled: bool = False  # log density via torch.compile (~3.5x faster, ~30-60 s warm-up)
    threads: int = 1  # torch intra-op threads while sampling (restored after); more threads
    # only pay on an idle CPU: on a shared one, 2 threads made small batches ~100x slower

    def __post_init__(self) -> None:
        checks = [
            ("n_walkers", self.n_walkers % 2 == 0 and self.n_walkers >= 4, "an even number >= 4"),
            ("n_samples", self.n_samples >= 4 * self.thin, ">= 4 * thin (4 kept sweeps)"),
            ("burn_in", self.burn_in >= 0, ">= 0"),
            ("thin", self.thin >= 1, ">= 1"),
            ("anneal_ess", 0 < self.anneal_ess < 1, "strictly between 0 and 1"),
            ("anneal_sweeps", self.anneal_sweeps >= 1, ">= 1"),
            ("groups", self.groups >= 1 and (not self.anneal or self.n_walkers % (2 * self.groups)
                                               == 0), ">= 1, dividing n_walkers / 2"),
            ("init_pool", self.anneal or self.init_pool >= self.n_walkers, ">= n_walkers"),
            ("chunk", self.chunk >= 1, ">= 1"),
            ("dtype", self.dtype in ("float32", "float64"), "'float32' or 'float64'"),
            ("threads", self.threads >= 1, ">= 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"{name}: need {need}, got {getattr(self, name)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.float64


# Named settings (add compiled=True with dataclasses.replace for long runs); see docs/mcmc.md.
SETTINGS: dict[str, MCMCSettings] = {
    "default": MCMCSettings(),  # annealed start: ~0.2 M log-density calls per curve
    # the paper's MCMC-PP: emcee, 100 walkers, 4000 steps of which 500 burn-in (~0.4 M calls)
    "paper": MCMCSettings(n_walkers=100, n_samples=3500, burn_in=500, thin=35, anneal=False,
                          groups=1, chunk=64),
    # a slow, careful reference to check the others against (~0.7 M calls per curve)
    "gold": MCMCSettings(n_walkers=1024, n_samples=200, thin=20, anneal_ess=0.9,
                         anneal_sweeps=20, groups=1, chunk=32),
    # a smoke test of the whole path in seconds (not a reference: too few draws to trust)
    "quick": MCMCSettings(n_walkers=64, n_samples=40, thin=10, anneal_sweeps=2),
}


@dataclass(frozen=True)
class MCMCResult:
    """Posterior draws of n curves and their posterior predictive at ``x_query``.

    Draws are kept per walker and sweep, so diagnostics can be recomputed; the predictive is the
    equal-weight mixture over all ``n_walkers * n_kept`` draws of each curve."""

    prior: CurvePrior  # the prior sampled under
    x_query: Tensor  # (Q,) float64 query epochs
    theta: Tensor  # (n, W, T, D) float64 unconstrained draws (see the module docstring)
    log_prob: Tensor  # (n, W, T) float64 log posterior of each draw (prior up to a constant)
    acceptance: Tensor  # (n,) share of accepted stretch moves after the annealing
    rhat: Tensor  # (n, 3) R-hat of (log sigma, f(x_query[-1]), log_prob): across the
    # independent walker groups when annealed (settings.groups > 1), else split R-hat across
    # walkers; ~1 when the groups / walkers agree
    ess: Tensor  # (n, 3) ensemble effective sample size of the same three quantities (emcee's
    # autocorrelation estimator; NaN where the chains are too short to tell)
    rhat_params: Tensor  # (n,) max R-hat (as rhat) over the D coordinates of theta
    n_stages: Tensor  # (n,) tempering steps (0 without annealing)
    log_evidence: Tensor  # (n,) log p(y_obs), the marginal likelihood, from the annealing
    # (NaN without): the product of the tempering steps' mean incremental weights
    seconds: float  # wall time of the whole call
    settings: MCMCSettings
    names: tuple[str, ...]  # names of the D coordinates of theta

    @property
    def n_curves(self) -> int:
        return int(self.theta.shape[0])

    @property
    def n_draws(self) -> int:
        return int(self.theta.shape[1] * self.theta.shape[2])

    @property
    def seconds_per_curve(self) -> float:
        return self.seconds / max(self.n_curves, 1)

    def params(self) -> tuple[Tensor, list[dict[str, Tensor]], Tensor]:
        """All draws in the prior's own terms: weights (n*S, K), per-component parameters
        (n*S, 1) and sigma (n*S,), rows curve-major (S = n_draws)."""
        model = _model(self.prior, _F64, False)
        w, p, ls = model.to_params(self.theta.flatten(0, 2).double())
        return w, p, ls.exp()

    def _predictive(self, chunk: int) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Per chunk of curves: rows, f at x_query (n_c, S, Q) and sigma (n_c, S, 1), float64."""
        model = _model(self.prior, _F64, False)
        for s in range(0, self.n_curves, chunk):
            t = self.theta[s : s + chunk].flatten(1, 2).double()
            nc, ns, d = t.shape
            f, ls = model.curves(t.reshape(nc * ns, d), self.x_query)
            yield slice(s, s + nc), f.view(nc, ns, -1), ls.exp().view(nc, ns, 1)

    def log_density(self, y_query: Tensor) -> Tensor:
        """log p(y_query | observed) (n, Q): the exact mixture over the draws (logsumexp)."""
        shape = (self.n_curves, self.x_query.numel())
        if tuple(y_query.shape) != shape:
            raise ValueError(f"y_query: expected shape {shape}, got {tuple(y_query.shape)}")
        out = torch.empty(shape, dtype=_F64)
        yq = torch.as_tensor(y_query).double()
        for rows, f, sig in self._predictive(16):
            z = (yq[rows][:, None, :] - f) / sig
            lp = -0.5 * z * z - sig.log() - 0.5 * math.log(2 * math.pi)
            out[rows] = torch.logsumexp(lp, 1) - math.log(f.shape[1])
        return out

    def mean(self) -> Tensor:
        """Posterior predictive mean (n, Q)."""
        out = torch.empty(self.n_curves, self.x_query.numel(), dtype=_F64)
        for rows, f, _ in self._predictive(64):
            out[rows] = f.mean(1)
        return out

    def quantile(self, qs: Sequence[float], iters: int = 60, tol: float = 1e-10) -> Tensor:
        """Posterior predictive quantiles (n, Q, len(qs)) of the mixture, by safeguarded Newton.

        The bracket starts at the smallest and largest component quantile ``f + sigma *
        ndtri(q)`` (the mixture quantile lies between them); each iteration takes the Newton
        step ``x - (F(x) - q) / p(x)`` when it stays inside the bracket, else bisects, and
        shrinks the bracket by the sign of ``F(x) - q``; a Newton step not at most half the step
        before last is replaced by a bisection (Numerical Recipes' rtsafe); converged entries
        stay put. Stops when every |F(x) - q| < ``tol``: typically 5-8 evaluations of the
        mixture CDF, where plain bisection from +-10 sigma took 40."""
        q = torch.tensor(list(qs), dtype=_F64)
        if q.numel() == 0 or bool(((q <= 0) | (q >= 1)).any()):
            raise ValueError(f"qs: need probabilities strictly inside (0, 1), got {list(qs)}")
        out = torch.empty(self.n_curves, self.x_query.numel(), q.numel(), dtype=_F64)
        zq = torch.special.ndtri(q)  # (nq,)
        for rows, f, sig in self._predictive(8):
            fq = f[..., None] + sig[..., None] * zq  # (n_c, S, Q, nq) component quantiles
            lo, hi = fq.amin(1), fq.amax(1)  # (n_c, Q, nq)
            x = fq.mean(1)
            f4, s4 = f[..., None], sig[..., None]  # (n_c, S, Q, 1), (n_c, S, 1, 1)
            dx = dx_old = hi - lo  # the last two steps (rtsafe's step-size test)
            for _ in range(iters):
                z = (x[:, None] - f4) / s4  # (n_c, S, Q, nq)
                err = torch.special.ndtr(z).mean(1) - q  # F(x) - q
                done = err.abs() < tol
                if bool(done.all()):
                    break
                dens = (torch.exp(-0.5 * z * z) / s4).mean(1) / math.sqrt(2 * math.pi)
                lo, hi = torch.where(err < 0, x, lo), torch.where(err < 0, hi, x)
                step = x - err / dens.clamp_min(1e-300)
                # Newton inside the bracket while the steps at least halve, else bisection
                newton = (step > lo) & (step < hi) & ((step - x).abs() <= 0.5 * dx_old.abs())
                nx = torch.where(done, x, torch.where(newton, step, 0.5 * (lo + hi)))
                dx_old, dx = dx, nx - x
                x = nx
            out[rows] = x
        return out

    def summary(self) -> dict[str, float]:
        """Convergence and cost in a few numbers (medians and tails over curves)."""
        return _summary(self.rhat, self.ess, self.rhat_params, self.acceptance, self.n_stages,
                        self.n_draws, self.seconds)


def _summary(rhat: Tensor, ess: Tensor, rhat_params: Tensor, acceptance: Tensor,
             n_stages: Tensor, n_draws: int, seconds: float) -> dict[str, float]:
    r = rhat.amax(1)
    e = ess.amin(1)
    n = r.numel()
    return {
        "n_curves": float(n),
        "n_draws": float(n_draws),  # per curve
        "rhat_median": float(r.median()),
        "rhat_p90": float(r.quantile(0.9)),
        "rhat_max": float(r.max()),
        "frac_rhat_below_1.1": float((r < 1.1).double().mean()),
        "rhat_params_median": float(rhat_params.median()),
        "ess_median": float(e.nanmedian()),  # NaN where every chain is too short to tell
        "ess_p10": float(e.nanquantile(0.1)),
        "acceptance_mean": float(acceptance.mean()),
        "stages_mean": float(n_stages.double().mean()),
        "seconds": seconds,
        "seconds_per_curve": seconds / max(n, 1),
    }


# --- sampler ------------------------------------------------------------------------------------
@dataclass
class _Ensemble:
    """Walkers of a batch of curves (mutable state of the sampler)."""

    th: Tensor  # (N, W, D) float64 positions
    lpr: Tensor  # (N, W) log prior (-inf outside the support)
    ll: Tensor  # (N, W) log likelihood
    beta: Tensor  # (N, 1) likelihood power (1 = posterior)

    def select(self, idx: Tensor) -> _Ensemble:
        return _Ensemble(self.th[idx], self.lpr[idx], self.ll[idx], self.beta[idx])

    def put(self, idx: Tensor, other: _Ensemble) -> None:
        self.th[idx], self.lpr[idx], self.ll[idx] = other.th, other.lpr, other.ll
        self.beta[idx] = other.beta


def _target(lpr: Tensor, ll: Tensor, beta: Tensor) -> Tensor:
    return torch.where(torch.isinf(lpr), lpr, lpr + beta * ll)


def _sweep(model: _Model, xs: Tensor, obs: Tensor, y: Tensor, e: _Ensemble,
           g: torch.Generator) -> Tensor:
    """One stretch-move update of every walker (two half-ensemble steps), in place; returns
    the share of accepted moves per curve (N,)."""
    n, w, d = e.th.shape
    h = w // 2
    acc = torch.zeros(n, dtype=_F64)
    a = _STRETCH_A
    for act, oth in ((slice(0, h), slice(h, w)), (slice(h, w), slice(0, h))):
        u = torch.rand(n, h, 2, generator=g, dtype=_F64)
        j = torch.randint(0, h, (n, h), generator=g)  # partner in the other half
        z = ((a - 1.0) * u[..., 0] + 1.0) ** 2 / a  # (N, H), density ~ 1/sqrt(z) on [1/a, a]
        xk = e.th[:, act]
        xj = e.th[:, oth].gather(1, j[..., None].expand(-1, -1, d))
        prop = xj + z[..., None] * (xk - xj)
        lpr, ll = model.log_parts(prop, xs, obs, y)
        log_ratio = (d - 1) * z.log() + _target(lpr, ll, e.beta) - _target(
            e.lpr[:, act], e.ll[:, act], e.beta
        )
        ok = u[..., 1].log() < log_ratio  # False for a -inf proposal
        e.th[:, act] = torch.where(ok[..., None], prop, xk)
        e.lpr[:, act] = torch.where(ok, lpr, e.lpr[:, act])
        e.ll[:, act] = torch.where(ok, ll, e.ll[:, act])
        acc += ok.double().sum(1)
    return acc / w


def _resample(e: _Ensemble, log_w: Tensor, g: torch.Generator) -> _Ensemble:
    """Systematic resampling of each curve's walkers by weights exp(log_w) (N, W), then a random
    permutation (the stretch move splits walkers into halves by position)."""
    n, w = log_w.shape
    cdf = torch.softmax(log_w, 1).cumsum(1)
    cdf[:, -1] = 1.0
    pos = (torch.rand(n, 1, generator=g, dtype=_F64) + torch.arange(w, dtype=_F64)) / w
    idx = torch.searchsorted(cdf, pos).clamp_max(w - 1)
    idx = idx.gather(1, torch.argsort(torch.rand(n, w, generator=g), 1))
    return _Ensemble(
        e.th.gather(1, idx[..., None].expand(-1, -1, e.th.shape[2])),
        e.lpr.gather(1, idx),
        e.ll.gather(1, idx),
        e.beta.clone(),
    )


def _ess(log_w: Tensor) -> Tensor:
    w = torch.softmax(log_w, -1)
    return 1.0 / (w * w).sum(-1, keepdim=True)


def _next_step(ll: Tensor, beta: Tensor, ess_frac: float) -> Tensor:
    """Largest likelihood-power increment (N, 1) keeping ESS >= ess_frac * W (bisection)."""
    target = ess_frac * ll.shape[1]
    lo = torch.zeros_like(beta)
    hi = 1.0 - beta
    full = _ess(hi * ll) >= target
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        good = _ess(mid * ll) >= target
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return torch.where(full, 1.0 - beta, torch.maximum(lo, 1e-12 * torch.ones_like(lo)))


def _anneal(model: _Model, xs: Tensor, obs: Tensor, y: Tensor, e: _Ensemble,
            settings: MCMCSettings, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Adaptive tempering from the prior (beta = 0) to the posterior (beta = 1), in place;
    returns the log evidence (N,) and the number of tempering steps (N,)."""
    n, w, _ = e.th.shape
    log_z = torch.zeros(n, dtype=_F64)
    stages = torch.zeros(n, dtype=torch.int64)
    # walkers outside the support (possible at float32 precision) are replaced first
    e.put(torch.arange(n), _resample(e, torch.where(torch.isinf(e.ll), -math.inf, 0.0), g))
    while True:
        idx = (e.beta[:, 0] < 1).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        sub = e.select(idx)
        step = _next_step(sub.ll, sub.beta, settings.anneal_ess)
        step = torch.where(stages[idx, None] >= _MAX_STAGES, 1.0 - sub.beta, step)
        log_w = step * sub.ll
        log_z[idx] += torch.logsumexp(log_w, 1) - math.log(w)
        sub = _resample(sub, log_w, g)
        sub.beta = torch.where(sub.beta + step >= 1 - 1e-12, 1.0, sub.beta + step)
        for _ in range(settings.anneal_sweeps):
            _sweep(model, xs, obs, y[idx], sub, g)
        e.put(idx, sub)
        stages[idx] += 1
    return log_z, stages


def _best_of_pool(model: _Model, pool: Tensor, pool_f: Tensor, y: Tensor, w: int) -> Tensor:
    """The w best pool draws for each curve (N, w, D) by posterior density, each with log sigma
    at its conditional mode given the draw's residuals (the paper-style start)."""
    c = y.shape[1]
    sse = (y * y).sum(1, keepdim=True) - 2 * y @ pool_f.T + (pool_f * pool_f).sum(1)  # (N, P)
    sse = sse.clamp_min(1e-12)
    mu, s = model.prior.log_sigma_mean, model.prior.log_sigma_std
    ls = 0.5 * torch.log(sse / c)  # Newton steps to the mode of the log sigma conditional
    for _ in range(8):
        ex = sse * torch.exp(-2 * ls)
        ls = ls - (-c + ex - (ls - mu) / s**2) / (-2 * ex - 1 / s**2)
    z = (ls - mu) / s
    score = -c * ls - 0.5 * sse * torch.exp(-2 * ls) - 0.5 * z * z
    score = score + model.log_prior_free(pool)  # sigma column of the pool is 0: no term
    best = score.topk(w, 1).indices  # (N, w)
    th = pool[best].clone()
    th[..., -1] = z.gather(1, best)
    return th


def mcmc_posterior_predictive(
    x_obs: Tensor,
    y_obs: Tensor,
    x_query: Tensor,
    prior: CurvePrior | None = None,
    n_walkers: int = MCMCSettings.n_walkers,
    n_samples: int = MCMCSettings.n_samples,
    burn_in: int = MCMCSettings.burn_in,
    thin: int = MCMCSettings.thin,
    generator: torch.Generator | None = None,
    anneal: bool = MCMCSettings.anneal,
    anneal_ess: float = MCMCSettings.anneal_ess,
    anneal_sweeps: int = MCMCSettings.anneal_sweeps,
    groups: int = MCMCSettings.groups,
    init_pool: int = MCMCSettings.init_pool,
    chunk: int = MCMCSettings.chunk,
    dtype: str = MCMCSettings.dtype,
    compiled: bool = MCMCSettings.compiled,
    threads: int = MCMCSettings.threads,
) -> MCMCResult:
    """Posterior predictive of n curves by ensemble MCMC under ``prior`` (default CurvePrior()).

    x_obs (c,) observed epochs, shared by all curves; y_obs (n, c) their noisy values; x_query
    (Q,) epochs of the predictive. Each curve gets ``n_walkers`` walkers, started by annealing
    (default) or from the best of ``init_pool`` prior draws (``anneal=False``: the paper's
    MCMC-PP), then ``burn_in`` + ``n_samples`` stretch-move sweeps; every ``thin``-th sweep
    after burn-in is kept, so each curve has ``n_walkers * (n_samples // thin)`` draws. See
    :class:`MCMCSettings` for the other knobs. Deterministic for a given generator state
    (default: seed 0) and thread count.
    """
    settings = MCMCSettings(n_walkers, n_samples, burn_in, thin, anneal, anneal_ess,
                            anneal_sweeps, groups, init_pool, chunk, dtype, compiled,
                            threads)
    return sample_reference(x_obs, y_obs, x_query, prior, settings, generator)


def sample_reference(
    x_obs: Tensor,
    y_obs: Tensor,
    x_query: Tensor,
    prior: CurvePrior | None = None,
    settings: MCMCSettings | None = None,
    generator: torch.Generator | None = None,
) -> MCMCResult:
    """:func:`mcmc_posterior_predictive` with its settings as one :class:`MCMCSettings`."""
    st = settings if settings is not None else MCMCSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(st.threads)
    try:
        return _sample(x_obs, y_obs, x_query, prior, st, generator)
    finally:
        torch.set_num_threads(threads)


def _sample(
    x_obs: Tensor,
    y_obs: Tensor,
    x_query: Tensor,
    prior: CurvePrior | None,
    st: MCMCSettings,
    generator: torch.Generator | None,
) -> MCMCResult:
    prior = prior if prior is not None else CurvePrior()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype = st.torch_dtype
    model = _model(prior, dtype, st.compiled)
    x_obs = torch.as_tensor(x_obs).reshape(-1)
    x_query = torch.as_tensor(x_query).reshape(-1).double()
    y_obs = torch.as_tensor(y_obs)
    c = x_obs.numel()
    if y_obs.dim() != 2 or y_obs.shape[1] != c or c == 0:
        raise ValueError(
            f"y_obs: expected shape (n, {c}) matching x_obs (c,) with c >= 1, "
            f"got {tuple(y_obs.shape)}"
        )
    if not (bool(torch.isfinite(y_obs).all()) and bool(torch.isfinite(x_obs).all())):
        raise ValueError("x_obs / y_obs: all values must be finite; drop missing epochs")
    if x_query.numel() == 0 or not bool(torch.isfinite(x_query).all()):
        raise ValueError("x_query: need at least one query epoch, all finite")
    grp = st.groups if st.anneal else 1
    if st.n_walkers < 2 * model.dim * grp:
        raise ValueError(
            f"n_walkers: need >= {2 * model.dim * grp} ({grp} group(s) of twice the dimension "
            f"of prior {prior.name}), got {st.n_walkers}"
        )
    settings = st
    n_walkers, n_samples, burn_in, thin = st.n_walkers, st.n_samples, st.burn_in, st.thin
    anneal, init_pool, chunk = st.anneal, st.init_pool, st.chunk
    t0 = time.perf_counter()
    xs, obs = _union(torch.arange(1, prior.n_epochs + 1, dtype=dtype), x_obs.to(dtype))
    n, w, d = y_obs.shape[0], n_walkers, model.dim
    n_keep = n_samples // thin
    if not anneal:  # one pool of accepted prior draws, shared by all curves
        wp, pp = prior.sample_params(init_pool, g)
        pool = model.from_params(wp, pp, torch.zeros(init_pool, dtype=_F64))
        pool_f = model.curves(pool, xs)[0][:, obs].double()  # (P, c)
    theta = torch.empty(n, w, n_keep, d, dtype=_F64)
    log_prob = torch.empty(n, w, n_keep, dtype=_F64)
    acceptance = torch.empty(n, dtype=_F64)
    n_stages = torch.zeros(n, dtype=torch.int64)
    log_evidence = torch.full((n,), math.nan, dtype=_F64)
    wg = w // grp  # walkers per group; a group is sampled as its own curve
    for s in range(0, n, chunk):
        y = y_obs[s : s + chunk].double()
        nc = y.shape[0]
        if anneal:
            y = y.repeat_interleave(grp, 0)  # (nc * grp, c)
            wp, pp = prior.sample_params(nc * w, g)
            z = torch.randn(nc * w, generator=g, dtype=_F64)
            th = model.from_params(wp, pp, prior.log_sigma_mean + prior.log_sigma_std * z)
            th = th.view(nc * grp, wg, d)
        else:
            th = _best_of_pool(model, pool, pool_f, y, w)
        lpr, ll = model.log_parts(th, xs, obs, y)
        e = _Ensemble(th, lpr, ll, torch.full((nc * grp, 1), float(not anneal), dtype=_F64))
        if anneal:
            log_z, stages = _anneal(model, xs, obs, y, e, settings, g)
            log_evidence[s : s + nc] = log_z.view(nc, grp).logsumexp(1) - math.log(grp)
            n_stages[s : s + nc] = stages.view(nc, grp).amax(1)
        acc = torch.zeros(nc * grp, dtype=_F64)
        for step in range(burn_in + n_samples):
            acc += _sweep(model, xs, obs, y, e, g)
            kept = step - burn_in + 1
            if kept > 0 and kept % thin == 0 and kept // thin <= n_keep:
                theta[s : s + nc, :, kept // thin - 1] = e.th.reshape(nc, w, d)
                log_prob[s : s + nc, :, kept // thin - 1] = (e.lpr + e.ll).reshape(nc, w)
        acceptance[s : s + nc] = acc.view(nc, grp).mean(1) / (burn_in + n_samples)

    # diagnostics on log sigma, the curve at the last query epoch and the log posterior
    f_last = torch.empty(n, w, n_keep, dtype=_F64)
    m64 = _model(prior, _F64, False)
    for s in range(0, n, chunk):
        part = theta[s : s + chunk].double().reshape(-1, d)
        f_last[s : s + chunk] = m64.curves(part, x_query[-1:])[0].view(-1, w, n_keep)
    quantities = torch.stack([theta[..., -1].double(), f_last, log_prob.clamp_min(-1e300)], 1)
    return MCMCResult(
        prior=prior,
        x_query=x_query,
        theta=theta,
        log_prob=log_prob,
        acceptance=acceptance,
        rhat=_rhat(quantities, grp),
        ess=ensemble_ess(quantities),
        rhat_params=_rhat(theta.permute(0, 3, 1, 2), grp).amax(1),
        n_stages=n_stages,
        log_evidence=log_evidence,
        seconds=time.perf_counter() - t0,
        settings=settings,
        names=model.names,
    )


def _rhat(chains: Tensor, groups: int) -> Tensor:
    """(..., W, T) -> (...): with groups > 1, R-hat across the independent walker groups (all
    draws of a group pooled); otherwise split R-hat across walkers (each walker a chain)."""
    if groups == 1:
        return split_rhat(chains)
    return rhat(chains.reshape(*chains.shape[:-2], groups, -1))


def reference_log_likelihood(
    y: Tensor,
    cutoff: int,
    prior: CurvePrior | None = None,
    settings: MCMCSettings | None = None,
    generator: torch.Generator | None = None,
    batch: int = 256,
) -> tuple[Tensor, dict[str, float]]:
    """The paper's measure for prior curves y (n, m) over epochs 1..m cut after ``cutoff``
    points: per curve, the mean over epochs cutoff+1..m of the reference predictive log-density
    of the noisy values -> (n,) float64, and the diagnostics summary (MCMCResult.summary) over
    all curves. Sampled ``batch`` curves at a time; their draws are dropped after scoring
    (the default settings keep ~1 MB of draws per curve)."""
    y = torch.as_tensor(y)
    n, m = y.shape
    if not 1 <= cutoff < m:
        raise ValueError(f"cutoff: need 1 <= cutoff < {m} (the curve length), got {cutoff}")
    if batch < 1:
        raise ValueError(f"batch: need >= 1, got {batch}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.arange(1, m + 1, dtype=torch.float64)
    lls, parts, seconds, draws = [], [], 0.0, 0
    for s in range(0, n, batch):
        yb = y[s : s + batch]
        r = sample_reference(x[:cutoff], yb[:, :cutoff], x[cutoff:], prior, settings, g)
        lls.append(r.log_density(yb[:, cutoff:]).mean(1))
        parts.append((r.rhat, r.ess, r.rhat_params, r.acceptance, r.n_stages))
        seconds += r.seconds
        draws = r.n_draws
    rh, es, rp, acc, st = (torch.cat(list(t)) for t in zip(*parts, strict=True))
    return torch.cat(lls), _summary(rh, es, rp, acc, st, draws, seconds)


def prior_protocol(
    n: int = 300,
    cutoffs: Sequence[int] = (10, 20, 40, 80),
    seed: int = 0,
    prior: CurvePrior | None = None,
    settings: MCMCSettings | None = None,
) -> list[dict[str, float]]:
    """The paper's prior protocol with the reference: n curves drawn with ``seed``, one row per
    cutoff with the mean log-likelihood, its standard error over curves, the diagnostics
    summary and the wall time. Sampler seed: ``seed + cutoff``."""
    prior = prior if prior is not None else CurvePrior()
    b = prior.sample(n, torch.Generator().manual_seed(seed))
    rows = []
    for c in cutoffs:
        g = torch.Generator().manual_seed(seed + c)
        ll, summary = reference_log_likelihood(b.y, c, prior, settings, g)
        rows.append({"cutoff": float(c), "log_likelihood": float(ll.mean()),
                     "stderr": float(ll.std() / math.sqrt(max(n, 1))), **summary})
    return rows
