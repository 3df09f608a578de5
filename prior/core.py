"""The learning-curve prior: weighted sums of basis curves plus Gaussian noise, vectorised.

``CurvePrior().sample(n, generator)`` draws ``n`` curves over epochs ``1..n_epochs`` exactly as
lcpfn's ``sample_prior_comb`` does (weights ``U(0,1)`` not normalised, ``log sigma ~ N(-4, 1)``,
rejection of curves with ``f(m) <= f(1)``, leaving ``[0, 1]`` or NaN), but over whole batches:
proposals are first screened on their two end points (cheap), and only survivors are evaluated
at every epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from prior.basis import BASES, ParamPrior

Tensor = torch.Tensor
_CHUNK = 1 << 15  # max proposals per round, eager: small temporaries are faster to allocate
_CHUNK_COMPILED = 1 << 17  # compiled: one fused kernel, so larger rounds amortise its call cost

LCPFN_COMPONENTS = ("pow3", "ilog2", "janoschek")
DOMHAN_COMPONENTS = tuple(BASES)


@dataclass(frozen=True)
class CurveBatch:
    """A batch of sampled curves over epochs ``x = 1..m``."""

    x: Tensor  # (m,) float epochs 1..m
    y: Tensor  # (n, m) float32 noisy observations (the training targets)
    f: Tensor  # (n, m) float32 noise-free curves
    sigma: Tensor  # (n,) float32 noise standard deviation of each curve
    annealed: Tensor  # (n,) bool: drawn into the learning-rate-decay branch
    # (CurvePrior.anneal_prob; all False without it): a model with decay inputs sees it

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class CurvePrior:
    """The parametric learning-curve prior (lcpfn's "peaked" prior by default)."""

    components: tuple[str, ...] = LCPFN_COMPONENTS  # basis curves summed with U(0,1) weights
    n_epochs: int = 100  # curve length m; the prior's epochs are 1..m
    log_sigma_mean: float = -4.0  # mean of log(noise std)
    log_sigma_std: float = 1.0  # std of log(noise std)
    range_constraint: bool = True  # reject curves whose noise-free values leave [0, 1]
    max_rounds: int = 1000  # give up (RuntimeError) after this many proposal rounds
    compiled: bool = False  # evaluate curves with torch.compile (~4x faster, ~20 s warm-up)
    delay_prob: float = 0.0  # share of curves that start late (slow starters): they stay at
    # their first value for t0 epochs, then follow the curve, f'(t) = f(max(1, t - t0)); 0 is
    # the paper's prior (and draws nothing extra: its streams are unchanged)
    delay_max: float = 0.5  # longest delay t0 as a share of n_epochs (t0 ~ U{0..delay_max m})
    converge_prob: float = 0.0  # share of curves that converge early (as runs under a decaying
    # learning rate do): the whole curve compressed into its first s m epochs, flat at f(m)
    # after, f'(t) = f(min(m, 1 + (t - 1) / s)); 0 is the paper's prior (nothing extra drawn)
    converge_min: float = 0.5  # smallest compression s (s ~ U(converge_min, 1))
    decline_prob: float = 0.0  # share of curves that peak and then decline (overfitting, a
    # diverging optimiser): flat from a peak epoch p ~ U{ceil(decline_start m)..m-1} on, minus a
    # drop growing to d (f(p) - f(1)) at epoch m, d ~ U(0, decline_max), with the shape
    # ((t - p) / (m - p))^k, log k ~ U(log 1/2, log 2); 0 is the paper's prior (nothing drawn)
    decline_start: float = 0.1  # earliest peak epoch as a share of n_epochs
    decline_max: float = 0.5  # largest drop as a share of the curve's rise f(p) - f(1)
    anneal_prob: float = 0.0  # share of curves trained under a learning rate that decays
    # before the horizon (step or smooth decay tied to the budget): from an epoch s ~
    # U{1..anneal_start m} on they gain b (f(m) - f(1)) on top of the curve, b ~ U(0,
    # anneal_max) (capped so that values stay <= 1), along a step's saturating jump 1 -
    # exp(-(t - s) / w), log w ~ U(log 1/2, log m/10) epochs, or a decay's convex ramp ((t - s)
    # / (m - s))^k, log k ~ U(0, log 3), half each (the annealing term of Tissue et al. 2024,
    # arXiv:2408.11029); 0 is the paper's prior (nothing drawn)
    anneal_start: float = 0.8  # latest start s of the decay as a share of n_epochs
    anneal_max: float = 0.5  # largest gain as a share of the curve's rise f(m) - f(1)
    flat_prob: float = 0.0  # share of curves that never learn (a diverged or badly configured
    # run: the paper's prior has almost none, 0.06% of its curves stay within 0.02 of a level
    # below 0.05 for 80 epochs, against 65% of TaskSet's runs): flat at a level below what the
    # curve reaches after one epoch, f'(t) = v f(1), v ~ U(0, 1); 0 is the paper's prior
    # (nothing drawn)
    _accept_guess: float = field(default=0.2, repr=False)  # first proposal-size estimate

    def __post_init__(self) -> None:
        unknown = [c for c in self.components if c not in BASES]
        if unknown or not self.components:
            raise ValueError(
                f"components: unknown basis {unknown or '(empty)'}; choose from {sorted(BASES)}"
            )
        if self.n_epochs < 2:
            raise ValueError(f"n_epochs: must be >= 2, got {self.n_epochs}")
        if not 0.0 <= self.delay_prob <= 1.0:
            raise ValueError(f"delay_prob: must be in [0, 1], got {self.delay_prob}")
        if not 0.0 <= self.delay_max < 1.0:
            raise ValueError(f"delay_max: must be in [0, 1), got {self.delay_max}")
        if not 0.0 <= self.converge_prob <= 1.0:
            raise ValueError(f"converge_prob: must be in [0, 1], got {self.converge_prob}")
        if not 0.0 < self.converge_min <= 1.0:
            raise ValueError(f"converge_min: must be in (0, 1], got {self.converge_min}")
        if not 0.0 <= self.decline_prob <= 1.0:
            raise ValueError(f"decline_prob: must be in [0, 1], got {self.decline_prob}")
        if not 0.0 < self.decline_start < 1.0:
            raise ValueError(f"decline_start: must be in (0, 1), got {self.decline_start}")
        if not 0.0 < self.decline_max < 1.0:
            raise ValueError(f"decline_max: must be in (0, 1), got {self.decline_max}")
        if not 0.0 <= self.anneal_prob <= 1.0:
            raise ValueError(f"anneal_prob: must be in [0, 1], got {self.anneal_prob}")
        if not 0.0 < self.anneal_start <= 1.0:
            raise ValueError(f"anneal_start: must be in (0, 1], got {self.anneal_start}")
        if not 0.0 < self.anneal_max <= 1.0:
            raise ValueError(f"anneal_max: must be in (0, 1], got {self.anneal_max}")
        if not 0.0 <= self.flat_prob <= 1.0:
            raise ValueError(f"flat_prob: must be in [0, 1], got {self.flat_prob}")

    @property
    def name(self) -> str:
        base = "lcpfn" if self.components == LCPFN_COMPONENTS else "+".join(self.components)
        return (base + (f"-converge{self.converge_prob:g}" if self.converge_prob else "")
                + (f"-decline{self.decline_prob:g}" if self.decline_prob else "")
                + (f"-anneal{self.anneal_prob:g}" if self.anneal_prob else "")
                + (f"-flat{self.flat_prob:g}" if self.flat_prob else "")
                + (f"-slowstart{self.delay_prob:g}" if self.delay_prob else ""))

    def _draws(self, n: int, g: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """n proposals as standard draws: u (n, K + #uniform params) ~ U(0,1) (the weights
        first), z (n, #normal params) ~ N(0,1). Two RNG calls per round."""
        u = torch.rand(n, len(self.components) + _n_uniform(self.components), generator=g,
                       dtype=dtype)
        z = torch.randn(n, _n_params(self.components) - _n_uniform(self.components),
                        generator=g, dtype=dtype)
        return u, z

    def _screen(self, x: Tensor, u: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        fn = _compiled_screen_draws(self.components) if self.compiled else _screen_draws
        return fn(self.components, self.range_constraint, x, u, z)

    def _accepted(
        self, n: int, g: torch.Generator, dtype: torch.dtype
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Accepted proposals (their draws u, z and noise-free curves f) in rounds, n in all."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        x = torch.arange(1, self.n_epochs + 1, dtype=dtype)
        ends = x[[0, -1]]
        got, accept = 0, self._accept_guess
        for _ in range(self.max_rounds):
            if got >= n:
                return
            k = min(int(math.ceil((n - got) / max(accept, 1e-4) * 1.15)) + 16,
                    _CHUNK_COMPILED if self.compiled else _CHUNK)
            u, z = self._draws(k, g, dtype)
            # stage 1: both end points (f(m) > f(1), range, NaN) for every proposal
            idx = self._screen(ends, u, z)[1].nonzero().squeeze(1)
            # stage 2: every epoch, only for the survivors
            u, z = u[idx], z[idx]
            f, ok = self._screen(x, u, z)
            keep = ok.nonzero().squeeze(1)[: n - got]
            got += keep.numel()
            accept = 0.5 * accept + 0.5 * max(int(ok.sum()) / k, 1e-4)
            yield u[keep], z[keep], f[keep]
        if got < n:
            raise RuntimeError(
                f"prior {self.name}: only {got}/{n} curves accepted after {self.max_rounds} "
                "rounds; relax range_constraint or use fewer components"
            )

    def sample(self, n: int, generator: torch.Generator) -> CurveBatch:
        """Draw ``n`` accepted curves; deterministic for a given generator state."""
        m = self.n_epochs
        f = torch.empty(n, m)
        got = 0
        for _, _, fk in self._accepted(n, generator, torch.float32):
            f[got : got + fk.shape[0]] = fk
            got += fk.shape[0]
        if self.converge_prob > 0:
            f = self._converge(f, generator)
        if self.decline_prob > 0:
            f = self._decline(f, generator)
        annealed = torch.zeros(n, dtype=torch.bool)
        if self.anneal_prob > 0:
            f, annealed = self._anneal(f, generator)
        if self.flat_prob > 0:
            f = self._flat(f, generator)
        if self.delay_prob > 0:
            f = self._delay(f, generator)
        z = torch.randn(n, generator=generator)
        sigma = (self.log_sigma_mean + self.log_sigma_std * z).exp()
        y = torch.randn(n, m, generator=generator).mul_(sigma[:, None]).add_(f)
        x = torch.arange(1, m + 1, dtype=torch.float32)
        return CurveBatch(x=x, y=y, f=f, sigma=sigma, annealed=annealed)

    def _converge(self, f: Tensor, g: torch.Generator) -> Tensor:
        """Early convergence: a ``converge_prob`` share of the curves f (n, m) run their whole
        course in the first s m epochs, s ~ U(converge_min, 1), and stay at f(m) after (linear
        interpolation between epochs). End points, range and monotone stretches are kept."""
        n, m = f.shape
        u = torch.rand(n, 2, generator=g)
        s = self.converge_min + (1.0 - self.converge_min) * u[:, 1]
        s = torch.where(u[:, 0] < self.converge_prob, s, torch.ones_like(s))  # (n,)
        tau = (torch.arange(m)[None, :] / s[:, None]).clamp_(max=m - 1)  # (n, m) source epoch - 1
        lo = tau.floor().long().clamp_(max=m - 2)
        frac = tau - lo
        return torch.lerp(f.gather(1, lo), f.gather(1, lo + 1), frac)

    def _decline(self, f: Tensor, g: torch.Generator) -> Tensor:
        """Peak and decline: a ``decline_prob`` share of the curves f (n, m) stay at f(p) from a
        peak epoch p on and lose a drop growing to d (f(p) - f(1)) by epoch m (see the field
        comments); a p with f(p) <= f(1) (the prior's curves may dip) is dropped. Values stay
        within [f(1), f(p)] after the peak, so range and f(m) > f(1) hold."""
        n, m = f.shape
        u = torch.rand(n, 4, generator=g)
        first = math.ceil(self.decline_start * m)  # earliest peak epoch (1-based)
        p = first + (u[:, 1] * (m - first)).long().clamp_(max=m - 1 - first)  # (n,) in first..m-1
        on = (u[:, 0] < self.decline_prob) & (f.gather(1, (p - 1)[:, None])[:, 0] > f[:, 0])
        p = torch.where(on, p, torch.full_like(p, m))  # p = m (or f(p) <= f(1)): unchanged
        t = torch.arange(1, m + 1)[None, :]  # (1, m) epochs
        peak = f.gather(1, (p - 1)[:, None])  # (n, 1) f(p)
        flat = f.gather(1, (torch.minimum(t, p[:, None]) - 1))  # (n, m) f(min(t, p))
        k = torch.exp(math.log(0.5) + u[:, 3] * math.log(4.0))  # (n,) in [1/2, 2]
        frac = ((t - p[:, None]).clamp(min=0) / (m - p).clamp(min=1)[:, None]) ** k[:, None]
        drop = (self.decline_max * u[:, 2] * on)[:, None] * (peak - f[:, :1])  # (n, 1)
        return flat - drop * frac

    def _anneal(self, f: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Learning-rate decay: an ``anneal_prob`` share of the curves f (n, m) gain up to b
        (f(m) - f(1)) from an epoch s on (see the field comments); a curve with f(m) <= f(1)
        gains nothing, and the gain is capped at 1 - max f, so values stay in [0, 1] and the
        curve's values before s are unchanged. Returns the curves and which were drawn into
        the branch (n,) bool (a drawn curve's gain may be 0 or tiny)."""
        n, m = f.shape
        u = torch.rand(n, 6, generator=g)
        s = 1 + (u[:, 1] * math.floor(self.anneal_start * m)).long()  # (n,) in 1..start m
        rise = (f[:, -1] - f[:, 0]).clamp(min=0)
        gain = torch.minimum(self.anneal_max * u[:, 2] * rise, 1.0 - f.amax(1).clamp(max=1.0))
        on = u[:, 0] < self.anneal_prob  # (n,)
        gain = torch.where(on, gain, torch.zeros_like(gain))  # (n,)
        dt = (torch.arange(1, m + 1)[None, :] - s[:, None]).clamp(min=0).float()  # (n, m)
        w = torch.exp(math.log(0.5) + u[:, 4] * math.log(m / 5))  # (n,) in [1/2, m/10]
        k = torch.exp(u[:, 5] * math.log(3.0))  # (n,) in [1, 3]
        jump = 1 - torch.exp(-dt / w[:, None])  # (n, m) a step decay
        ramp = (dt / (m - s).clamp(min=1)[:, None]) ** k[:, None]  # (n, m) a smooth decay
        shape = torch.where((u[:, 3] < 0.5)[:, None], jump, ramp)
        return f + gain[:, None] * shape, on

    def _flat(self, f: Tensor, g: torch.Generator) -> Tensor:
        """Runs that never learn: a ``flat_prob`` share of the curves f (n, m) constant at
        v f(1), v ~ U(0, 1)."""
        u = torch.rand(f.shape[0], 2, generator=g)
        level = (u[:, 1] * f[:, 0])[:, None].expand_as(f)  # (n, m)
        return torch.where((u[:, 0] < self.flat_prob)[:, None], level, f)

    def _delay(self, f: Tensor, g: torch.Generator) -> Tensor:
        """Slow starts: a ``delay_prob`` share of the curves f (n, m) shifted right by t0 ~
        U{0..delay_max m} epochs, flat at their first value before; a shift that would break
        f(m) > f(1) (a peaked curve) is dropped. Values stay within the curve's own range."""
        n, m = f.shape
        u = torch.rand(n, 2, generator=g)
        t0 = (u[:, 1] * (math.floor(self.delay_max * m) + 1)).long()  # (n,) in 0..delay_max m
        t0 = torch.where(u[:, 0] < self.delay_prob, t0, torch.zeros_like(t0))
        last = f.gather(1, (m - 1 - t0)[:, None]).squeeze(1)  # f(m - t0): the new end value
        t0 = torch.where(last > f[:, 0], t0, torch.zeros_like(t0))
        src = (torch.arange(m)[None, :] - t0[:, None]).clamp_(min=0)  # (n, m) source epoch
        return f.gather(1, src)

    def sample_params(
        self, n: int, generator: torch.Generator
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """``n`` accepted parameter sets (no noise): weights (n, K) and, per component, a dict
        of (n, 1) parameters, float64; same proposals and rules as :meth:`sample`, but its own
        draws (it does not reproduce ``sample``'s curves). Used to start MCMC chains. Not for
        slow starts, early convergence, declines, learning-rate decay or flat runs
        (``delay_prob``, ``converge_prob``, ``decline_prob``, ``anneal_prob``, ``flat_prob`` >
        0), which the parametric likelihood does not model."""
        extras = {"delay_prob": self.delay_prob, "converge_prob": self.converge_prob,
                  "decline_prob": self.decline_prob, "anneal_prob": self.anneal_prob,
                  "flat_prob": self.flat_prob}
        if any(extras.values()):
            raise ValueError("sample_params: the MCMC reference models the parametric curves "
                             f"only; use a prior with all of {sorted(extras)} 0 (got {extras})")
        rounds = list(self._accepted(n, generator, torch.float64))
        if not rounds:
            return _from_draws(self.components, *self._draws(0, generator, torch.float64))
        u = torch.cat([r[0] for r in rounds])
        z = torch.cat([r[1] for r in rounds])
        return _from_draws(self.components, u, z)


def _screen(
    components: tuple[str, ...],
    range_constraint: bool,
    x: Tensor,
    w: Tensor,
    params: list[dict[str, Tensor]],
) -> tuple[Tensor, Tensor]:
    """f = sum_k w_k f_k(x; theta_k) (n, m) and the acceptance mask (n,) of lcpfn's rules."""
    f = w[:, :1] * BASES[components[0]].fn(x, params[0])
    for k in range(1, len(components)):
        f = f + w[:, k : k + 1] * BASES[components[k]].fn(x, params[k])
    ok = f[:, -1] > f[:, 0]
    if range_constraint:  # min/max reductions propagate NaN, and NaN fails both comparisons
        lo, hi = torch.aminmax(f, dim=1)
        return f, ok & (lo >= 0) & (hi <= 1)
    return f, ok & ~f.isnan().any(1)


def _specs(components: tuple[str, ...]) -> list[ParamPrior]:
    return [p for c in components for p in BASES[c].params]


def _n_params(components: tuple[str, ...]) -> int:
    return len(_specs(components))


def _n_uniform(components: tuple[str, ...]) -> int:
    return sum(p.dist not in ("normal", "lognormal") for p in _specs(components))


def _from_draws(
    components: tuple[str, ...], u: Tensor, z: Tensor
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Standard draws -> weights (n, K) and each basis' parameters ((n, 1) tensors)."""
    K = len(components)
    iu, iz = K, 0
    params: list[dict[str, Tensor]] = []
    for c in components:
        d = {}
        for p in BASES[c].params:
            if p.dist in ("normal", "lognormal"):
                r, iz = z[:, iz], iz + 1
            else:
                r, iu = u[:, iu], iu + 1
            d[p.name] = p.transform(r)[:, None]
        params.append(d)
    return u[:, :K], params


def _screen_draws(
    components: tuple[str, ...], range_constraint: bool, x: Tensor, u: Tensor, z: Tensor
) -> tuple[Tensor, Tensor]:
    """_screen on proposals given as standard draws (one fused kernel when compiled)."""
    w, params = _from_draws(components, u, z)
    return _screen(components, range_constraint, x, w, params)


@functools.cache
def _compiled_screen_draws(components: tuple[str, ...]) -> Callable[..., tuple[Tensor, Tensor]]:
    return torch.compile(_screen_draws, dynamic=True)


PRIORS: dict[str, CurvePrior] = {
    "lcpfn": CurvePrior(),
    "domhan": CurvePrior(components=DOMHAN_COMPONENTS),
    # the paper's prior plus slow starters (a shape it lacks; see docs/model-card.md)
    "lcpfn-slowstart": CurvePrior(delay_prob=0.2),
    # the same with a quarter as many slow starters (stage 7: between the two trade-offs)
    "lcpfn-slowstart0.05": CurvePrior(delay_prob=0.05),
}


def get_prior(name: str) -> CurvePrior:
    """A registered prior by name (``lcpfn``, ``domhan``, ``lcpfn-slowstart[0.05]``), a
    ``+``-joined list of bases, or either with ``-converge<p>`` (early convergence with
    probability p), then ``-decline<p>`` (peak and decline), then ``-anneal<p>`` (learning-rate
    decay), then ``-flat<p>`` (runs that never learn) and/or then ``-slowstart<p>``
    (slow starters), in that order: every ``CurvePrior.name``
    (what a model's config records) resolves."""
    if name in PRIORS:
        return PRIORS[name]
    for suffix, key in (("-slowstart", "delay_prob"), ("-flat", "flat_prob"),
                        ("-anneal", "anneal_prob"), ("-decline", "decline_prob"),
                        ("-converge", "converge_prob")):
        base, sep, p = name.rpartition(suffix)
        if sep and base and not base.endswith(suffix):
            try:
                prob = float(p)
            except ValueError:
                prob = math.nan
            if 0.0 < prob <= 1.0:
                field_value: dict[str, Any] = {key: prob}
                return replace(get_prior(base), **field_value)
    comps = tuple(name.split("+"))
    if all(c in BASES for c in comps):
        return CurvePrior(components=comps)
    raise ValueError(
        f"prior: unknown name {name!r}; use one of {sorted(PRIORS)} or bases joined by '+' "
        f"from {sorted(BASES)}"
    )


def sample_cutoffs(
    n: int, m: int, generator: torch.Generator, low: int = 1, log_share: float = 0.0
) -> Tensor:
    """Right-censoring for training: one observed-epoch count per curve in [low, m-1], uniform,
    or for a ``log_share`` of the curves log-uniform (``P(c) ~ log((c+1)/c)``: a curve seen for
    one epoch is as likely as one seen for 50-99). ``log_share=0`` draws nothing extra, so the
    uniform stream is unchanged."""
    if not 0.0 <= log_share <= 1.0:
        raise ValueError(f"log_share: must be in [0, 1], got {log_share}")
    cut = torch.randint(low, m, (n,), generator=generator)
    if log_share == 0.0:
        return cut
    lo = max(low, 1)
    u = torch.rand(n, 2, generator=generator)
    # exp(U(log lo, log m)) floored: integer c in [lo, m-1] with P(c) = log((c+1)/c) / log(m/lo)
    c_log = (lo * (m / lo) ** u[:, 1]).floor().long().clamp_(lo, m - 1)
    return torch.where(u[:, 0] < log_share, c_log, cut)
