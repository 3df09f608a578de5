"""The PFN: a small transformer that maps observed curve points to posterior predictive logits.

Every token is one epoch of one curve. A token is either *context* (an observed (t, y) pair) or a
*query* (an epoch t whose value we want). Context tokens attend to all context tokens; a query
token attends to the context and to itself only, so queries never see each other: the answer for
one query does not depend on which other queries are asked. The attention rule is

    allowed[b, i, j] = is_ctx[b, j] or i == j

which also covers padding (a padded token behaves like a query; its output is ignored) and,
during training, a different number of observed epochs for every curve of a batch.

Epochs enter as progress ``t = epoch / horizon`` (the prior's curves have horizon 100), values as
they are (the prior lives in [0, 1]). There is no positional encoding: order does not matter.
The output is a ``BarDistribution`` over y for every token (see ``pfn/bar.py``).

The sharpening head (``PFNConfig.sharpen_head``). A linear head over 1000 buckets can only make
a narrow peak with large weights: a Gaussian bump of width s needs logit slopes of order 1/s²,
which AdamW's small steps and weight decay reach slowly. On low-noise prior curves at late
cutoffs the plain head's peaks were several times wider than the model's own mean error. Two
extra outputs per query, a temperature tau = exp(a) and a weight pi = sigmoid(b), mix the bar
distribution with a tempered copy of itself, so the model can sharpen a peak (tau > 1) where it
is sure and keep the plain head's tails everywhere. Initialised to a = 0 (tau = 1) and zero
weights, the mixture equals the plain head, so a trained model can be warm-started with it.
Its outputs are normalised log-probabilities: valid logits for everything downstream.

The Gaussian head (``PFNConfig.gauss_head``). Late in a quiet curve the true predictive is
close to a Gaussian (the noise around a curve that is nearly pinned down), and the bar
distribution's shape there is rougher and heavier-shouldered than that: on held-out prior curves
a Gaussian with the bar distribution's own median and 15.9-84.1% half-spread scored +0.008 at
cutoff 80 over the bar distribution itself (docs/model-card.md, *The Gaussian head*). The head
is a small MLP per query with two outputs, a weight w = sigmoid(a + GAUSS_LOGIT0) and a width
factor s = exp(b); the output mixes the bar distribution with that Gaussian, widened by s, put
into the same buckets:

    p'_i = (1 - w) p_i + w (Phi((b_{i+1} - median) / (s sd)) - Phi((b_i - median) / (s sd)))

so the output is still a bar distribution over the same borders (everything downstream, the
ONNX graph and the kernels included, is unchanged). Zero-initialised, it starts at w = 0.047,
s = 1. It is trained on a frozen body (``TrainConfig.trainable = "gauss"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfn.bar import BarDistribution

# An attention implementation under the PFN rule: (q, k, v (B, H, L, D), is_ctx (B, L) bool)
# -> (B, H, L, D), equal to SDPA with pfn_attention_mask(is_ctx). See PFN.set_attention.
AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# bounds of the sharpening head's log temperature (tau in [e^-1, e^4])
LOG_TAU_MIN, LOG_TAU_MAX = -1.0, 4.0
# the sharpening head's outputs are its linear layer's times this gain, so that Adam moves the
# new, zero-initialised layer several times faster than the body in a warm-started run
SHARPEN_GAIN = 8.0
# step inputs (PFNConfig.step_inputs) enter as sign(dy) log(1 + |dy| / DY_UNIT) and
# log(1 + dt / DT_UNIT): a noise step of 0.003 and a jump of 0.3 both land in O(1)
DY_UNIT, DT_UNIT = 1e-3, 1e-2
# the step encoder's output is multiplied by this gain, like the sharpening head's (its last
# layer starts at zero and must grow while the body is already trained); the anchor encoder's too
STEP_GAIN = 4.0
# the Gaussian head: its weight's logit offset (w = sigmoid(-3) = 0.047 at a zero output), the
# quantiles whose half-distance is the Gaussian's sd before the width factor (+-1 sd of a
# normal), the floor of that sd (a sixtieth of the narrowest inner bucket of the shipped
# borders, 6.1e-4: a Gaussian that narrow sits in one bucket anyway) and its MLP's hidden width
GAUSS_LOGIT0 = -3.0
GAUSS_QUANTILES = (0.15865525393145707, 0.5, 0.8413447460685429)
GAUSS_SD_MIN = 1e-5
GAUSS_HIDDEN = 64
# hidden width of the decay adapters (PFNConfig.decay_input), one per block
DECAY_HIDDEN = 64
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@dataclass(frozen=True)
class PFNConfig:
    n_layers: int = 3  # transformer blocks
    d_model: int = 256  # token width E
    n_heads: int = 4  # attention heads; d_model % n_heads == 0
    d_ff: int = 512  # feed-forward hidden width
    n_buckets: int = 1000  # buckets of the output bar distribution
    dropout: float = 0.0  # dropout in attention and feed-forward (0 for the defaults)
    encoder_hidden: int = 64  # hidden width of the (t) and (y) input MLPs
    sharpen_head: bool = False  # per-query temperature tau and weight pi on the bar head:
    # p' = (1 - pi) * p + pi * softmax(tau * logits) (see PFN.bucket_logits); off in old weights
    step_inputs: bool = False  # each context token also sees its step from the previous
    # context point, (dy, dt), through its own encoder (see PFN.embed); off in old weights
    anchor_inputs: bool = False  # every token also sees its offset from the last context
    # point, (y - y_last, t - t_last), through its own encoder (see PFN.embed); off in old weights
    gauss_head: bool = False  # per-query weight w and width s mixing the output with a
    # Gaussian at its own median, in its buckets (see PFN.gauss_mix); off in old weights
    decay_input: bool = False  # a per-curve flag, 1 when the run's learning rate decays
    # before its horizon (the prior's anneal branch): a learned vector on every token and a
    # residual adapter after every block, both times the flag (see PFN.hidden); with the flag
    # at 0 (constant or unknown) the model answers exactly as without them

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "encoder_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_buckets < 3:
            raise ValueError(f"n_buckets: must be >= 3, got {self.n_buckets}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def pfn_attention_mask(is_ctx: Tensor) -> Tensor:
    """Boolean (B, 1, L, L) mask, True = may attend: context keys, plus the token itself."""
    L = is_ctx.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=is_ctx.device)
    return (is_ctx[:, None, None, :] | eye).contiguous()  # (B, 1, L, L)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with SDPA attention."""

    def __init__(self, cfg: PFNConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def make_identity(self) -> None:
        """Zero both residual branches' output layers: the block passes its input through
        unchanged (pre-LN), so a model grown by such blocks answers exactly as before."""
        for m in (self.proj, self.ff2):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def attention(self, h: Tensor, mask: Tensor, attn: AttentionFn | None = None,
                  start: int = 0) -> Tensor:
        """mask: (B, 1, L, L) for SDPA; with an injected ``attn`` it is is_ctx (B, L). With
        start > 0 (SDPA only) the outputs of rows start.. alone: queries come from those rows,
        keys and values from every row."""
        B, L, E = h.shape
        H, D = self.n_heads, E // self.n_heads
        if start == 0:
            q, k, v = self.qkv(h).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)  # 3×(B, H, L, D)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(h[:, start:], w[:E], b[:E]).view(B, -1, H, D).transpose(1, 2)  # (B,H,R,D)
            k, v = F.linear(h, w[E:], b[E:]).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4)
            mask = mask[:, :, start:]  # (B, 1, R, L)
        if attn is None:
            p = self.dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            o = attn(q, k, v, mask)  # (B, H, L, D)
        return self.proj(o.transpose(1, 2).reshape(B, -1, E))  # (B, L - start, E)

    def forward(self, h: Tensor, mask: Tensor, attn: AttentionFn | None = None,
                start: int = 0) -> Tensor:
        """The block's output for rows start.. (all rows by default); start > 0 needs SDPA (the
        last block at inference: only the query tokens' outputs are used)."""
        h = h[:, start:] + self.drop(self.attention(self.ln1(h), mask, attn, start))
        return h + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(h)))))


def _mlp(hidden: int, out: int, inputs: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, out))


def context_steps(t: Tensor, y: Tensor, is_ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dt, has) (B, L): each context token's step from the context point just before it
    in t (found by comparison, so token order does not matter); has is False, and dy = dt = 0,
    for the first context point, queries and padding."""
    before = is_ctx[:, None, :] & (t[:, None, :] < t[:, :, None])  # (B, L, L): j before i
    prev_t, idx = t[:, None, :].expand_as(before).masked_fill(~before, -1.0).max(-1)  # (B, L)
    has = is_ctx & before.any(-1)
    dy = torch.where(has, y - y.gather(1, idx), torch.zeros_like(y))
    dt = torch.where(has, t - prev_t, torch.zeros_like(t))
    return dy, dt, has


def anchor_offsets(t: Tensor, y: Tensor, is_ctx: Tensor) -> tuple[Tensor, Tensor]:
    """(dy, dt) (B, L): every token's offset from its curve's last context point (the one with
    the largest t): dy = y - y_last for context tokens (0 for queries and padding, which carry
    no value), dt = t - t_last for every token (<= 0 in the context, > 0 for a later query)."""
    t_last, idx = t.masked_fill(~is_ctx, -1.0).max(-1, keepdim=True)  # (B, 1)
    dy = torch.where(is_ctx, y - y.gather(1, idx), torch.zeros_like(y))
    return dy, t - t_last


# erfc(x) = t exp(-x^2 + P(t)), t = 1 / (1 + |x| / 2), for x >= 0, with relative error below
# 1.2e-7 everywhere (Numerical Recipes' erfcc, a Chebyshev fit); P's coefficients, highest first
_ERFC_COEFFS = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
                0.09678418, 0.37409196, 1.00002368, -1.26551223)


def _erfc(x: Tensor) -> Tensor:
    """erfc with small *relative* error in the tail, from elementary ops, for ONNX exports:
    torch.erfc exports as 1 - Erf, which loses the tail (erfc(3) to 0.3%, erfc(4) entirely) in
    float32. Eager runs keep torch.special.erfc (one pass instead of twenty)."""
    a = x.abs()
    t = 1.0 / (1.0 + 0.5 * a)
    poly = torch.full_like(t, _ERFC_COEFFS[0])
    for c in _ERFC_COEFFS[1:]:
        poly = poly * t + c
    r = t * torch.exp(poly - a * a)
    return torch.where(x >= 0, r, 2.0 - r)


def _signed_log(x: Tensor, unit: float) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs() / unit)


class PFN(nn.Module):
    """Tokens (t, y, is_ctx) -> bar-distribution logits for every token."""

    def __init__(self, cfg: PFNConfig, borders: Tensor) -> None:
        super().__init__()
        if borders.numel() != cfg.n_buckets + 1:
            raise ValueError(f"borders: need n_buckets + 1 = {cfg.n_buckets + 1} values")
        self.cfg = cfg
        self.t_enc = _mlp(cfg.encoder_hidden, cfg.d_model)
        self.y_enc = _mlp(cfg.encoder_hidden, cfg.d_model)
        self.step_enc = _mlp(cfg.encoder_hidden, cfg.d_model, 2) if cfg.step_inputs else None
        self.anchor_enc = _mlp(cfg.encoder_hidden, cfg.d_model, 3) if cfg.anchor_inputs else None
        # the decay branch (see hidden): a vector and an adapter per block, zero-initialised
        # (their output layers): a warm-started model answers as before for either flag value
        self.decay_emb = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.decay_input else None
        self.decay_adapters = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.d_model), *_mlp(DECAY_HIDDEN, cfg.d_model, cfg.d_model))
            for _ in range(cfg.n_layers)) if cfg.decay_input else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_buckets)
        # (log tau, logit pi) per token; see the module docstring
        self.sharpen = nn.Linear(cfg.d_model, 2) if cfg.sharpen_head else None
        # (weight logit a, log width b) per token; see the module docstring
        self.gauss = _mlp(GAUSS_HIDDEN, 2, cfg.d_model) if cfg.gauss_head else None
        self.bar = BarDistribution(borders)
        self.attention_fn: AttentionFn | None = None  # see set_attention; not in state_dict
        self.apply(self._init)
        if self.sharpen is not None:
            self.reset_sharpen()
        # start silent: a warm-started model answers as before (the Gaussian head: almost,
        # w = 0.047 at a zero output)
        for enc in (self.step_enc, self.anchor_enc, self.gauss, *(self.decay_adapters or ())):
            if enc is not None:
                last = enc[-1]
                assert isinstance(last, nn.Linear)
                nn.init.zeros_(last.weight)

    def reset_sharpen(self) -> None:
        """tau = 1, pi = sigmoid(-2), zero weights: the mixture equals the plain head."""
        assert self.sharpen is not None
        nn.init.zeros_(self.sharpen.weight)
        with torch.no_grad():
            self.sharpen.bias.copy_(torch.tensor([0.0, -2.0]) / SHARPEN_GAIN)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def embed(self, t: Tensor, y: Tensor, is_ctx: Tensor, decay: Tensor | None = None) -> Tensor:
        """Token embeddings (B, L, E): enc(t) for every token, + enc(y) for context tokens,
        + with step inputs, enc(dy, dt) of the step from the previous context point. A step is
        what the noise level and the local slope are made of; from y alone the model has to
        pair up tokens by t through attention to see them. Measured (docs/model-card.md, *Step
        inputs*): +0.023 log-likelihood at cutoff 10 for the same 192k curves of training.
        With anchor inputs, + enc(dy, dt, is_ctx) of the token's offset from the last context
        point, on the same log scales: the end of the curve at the resolution of its noise,
        which extrapolation from a quiet curve needs and enc(y) blurs. With decay inputs,
        + decay (B,) times a learned vector on every token (None: 0; see ``hidden``)."""
        y = torch.where(is_ctx, y, torch.zeros_like(y))  # queries and padding carry no value
        ctx = is_ctx.unsqueeze(-1).to(t.dtype)  # (B, L, 1)
        h = self.t_enc(t.unsqueeze(-1)) + self.y_enc(y.unsqueeze(-1)) * ctx  # (B, L, E)
        if self.step_enc is not None:
            dy, dt, has = context_steps(t, y, is_ctx)
            x = torch.stack([_signed_log(dy, DY_UNIT), torch.log1p(dt / DT_UNIT)], -1)  # (B, L, 2)
            h = h + STEP_GAIN * self.step_enc(x) * has.unsqueeze(-1).to(t.dtype)
        if self.anchor_enc is not None:
            dy, dt = anchor_offsets(t, y, is_ctx)
            x = torch.stack([_signed_log(dy, DY_UNIT), _signed_log(dt, DT_UNIT), ctx[..., 0]], -1)
            h = h + STEP_GAIN * self.anchor_enc(x)  # (B, L, E)
        if self.decay_emb is not None and decay is not None:
            h = h + decay.to(h.dtype)[:, None, None] * self.decay_emb  # (B, L, E)
        return h

    def set_attention(self, fn: AttentionFn | None) -> None:
        """Route attention through ``fn`` in eval mode (e.g. ``serve.kernels``' fused kernel,
        which never builds the L×L mask); None restores SDPA. Training always uses SDPA."""
        self.attention_fn = fn

    def hidden(self, t: Tensor, y: Tensor, is_ctx: Tensor, start: int = 0,
               decay: Tensor | None = None) -> Tensor:
        """Final hidden states (B, L - start, E) of tokens start.. for t, y (B, L) float and
        is_ctx (B, L) bool. With start > 0 (inference: the queries follow the context) the
        last block computes only those rows, which equals slicing the full result.

        The decay branch (decay (B,), models with ``decay_input``): a run whose learning rate
        decays before its horizon gains late what its early values cannot show, so the flag
        must come from the caller. It adds decay times a vector to every token and, after every
        block, decay times an adapter of the block's output (pre-LN MLP, residual). At decay =
        0 (or None) both vanish: the model is exactly its body, which can be kept frozen while
        the branch trains (``TrainConfig.trainable = "decay_emb,decay_adapters"``)."""
        attn = None if self.training else self.attention_fn
        mask = pfn_attention_mask(is_ctx) if attn is None else is_ctx  # what attention takes
        h = self.embed(t, y, is_ctx, decay)
        gate = None
        if self.decay_adapters is not None and decay is not None:
            gate = decay.to(h.dtype)[:, None, None]  # (B, 1, 1)
        rows_only = start > 0 and attn is None  # the last block computes rows start.. only
        for i, blk in enumerate(self.blocks):
            last = rows_only and i == len(self.blocks) - 1
            h = blk(h, mask, attn, start if last else 0)  # (B, L, E); last: (B, L - start, E)
            if gate is not None:
                assert self.decay_adapters is not None
                h = h + gate * self.decay_adapters[i](h)
        if start > 0 and not rows_only:
            h = h[:, start:]  # (B, L - start, E)
        return self.ln_f(h)

    def bucket_logits(self, h: Tensor) -> Tensor:
        """Bucket logits (..., n_buckets) from final hidden states (..., E)."""
        logits = self.head(h)
        if self.sharpen is None:
            if self.gauss is None:
                return logits
            return self.gauss_mix(h, torch.log_softmax(logits, -1))
        a, b = (self.sharpen(h) * SHARPEN_GAIN).unbind(-1)  # log tau, logit pi: (...), (...)
        a = a.clamp(LOG_TAU_MIN, LOG_TAU_MAX)
        plain = torch.log_softmax(logits, -1)
        tempered = torch.log_softmax(logits * a.exp().unsqueeze(-1), -1)
        # log((1 - pi) p + pi p_tau), with log pi = logsigmoid(b), log(1 - pi) = logsigmoid(-b)
        logp = torch.logaddexp(F.logsigmoid(-b).unsqueeze(-1) + plain,
                               F.logsigmoid(b).unsqueeze(-1) + tempered)
        return logp if self.gauss is None else self.gauss_mix(h, logp)

    def gauss_mix(self, h: Tensor, logp: Tensor) -> Tensor:
        """log((1 - w) p + w g) for hidden states h (..., E) and log-probabilities logp (..., n):
        g is the bucket masses of N(median, (s sd)^2), median and sd from logp's quantiles
        (inside a bucket by linear interpolation, as BarDistribution.quantile; the outer
        buckets likewise, between their finite borders). See the module docstring."""
        assert self.gauss is not None
        a, b = self.gauss(h).unbind(-1)  # (...), (...)
        # The median in float64 (a cumsum over 1000 buckets in float32 moves it enough to move
        # log g by ~1e-4 at 3 sd of a narrow Gaussian), then carried as a float32 pair
        # hi + lo, so that b - median is exact near the median (Sterbenz) without a float64
        # tensor per bucket.
        f64 = torch.float64
        borders = self.bar.borders.to(logp.dtype)
        p = logp.exp()
        cum = p.to(f64).cumsum(-1)  # (..., n)
        q = torch.tensor(GAUSS_QUANTILES, dtype=f64, device=logp.device)
        # first bucket whose cumulative mass reaches q, by counting (exports to ONNX)
        idx = (cum.unsqueeze(-2) < q[:, None]).sum(-1).clamp(max=cum.shape[-1] - 1)  # (..., 3)
        mass = p.gather(-1, idx).to(f64)
        u = ((q - cum.gather(-1, idx) + mass) / mass.clamp_min(1e-30)).clamp(0, 1)
        lo, hi = borders[idx].to(f64), borders[idx + 1].to(f64)
        x = lo + u * (hi - lo)  # (..., 3) the quantiles, float64
        m_hi = x[..., 1:2].to(logp.dtype)
        m_lo = (x[..., 1:2] - m_hi.to(f64)).to(logp.dtype)
        sd = ((x[..., 2] - x[..., 0]) / 2 * b.to(f64).exp()).clamp_min(GAUSS_SD_MIN)
        sd = sd.to(logp.dtype).unsqueeze(-1)  # (..., 1)
        z = ((borders[1:-1] - m_hi) - m_lo) / sd  # (..., n - 1) the inner borders
        # the Gaussian's mass beyond each border on its side of the median (exact in the tails;
        # 0 beyond the outer ends): a bucket's mass is the difference of its two borders'
        # tails, or for the one bucket holding the median, 1 minus their sum
        erfc = _erfc if torch.compiler.is_exporting() else torch.special.erfc
        tail = F.pad(0.5 * erfc(z.abs() * _SQRT_HALF), (1, 1))  # (..., n + 1)
        above = F.pad(z > 0, (0, 1), value=True)  # (..., n): the bucket's upper border > median
        below = F.pad(z <= 0, (1, 0), value=True)  # (..., n): its lower border <= median
        g = torch.where(above & below, 1 - tail[..., :-1] - tail[..., 1:],
                        (tail[..., :-1] - tail[..., 1:]).abs())
        # a bucket narrow against sd loses its mass to the difference of two close tails;
        # there the midpoint rule with its second-order term is exact to ~dz^4 instead (the
        # outer buckets hold a whole tail: never; their width of 1e3 keeps dz >= 0.05 for any
        # sd below 2e4, and finite: an infinite one gives NaN gradients through the where)
        width = F.pad(borders[2:-1] - borders[1:-2], (1, 1), value=1e3)  # (n,)
        dz = width / sd  # (..., n)
        zm = (((borders[1:] + borders[:-1]) / 2 - m_hi) - m_lo) / sd
        dzc = dz.clamp(max=1.0)  # the unused side of the where stays finite
        g_mid = torch.exp(-0.5 * zm * zm) * _INV_SQRT_2PI * dzc * (1 + (zm * zm - 1) * dzc**2 / 24)
        log_g = torch.log(torch.where(dz < 0.05, g_mid, g).clamp_min(1e-38))
        a = (a + GAUSS_LOGIT0).unsqueeze(-1)
        return torch.logaddexp(F.logsigmoid(-a) + logp, F.logsigmoid(a) + log_g)

    def forward(self, t: Tensor, y: Tensor, is_ctx: Tensor, select: Tensor | None = None,
                decay: Tensor | None = None) -> Tensor:
        """Logits (B, L, n_buckets), or (N, n_buckets) for the N tokens where select is True
        (training: the head runs on query tokens only); decay (B,) as in ``embed``."""
        h = self.hidden(t, y, is_ctx, decay=decay)  # (B, L, E)
        return self.bucket_logits(h if select is None else h[select])

    def predict(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor,
                decay: Tensor | None = None) -> Tensor:
        """Logits (B, Q, n_buckets) for query epochs t_qry (B, Q) given a padded context
        t_ctx, y_ctx (B, K) whose valid entries ctx_mask (B, K) marks, and with decay inputs
        each curve's flag decay (B,) (None: 0). Inference layout: the head runs on query
        tokens only."""
        K = t_ctx.shape[1]
        t = torch.cat([t_ctx, t_qry], 1)  # (B, K+Q)
        y = torch.cat([y_ctx, torch.zeros_like(t_qry)], 1)  # (B, K+Q)
        is_ctx = torch.cat([ctx_mask, torch.zeros_like(t_qry, dtype=torch.bool)], 1)
        return self.bucket_logits(self.hidden(t, y, is_ctx, start=K, decay=decay))  # (B,Q,n)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
