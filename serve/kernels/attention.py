"""PFN attention: a flash-attention-style Triton kernel and its torch twin.

The rule (``pfn.model.pfn_attention_mask``): token i may attend to key j iff ``is_ctx[b, j]`` or
``i == j``. The kernel never builds that (L, L) mask nor any query×query score. Each program
owns ``BLOCK_M`` rows of one (curve, head) and

1. streams the keys ``[0, kv_len[b])`` in blocks of ``BLOCK_N`` with an online softmax, where
   ``kv_len[b]`` is one past the curve's last context token, masking non-context keys with
   ``is_ctx`` (one byte per key);
2. adds each row's own key (its "diagonal") as one more score, for rows that are not context
   (context rows met themselves in step 1).

So the work per curve is ``L × kv_len[b]`` score entries plus ``L`` diagonal ones: in the
inference layout ``[context ; queries]`` that is context × (context + queries), and a curve with
a short context stops early instead of visiting the batch's padded keys (ragged batches).
Rows are the padded layout's rows: padded context slots are computed like queries (their
outputs are ignored by the model), as the rest of the model computes them too.

Numerics: scores and softmax statistics in fp32; fp16/bf16 inputs go through ``tl.dot`` with
fp32 accumulation (P is cast to the input dtype for P·V, as in flash attention); fp32 inputs
use ``input_precision="ieee"`` (no TF32) so fp32 results match SDPA to ~1e-6. Under the
interpreter bf16 is loaded and cast to fp32 (its bf16 arithmetic is broken).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from pfn.model import pfn_attention_mask
from serve.kernels._common import (
    KernelInputError,
    KernelMode,
    Launch,
    check_float,
    is_interpreted,
    next_pow2,
    use_triton,
)

MAX_HEAD_DIM = 256  # a row block of q and the accumulator stay in registers


@triton.jit
def _pfn_attention_kernel(
    Q, K, V, CTX, Out,
    sq_b, sq_h, sq_l, sq_d,
    sk_b, sk_h, sk_l, sk_d,
    sv_b, sv_h, sv_l, sv_d,
    so_b, so_h, so_l, so_d,
    sc_b, sc_l,
    H, L, D,
    qk_scale,  # log2(e) / sqrt(D): scores in base 2
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # cast loads to fp32 (bf16 under the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32, else None (default)
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: large batches exceed 2^31 elements
    h = (pid_bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    Out += b * so_b + h * so_h
    CTX += b * sc_b
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + offs_m[:, None] * sq_l + offs_d[None, :] * sq_d,
                mask=md_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max (finite: no inf - inf)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator · V

    # kv_len: one past the curve's last context token (0 without context), from is_ctx
    last = tl.zeros([BLOCK_N], tl.int32)
    for start_c in range(0, L, BLOCK_N):
        offs_c = start_c + tl.arange(0, BLOCK_N)
        c = tl.load(CTX + offs_c * sc_l, mask=offs_c < L, other=0)
        last = tl.maximum(last, tl.where(c != 0, offs_c + 1, 0))
    kv_len = tl.max(last, 0)
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        nd_ok = n_ok[:, None] & d_ok[None, :]
        is_key = tl.load(CTX + offs_n * sc_l, mask=n_ok, other=0) != 0
        k = tl.load(K + offs_n[:, None] * sk_l + offs_d[None, :] * sk_d,
                    mask=nd_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(V + offs_n[:, None] * sv_l + offs_d[None, :] * sv_d,
                    mask=nd_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(is_key[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # the diagonal: each non-context row's own key, as one more score
    row_ctx = tl.load(CTX + offs_m * sc_l, mask=m_ok, other=0) != 0
    k_self = tl.load(K + offs_m[:, None] * sk_l + offs_d[None, :] * sk_d,
                     mask=md_ok, other=0.0).to(tl.float32)
    v_self = tl.load(V + offs_m[:, None] * sv_l + offs_d[None, :] * sv_d,
                     mask=md_ok, other=0.0).to(tl.float32)
    s_self = tl.sum(q.to(tl.float32) * k_self, 1) * qk_scale
    s_self = tl.where(row_ctx, float("-inf"), s_self)
    m_new = tl.maximum(m_i, s_self)
    alpha = tl.exp2(m_i - m_new)
    p_self = tl.exp2(s_self - m_new)
    l_i = l_i * alpha + p_self
    acc = acc * alpha[:, None] + p_self[:, None] * v_self

    out = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * so_l + offs_d[None, :] * so_d,
             out.to(Out.dtype.element_ty), mask=md_ok)


INTERPRETED = is_interpreted(_pfn_attention_kernel)


def attention_torch(q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor) -> Tensor:
    """The twin: SDPA with the materialised boolean mask (exactly ``pfn.model.Block``)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pfn_attention_mask(is_ctx))


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor) -> None:
    """Raise ``KernelInputError`` unless q, k, v (B, H, L, D) and is_ctx (B, L) fit."""
    if q.ndim != 4:
        raise KernelInputError("q", f"must be (B, H, L, D), got shape {tuple(q.shape)}",
                               "pass q, k, v as (batch, heads, tokens, head_dim)")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise KernelInputError(name, f"shape {tuple(x.shape)} differs from q's "
                                   f"{tuple(q.shape)}", "pass q, k, v of one shape")
        if x.dtype != q.dtype:
            raise KernelInputError(name, f"dtype {x.dtype} differs from q's {q.dtype}",
                                   "pass q, k, v of one dtype")
        if x.device != q.device:
            raise KernelInputError(name, f"on {x.device}, q on {q.device}",
                                   "put q, k, v on one device")
    check_float("q", q)
    B, _, L, D = q.shape
    if D > MAX_HEAD_DIM:
        raise KernelInputError("q", f"head dim must be <= {MAX_HEAD_DIM}, got {D}",
                               "use more heads or mode 'torch'")
    if is_ctx.dtype != torch.bool or tuple(is_ctx.shape) != (B, L):
        raise KernelInputError("is_ctx", f"must be bool ({B}, {L}), got {is_ctx.dtype} "
                               f"{tuple(is_ctx.shape)}", "pass one bool flag per token")
    if is_ctx.device != q.device:
        raise KernelInputError("is_ctx", f"on {is_ctx.device}, q on {q.device}",
                               "put is_ctx on q's device")


def attention_blocks(L: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps), chosen so that the kernel compiles for sm_80 and sm_90
    without register spills (``bench/gpu_kernels.py --compile``); not tuned by timing."""
    if dtype == torch.float32:
        bm, bn = (32, 32) if D <= 64 else (16, 32) if D <= 128 else (16, 16)
    else:
        bm, bn = (32, 64) if D <= 64 else (32, 32) if D <= 128 else (16, 32)
    small = max(16, next_pow2(L))
    return min(bm, small), min(bn, small), 4


def attention_launch(q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor, out: Tensor,
                     block_m: int | None = None, block_n: int | None = None) -> Launch:
    B, H, L, D = q.shape
    ctx = is_ctx.view(torch.uint8)
    bm, bn, warps = attention_blocks(L, D, q.dtype)
    bm, bn = block_m or bm, block_n or bn
    strides = {f"s{n}_{a}": s for n, x in (("q", q), ("k", k), ("v", v), ("o", out))
               for a, s in zip("bhld", x.stride(), strict=True)}
    return Launch(
        grid=(B * H, triton.cdiv(L, bm)),
        args=dict(Q=q, K=k, V=v, CTX=ctx, Out=out, **strides, sc_b=ctx.stride(0),
                  sc_l=ctx.stride(1), H=H, L=L, D=D, qk_scale=math.log2(math.e) / math.sqrt(D)),
        constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_pow2(D)),
                        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
                        PRECISION="ieee" if q.dtype == torch.float32 else None),
        num_warps=warps,
    )


def attention_triton(q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor,
                     block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """The kernel. Returns (B, H, L, D) as a view of a (B, L, H, D) buffer, so the model's
    ``o.transpose(1, 2).reshape(B, L, E)`` costs no copy. Inputs are not validated here."""
    B, H, L, D = q.shape
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
    if out.numel():
        attention_launch(q, k, v, is_ctx, out, block_m, block_n).run(_pfn_attention_kernel)
    return out


def pfn_attention(q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor,
                  mode: KernelMode = "auto") -> Tensor:
    """Attention under the PFN rule for q, k, v (B, H, L, D) and is_ctx (B, L) bool:
    validated, then the kernel (CUDA, or ``mode="triton"``) or the twin."""
    check_attention_inputs(q, k, v, is_ctx)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if use_triton(mode, q, INTERPRETED, grad):
        return attention_triton(q, k, v, is_ctx)
    return attention_torch(q, k, v, is_ctx)


class KernelAttention:
    """A ``pfn.model.AttentionFn`` for ``PFN.set_attention``: ``pfn_attention`` with a fixed
    mode (a plain object, not a module: the model's state_dict is unchanged)."""

    def __init__(self, mode: KernelMode = "auto") -> None:
        use_triton(mode, torch.empty(0), interpreted=True)  # reject an unknown mode now
        self.mode = mode

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, is_ctx: Tensor) -> Tensor:
        return pfn_attention(q, k, v, is_ctx, self.mode)

    def __repr__(self) -> str:
        return f"KernelAttention(mode={self.mode!r})"
