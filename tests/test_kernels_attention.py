"""PFN attention kernel vs its twin (SDPA with the boolean mask), under the Triton interpreter.

Tolerances (max |kernel - twin|, twin in fp32 on the same inputs): fp32 1e-5 abs + 1e-5 rel;
fp16 2e-3 + 2e-3 rel (P is rounded to fp16 for P·V, as in flash attention); bf16 1e-2 + 1e-2
rel (output rounding; the interpreter computes bf16 inputs in fp32).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before serve.kernels imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from pfn.errors import CurvecastError  # noqa: E402
from pfn.model import pfn_attention_mask  # noqa: E402
from serve.kernels import INTERPRETED, KernelInputError, pfn_attention  # noqa: E402
from serve.kernels._common import use_triton  # noqa: E402
from serve.kernels.attention import attention_torch, attention_triton  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 at import")

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}

# (id, B, H, L, D, context length per curve); tokens after a curve's context are its queries
CASES = [
    ("context-only-L1", 1, 1, 1, 16, [1]),
    ("ctx1-single-query", 1, 2, 2, 16, [1]),
    ("no-context-curve", 2, 1, 3, 16, [0, 2]),
    ("ragged-primes-D8", 3, 2, 13, 8, [7, 1, 0]),
    ("2^k-1", 2, 1, 31, 31, [31, 17]),
    ("multi-block", 2, 2, 37, 16, [29, 5]),
]


def qkv(B: int, H: int, L: int, D: int, dtype: torch.dtype,
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, L, D) as the model makes them: strided views of one projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 3, H, D, generator=g).to(dtype)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # 3×(B, H, L, D), non-contiguous
    return q, k, v


def prefix_ctx(L: int, n_ctx: list[int]) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(n_ctx)[:, None]  # (B, L)


def check(q, k, v, is_ctx, **blocks):
    out = attention_triton(q, k, v, is_ctx, **blocks)
    ref = attention_torch(q.float(), k.float(), v.float(), is_ctx)
    assert out.dtype == q.dtype and out.shape == q.shape
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_twin(case):
    _, B, H, L, D, n_ctx = case
    blocks = {"block_m": 16, "block_n": 16} if case[0] == "multi-block" else {}
    check(*qkv(B, H, L, D, torch.float32), prefix_ctx(L, n_ctx), **blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=[CASES[3][0], CASES[5][0]])
def test_half_precision_matches_twin(case, dtype):
    _, B, H, L, D, n_ctx = case
    blocks = {"block_m": 16, "block_n": 16} if case[0] == "multi-block" else {}
    check(*qkv(B, H, L, D, dtype), prefix_ctx(L, n_ctx), **blocks)


def test_context_with_holes():
    """is_ctx need not be a prefix: non-context keys inside the key range are masked."""
    B, H, L, D = 2, 2, 19, 16
    g = torch.Generator().manual_seed(1)
    is_ctx = torch.rand(B, L, generator=g) < 0.5
    is_ctx[0, -1] = True  # keys span the whole sequence in curve 0
    check(*qkv(B, H, L, D, torch.float32), is_ctx, block_m=16, block_n=16)


def test_queries_do_not_see_each_other():
    """Changing one query's k/v changes no other token's output."""
    B, H, L, D = 1, 1, 7, 16
    q, k, v = (t.contiguous() for t in qkv(B, H, L, D, torch.float32))
    is_ctx = prefix_ctx(L, [4])
    a = attention_triton(q, k, v, is_ctx)
    k2, v2 = k.clone(), v.clone()
    k2[..., 5, :] += 3.0
    v2[..., 5, :] -= 3.0
    b = attention_triton(q, k2, v2, is_ctx)
    others = [i for i in range(L) if i != 5]
    torch.testing.assert_close(a[..., others, :], b[..., others, :], atol=0, rtol=0)
    assert not torch.allclose(a[..., 5, :], b[..., 5, :])


def test_empty_batch():
    q, k, v = qkv(0, 2, 5, 16, torch.float32)
    out = pfn_attention(q, k, v, torch.zeros(0, 5, dtype=torch.bool), mode="triton")
    assert out.shape == (0, 2, 5, 16)


def test_dispatch_modes_and_twin_identity():
    q, k, v = qkv(2, 2, 9, 16, torch.float32)
    is_ctx = prefix_ctx(9, [5, 2])
    twin = attention_torch(q, k, v, is_ctx)
    mask = pfn_attention_mask(is_ctx)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(twin, sdpa)
    assert torch.equal(pfn_attention(q, k, v, is_ctx, mode="auto"), twin)  # CPU: the twin
    assert torch.equal(pfn_attention(q, k, v, is_ctx, mode="torch"), twin)
    torch.testing.assert_close(pfn_attention(q, k, v, is_ctx, mode="triton"), twin,
                               atol=1e-5, rtol=1e-5)


def test_autograd_uses_the_twin_or_refuses():
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv(1, 1, 5, 16, torch.float32))
    is_ctx = prefix_ctx(5, [3])
    pfn_attention(q, k, v, is_ctx, mode="auto").sum().backward()
    assert q.grad is not None and k.grad is not None
    with pytest.raises(KernelInputError, match="mode"):
        pfn_attention(q, k, v, is_ctx, mode="triton")
    with torch.no_grad():
        pfn_attention(q, k, v, is_ctx, mode="triton")  # fine without a graph


def test_triton_mode_needs_cuda_outside_the_interpreter():
    x = torch.zeros(1)
    assert use_triton("triton", x, interpreted=True)
    assert not use_triton("auto", x, interpreted=True)  # auto never picks the interpreter
    with pytest.raises(KernelInputError, match="CUDA"):
        use_triton("triton", x, interpreted=False)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda q, k, v, c: (q[0], k[0], v[0], c), "q"),  # 3-D
        (lambda q, k, v, c: (q, k[:, :, :-1], v, c), "k"),  # shape mismatch
        (lambda q, k, v, c: (q, k, v.double(), c), "v"),  # dtype mismatch
        (lambda q, k, v, c: (q.int(), k.int(), v.int(), c), "q"),  # not float
        (lambda q, k, v, c: (q, k, v, c.int()), "is_ctx"),  # not bool
        (lambda q, k, v, c: (q, k, v, c[:, :-1]), "is_ctx"),  # wrong length
    ],
)
def test_wrapper_rejects_bad_inputs(mutate, field):
    q, k, v = qkv(2, 2, 5, 16, torch.float32)
    q2, k2, v2, c2 = mutate(q, k, v, prefix_ctx(5, [3, 1]))
    for mode in ("auto", "triton", "torch"):
        with pytest.raises(KernelInputError, match=f"^{field}:") as e:
            pfn_attention(q2, k2, v2, c2, mode=mode)
        assert isinstance(e.value, CurvecastError)


def test_head_dim_limit_and_unknown_mode():
    q, k, v = qkv(1, 1, 2, 257, torch.float32)
    with pytest.raises(KernelInputError, match="head dim must be <= 256"):
        pfn_attention(q, k, v, prefix_ctx(2, [1]))
    q, k, v = qkv(1, 1, 2, 16, torch.float32)
    with pytest.raises(KernelInputError, match="mode"):
        pfn_attention(q, k, v, prefix_ctx(2, [1]), mode="cuda")  # type: ignore[arg-type]
