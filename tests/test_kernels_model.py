"""The whole model's posterior with the kernels equals the one without (Triton interpreter).

A small random-weight PFN (tests/conftest.py ``tiny_model``: 2 layers, 4 heads of width 8,
50 buckets). Logits 1e-5 abs; posterior summaries within the kernel tests' tolerances.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before serve.kernels imports triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pfn.model import PFN  # noqa: E402
from pfn.predictor import Curve, Predictor  # noqa: E402
from serve.kernels import (  # noqa: E402
    INTERPRETED,
    KernelAttention,
    KernelInputError,
    disable_kernels,
    enable_kernels,
    posterior_summary,
)

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 at import")


def ragged_batch(seed: int = 0):
    """3 curves with 6, 2 and 1 context points (padded to 6) and 3 queries each."""
    g = torch.Generator().manual_seed(seed)
    B, K, Q = 3, 6, 3
    t_ctx = torch.sort(torch.rand(B, K, generator=g), 1).values * 0.5
    y_ctx = torch.rand(B, K, generator=g)
    mask = torch.arange(K)[None, :] < torch.tensor([[6], [2], [1]])
    t_qry = 0.5 + 0.5 * torch.rand(B, Q, generator=g)
    return t_ctx, y_ctx, mask, t_qry


def test_predict_and_posterior_equal_with_kernels(tiny_model: PFN):
    x = ragged_batch()
    with torch.inference_mode():
        ref = tiny_model.predict(*x)  # (B, Q, n)
        enable_kernels(tiny_model, "triton")
        out = tiny_model.predict(*x)
        disable_kernels(tiny_model)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    borders = tiny_model.bar.borders
    levels, points = [0.05, 0.5, 0.95], [0.2, 0.7, 1.1]
    a = posterior_summary(out, borders, levels, points, points, mode="triton")
    b = posterior_summary(ref, borders, levels, points, points, mode="torch")
    torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std, b.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.quantiles, b.quantiles, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.prob_greater, b.prob_greater, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.log_density, b.log_density, atol=1e-4, rtol=1e-4)


def test_predictor_posteriors_equal_with_kernels(tiny_model: PFN):
    """The public API path (Predictor -> model.predict) with the kernels routed in."""
    curves = [
        Curve([1, 2, 3, 4, 5], [0.3, 0.45, 0.52, 0.55, 0.6], horizon=20,
              query_epochs=[10, 20], bounds=(0, 1)),
        Curve([1], [0.2], horizon=10, bounds=(0, 1)),
        Curve([2, 4, 6], [1.2, 0.9, 0.8], horizon=30, direction="min", bounds=(0, 2)),
    ]
    pred = Predictor(tiny_model)
    ref = pred.predict(curves)
    enable_kernels(tiny_model, "triton")
    try:
        out = pred.predict(curves)
    finally:
        disable_kernels(tiny_model)
    for r, o in zip(ref, out, strict=True):
        np.testing.assert_allclose(o.mean, r.mean, atol=1e-5)
        np.testing.assert_allclose(o.quantile([0.1, 0.9]), r.quantile([0.1, 0.9]), atol=1e-4)
        np.testing.assert_allclose(o.prob_greater(0.5), r.prob_greater(0.5), atol=1e-5)


def test_auto_on_cpu_is_the_default_path_bit_for_bit(tiny_model: PFN):
    x = ragged_batch(1)
    with torch.inference_mode():
        ref = tiny_model.predict(*x)
        enable_kernels(tiny_model, "auto")
        out = tiny_model.predict(*x)
    assert torch.equal(out, ref)


def test_routing_keeps_state_dict_and_training_path(tiny_model: PFN):
    keys = {k: v.shape for k, v in tiny_model.state_dict().items()}
    calls = []

    def spy(q, k, v, is_ctx):
        calls.append(tuple(q.shape))
        return KernelAttention("torch")(q, k, v, is_ctx)

    tiny_model.set_attention(spy)
    assert {k: v.shape for k, v in tiny_model.state_dict().items()} == keys
    x = ragged_batch()
    with torch.no_grad():
        tiny_model.predict(*x)
    assert calls == [(3, 4, 9, 8)] * 2  # every layer, (B, H, K+Q, D)
    tiny_model.train()  # training always uses SDPA (dropout, autograd)
    tiny_model.predict(*x).sum().backward()
    assert len(calls) == 2
    tiny_model.eval()
    disable_kernels(tiny_model)
    assert tiny_model.attention_fn is None


def test_enable_rejects_unknown_mode(tiny_model: PFN):
    with pytest.raises(KernelInputError, match="mode"):
        enable_kernels(tiny_model, "fast")  # type: ignore[arg-type]
