"""The inference API: curves in, posteriors out.

    from pfn import Predictor, Curve
    pred = Predictor.load()                       # the embedded default model
    post = pred.predict([Curve([1, 2, 3], [0.3, 0.45, 0.52], horizon=50)])[0]
    post.mean, post.quantile(0.9), post.prob_greater(0.8)

Normalisation (what the model sees). The PFN was trained on curves in [0, 1] that increase.
Each curve's values are mapped affinely to ``y_n`` and every answer is mapped back to the
metric's own units (densities include the Jacobian):

* ``direction="max"`` with ``bounds=(lo, hi)``: ``y_n = (v - lo) / (hi - lo)``;
  ``direction="min"``: ``y_n = (hi - v) / (hi - lo)`` (so improvement is always upwards).
* A missing bound (``bounds=None`` or a ``None`` side) is filled from the observed values:
  with ``span = max(v_max - v_min, 0.01 * max(|v_min|, |v_max|), 1e-12)``, the missing
  ``lo`` is ``v_min - span`` and the missing ``hi`` is ``v_max + span``. For a fully unbounded
  metric the observed values thus occupy the middle third of [0, 1], leaving the prior room to
  move either way. Pass bounds whenever the metric has them (accuracy: ``(0, 1)``; a loss:
  ``(0, initial loss)``): the prior's shape assumptions hold best on such a scale.

Observed values are clipped, in the normalised scale, to the range of the bar distribution's
inner buckets (``Predictor.y_range``, about [-0.013, 1.14] for the shipped models): a value
beyond the worse bound (a diverged loss far above its initial value) reaches the model as
"as bad as the bound". Unclipped, a loss of 400 against bounds (0, 0.77) reaches it as
y_n = -520, far outside anything it saw, and draws arbitrary answers; clipped to the bar's
outer borders (about -1.6) it still reads as a curve about to rise steeply, which put
diverged trials first in successive-halving rankings. 0.1% of the prior's noisy values lie
outside the inner range; clipping them left the paper protocol's log-likelihoods unchanged
(1.600 / 1.962 / 2.278 / 2.441 on 10,000 curves). Answers stay in the metric's own units.

Epochs: ``t = epoch / horizon``. Epochs must be positive, strictly increasing and at most the
horizon; gaps and irregular spacing are fine. NaN values are dropped with their epoch. When more
than ``max_context`` points remain, an evenly spaced subset (always keeping the last point) is
used, as the model was trained with at most ``n_epochs - 1`` observed points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from pfn.bar import BarDistribution
from pfn.errors import CurveError
from pfn.io import load_model
from pfn.model import PFN

ArrayLike = Sequence[float] | np.ndarray
Direction = Literal["max", "min"]
# (t_ctx, y_ctx, ctx_mask, t_qry) -> logits (B, Q, n_buckets); for a model with a decay input
# (PFNConfig.decay_input) also the curves' flags, (..., decay (B,) float32)
Runtime = Callable[..., Tensor]


@dataclass
class Curve:
    """One partial learning curve and the epochs to predict."""

    epochs: ArrayLike  # observed epochs (positive, strictly increasing, <= horizon)
    values: ArrayLike  # observed metric values (NaN entries are dropped)
    horizon: float  # the run's final epoch (its budget); t = epoch / horizon
    query_epochs: ArrayLike | None = None  # epochs to predict; default [horizon]
    direction: Direction = "max"  # "max" for accuracies, "min" for losses
    bounds: tuple[float | None, float | None] | None = None  # known (worst/best-agnostic) range
    lr_decay: bool = False  # the run's learning rate decays before the horizon (a step or a
    # smooth schedule tied to the budget: cosine, linear, exponential); a model with a decay
    # input then expects the late gains such a schedule brings; False: constant or unknown
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, passed through


@dataclass(frozen=True)
class Prepared:
    """A padded batch ready for one forward pass."""

    t_ctx: Tensor  # (B, K) progress of observed points
    y_ctx: Tensor  # (B, K) normalised observed values
    ctx_mask: Tensor  # (B, K) bool, True = real point
    t_qry: Tensor  # (B, Q) progress of query epochs
    n_query: list[int]  # queries per curve
    query_epochs: list[np.ndarray]  # per curve, in the caller's units
    scale: Tensor  # (B,) raw = offset + scale * y_n (negative for direction "min")
    offset: Tensor  # (B,)
    decay: Tensor  # (B,) float32 learning-rate-decay flags (Curve.lr_decay)


class Posterior:
    """Posterior predictive over one or more query epochs (rows), in the metric's units.

    Every method returns an array with one entry per query epoch (and a trailing axis when it
    is given several values or probabilities).
    """

    def __init__(
        self,
        bar: BarDistribution,
        logits: Tensor,
        scale: Tensor,
        offset: Tensor,
        query_epochs: np.ndarray,
    ) -> None:
        self.bar = bar
        self.logits = logits  # (R, n_buckets) float32
        self.scale = scale.to(logits.dtype)  # (R,)
        self.offset = offset.to(logits.dtype)  # (R,)
        self.query_epochs = np.asarray(query_epochs)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def _vals(self, v: float | ArrayLike) -> tuple[Tensor, bool]:
        a = torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=self.logits.dtype)
        if a.ndim == 0:
            return a.expand(len(self)), True
        return a.expand(len(self), a.shape[-1]) if a.ndim == 1 else a, False

    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        s, o = self.scale, self.offset
        if like.ndim == 2:
            return s[:, None], o[:, None]
        return s, o

    @property
    def mean(self) -> np.ndarray:
        return (self.offset + self.scale * self.bar.mean(self.logits)).numpy()

    @property
    def std(self) -> np.ndarray:
        return (self.scale.abs() * self.bar.variance(self.logits).sqrt()).numpy()

    @property
    def median(self) -> np.ndarray:
        return self.quantile(0.5)

    def quantile(self, q: float | ArrayLike) -> np.ndarray:
        qt, _ = self._vals(q)
        if bool(((qt <= 0) | (qt >= 1)).any()):
            raise CurveError(None, "quantiles", f"must lie strictly in (0, 1), got {q}", "fix q")
        s, o = self._affine(qt)
        qn = torch.where(s > 0, qt, 1 - qt)  # a decreasing map swaps the tails
        return (o + s * self.bar.quantile(self.logits, qn)).numpy()

    def _normalised(self, v: float | ArrayLike) -> tuple[Tensor, Tensor]:
        vt, _ = self._vals(v)
        s, o = self._affine(vt)
        return (vt - o) / s, s

    def cdf(self, v: float | ArrayLike) -> np.ndarray:
        yn, s = self._normalised(v)
        c = self.bar.cdf(self.logits, yn)
        return torch.where(s > 0, c, 1 - c).numpy()

    def prob_greater(self, threshold: float | ArrayLike) -> np.ndarray:
        """P(value > threshold) in the metric's units (for a loss: P(loss > threshold))."""
        return 1.0 - self.cdf(threshold)

    def log_density(self, v: float | ArrayLike) -> np.ndarray:
        yn, s = self._normalised(v)
        return (self.bar.log_density(self.logits, yn) - s.abs().log()).numpy()

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """(R, n) draws."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        d = self.bar.sample(self.logits, n, generator=g)
        return (self.offset[:, None] + self.scale[:, None] * d).numpy()

    def rows(self, start: int, stop: int) -> Posterior:
        sl = slice(start, stop)
        return Posterior(
            self.bar, self.logits[sl], self.scale[sl], self.offset[sl], self.query_epochs[sl]
        )


def _as_1d(x: Any, i: int, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CurveError(i, name, f"must be a list of numbers ({e})",
                         f"send numbers in {name}") from e
    if a.ndim != 1:
        raise CurveError(i, name, f"must be one-dimensional, got shape {a.shape}", "flatten it")
    return a


def _normaliser(
    v: np.ndarray, direction: str, bounds: tuple[float | None, float | None] | None, i: int
) -> tuple[float, float]:
    """(scale, offset) with raw = offset + scale * y_n; see the module docstring."""
    lo, hi = bounds if bounds is not None else (None, None)
    vmin, vmax = float(v.min()), float(v.max())
    span = max(vmax - vmin, 0.01 * max(abs(vmin), abs(vmax)), 1e-12)
    lo_f = float(lo) if lo is not None else vmin - span
    hi_f = float(hi) if hi is not None else vmax + span
    if not (np.isfinite(lo_f) and np.isfinite(hi_f)) or hi_f <= lo_f:
        raise CurveError(
            i, "bounds", f"need finite lo < hi, got {bounds}", "pass bounds=[lo, hi] with lo < hi"
        )
    if direction == "max":
        return hi_f - lo_f, lo_f
    if direction == "min":
        return -(hi_f - lo_f), hi_f
    raise CurveError(i, "direction", f"must be 'max' or 'min', got {direction!r}", "fix it")


class Predictor:
    """A PFN and the code around it that turns ragged curves into one padded forward pass."""

    def __init__(
        self,
        model: PFN,
        config: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = config or {"model": model.cfg.to_dict()}
        self.bar = model.bar
        b = model.bar.borders
        # the normalised range observed values are clipped to: the bar's inner buckets
        self.y_range = (float(b[1]), float(b[-2]))
        meta = self.config.get("meta", {})
        self.max_context = max_context or int(meta.get("max_context", 99))
        self.runtime: Runtime = runtime or self._torch_runtime
        self.decay_input = bool(model.cfg.decay_input)  # the runtime takes the decay flags

    @classmethod
    def load(
        cls,
        name_or_path: str | Path | None = None,
        runtime: Runtime | None = None,
        max_context: int | None = None,
    ) -> Predictor:
        """The embedded default model (no argument), a shipped model by name, or a directory."""
        model, cfg = load_model(name_or_path)
        return cls(model, cfg, runtime=runtime, max_context=max_context)

    @property
    def sha256(self) -> str:
        return str(self.config.get("sha256", ""))

    def _torch_runtime(self, t_ctx: Tensor, y_ctx: Tensor, m: Tensor, t_q: Tensor,
                       decay: Tensor | None = None) -> Tensor:
        with torch.inference_mode():
            return self.model.predict(t_ctx, y_ctx, m, t_q, decay)

    def run(self, p: Prepared) -> Tensor:
        """Logits (B, Q, n_buckets) for a prepared batch through the runtime (the decay flags
        only when one is set: at 0 the decay branch adds nothing, and eager torch skips it)."""
        if self.decay_input and bool(p.decay.any()):
            return self.runtime(p.t_ctx, p.y_ctx, p.ctx_mask, p.t_qry, p.decay)
        return self.runtime(p.t_ctx, p.y_ctx, p.ctx_mask, p.t_qry)

    def prepare(self, curves: Sequence[Curve]) -> Prepared:
        """Validate, normalise and pad a batch of curves."""
        if len(curves) == 0:
            raise CurveError(None, "curves", "is empty", "send at least one curve")
        ctx_t, ctx_y, q_t, q_ep, scales, offsets = [], [], [], [], [], []
        for i, c in enumerate(curves):
            if not isinstance(c.lr_decay, (bool, np.bool_)):
                raise CurveError(i, "lr_decay", f"must be true or false, got {c.lr_decay!r}",
                                 "send a boolean")
            if c.lr_decay and not self.decay_input:
                raise CurveError(i, "lr_decay", "is true, but this model has no decay input "
                                 f"(model sha256 {self.sha256[:12] or 'unknown'})",
                                 "load a model with one (the default) or leave lr_decay false")
            h = c.horizon
            if not isinstance(h, (int, float)) or not np.isfinite(h) or h <= 0:
                raise CurveError(i, "horizon", f"must be a positive number, got {h!r}",
                                 "set horizon to the run's final epoch (its budget)")
            e = _as_1d(c.epochs, i, "epochs")
            v = _as_1d(c.values, i, "values")
            if e.shape != v.shape:
                raise CurveError(i, "values", f"has {v.size} entries but epochs has {e.size}",
                                 "send one value per epoch")
            if e.size == 0:
                raise CurveError(i, "epochs", "is empty", "send at least one observed point")
            if not np.isfinite(e).all():
                raise CurveError(i, "epochs", "contains NaN or inf", "send finite epochs")
            if (e <= 0).any():
                raise CurveError(i, "epochs", f"must be positive, got {e[e <= 0][0]:g}",
                                 "count epochs from 1 (the first evaluation after training)")
            if (np.diff(e) <= 0).any():
                k = int(np.argmax(np.diff(e) <= 0))
                raise CurveError(i, "epochs", f"must be strictly increasing; epochs[{k + 1}]="
                                 f"{e[k + 1]:g} follows {e[k]:g}", "sort them and drop duplicates")
            if e[-1] > h:
                raise CurveError(i, "epochs", f"last epoch {e[-1]:g} exceeds horizon {h:g}",
                                 "raise horizon to the run's final epoch")
            if np.isinf(v).any():
                raise CurveError(i, "values", "contains inf", "drop or clip infinite values")
            keep = ~np.isnan(v)
            if not keep.any():
                raise CurveError(i, "values", "has no finite value (all NaN)",
                                 "send at least one observed value")
            e, v = e[keep], v[keep]
            if e.size > self.max_context:
                idx = np.unique(np.round(np.linspace(0, e.size - 1, self.max_context)).astype(int))
                e, v = e[idx], v[idx]
            qe = _as_1d(c.query_epochs if c.query_epochs is not None else [h], i, "query_epochs")
            if qe.size == 0:
                raise CurveError(i, "query_epochs", "is empty", "ask for at least one epoch")
            if not np.isfinite(qe).all() or (qe <= 0).any() or (qe > h).any():
                raise CurveError(i, "query_epochs", f"must lie in (0, horizon={h:g}]",
                                 "ask only for epochs of this run")
            s, o = _normaliser(v, c.direction, c.bounds, i)
            ctx_t.append(e / h)
            ctx_y.append(np.clip((v - o) / s, *self.y_range))
            q_t.append(qe / h)
            q_ep.append(qe)
            scales.append(s)
            offsets.append(o)
        B = len(curves)
        K = max(len(a) for a in ctx_t)
        Q = max(len(a) for a in q_t)
        t_ctx = np.zeros((B, K), np.float32)
        y_ctx = np.zeros((B, K), np.float32)
        mask = np.zeros((B, K), bool)
        t_qry = np.ones((B, Q), np.float32)
        for b in range(B):
            k, q = len(ctx_t[b]), len(q_t[b])
            t_ctx[b, :k], y_ctx[b, :k], mask[b, :k] = ctx_t[b], ctx_y[b], True
            t_qry[b, :q] = q_t[b]
        return Prepared(
            t_ctx=torch.from_numpy(t_ctx),
            y_ctx=torch.from_numpy(y_ctx),
            ctx_mask=torch.from_numpy(mask),
            t_qry=torch.from_numpy(t_qry),
            n_query=[len(a) for a in q_t],
            query_epochs=q_ep,
            scale=torch.tensor(scales, dtype=torch.float64),
            offset=torch.tensor(offsets, dtype=torch.float64),
            decay=torch.tensor([float(c.lr_decay) for c in curves], dtype=torch.float32),
        )

    def posterior_all(self, curves: Sequence[Curve]) -> tuple[Posterior, list[int]]:
        """One Posterior over every query of every curve (rows concatenated) and row offsets."""
        p = self.prepare(curves)
        logits = self.run(p).float()
        rows = torch.cat([logits[b, :q] for b, q in enumerate(p.n_query)])  # (R, n)
        reps = torch.tensor(p.n_query)
        starts = np.concatenate([[0], np.cumsum(p.n_query)]).tolist()
        post = Posterior(
            self.bar,
            rows,
            p.scale.repeat_interleave(reps),
            p.offset.repeat_interleave(reps),
            np.concatenate(p.query_epochs),
        )
        return post, starts

    def predict(self, curves: Sequence[Curve]) -> list[Posterior]:
        """One forward pass for the whole batch; one Posterior per curve."""
        post, starts = self.posterior_all(curves)
        return [post.rows(starts[i], starts[i + 1]) for i in range(len(curves))]
