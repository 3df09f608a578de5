"""Triton kernels for the GPU path, each with a pure-torch twin (see docs/kernels.md).

* ``pfn_attention`` — flash-attention-style attention under the PFN mask (context keys plus
  the token itself), never building the L×L mask; twin: SDPA with the boolean mask.
* ``posterior_summary`` — the fused posterior head: bucket logits -> lse, mean, var/std,
  quantiles, P(Y > t), log p(y) in one pass over the buckets; twin: ``pfn.bar.BarDistribution``.

Every entry point takes ``mode``: "auto" runs the kernel on CUDA tensors and the twin
elsewhere, "triton" / "torch" force a path. Wrappers validate shapes and dtypes before launch
and raise ``KernelInputError`` (a ``pfn.errors.CurvecastError``). With ``TRITON_INTERPRET=1``
set before this package is imported, "triton" runs the kernels on CPU tensors (tests).
Importing this package needs Triton; ``serve.runtime`` treats an ImportError as "no kernels".
"""

from __future__ import annotations

import torch

from pfn.model import PFN
from serve.kernels._common import MODES, KernelInputError, KernelMode
from serve.kernels.attention import INTERPRETED, KernelAttention, pfn_attention
from serve.kernels.posterior import PosteriorSummary, posterior_summary

__all__ = [
    "INTERPRETED",
    "MODES",
    "KernelAttention",
    "KernelInputError",
    "KernelMode",
    "PosteriorSummary",
    "disable_kernels",
    "enable_kernels",
    "pfn_attention",
    "posterior_summary",
]


def enable_kernels(model: PFN, mode: KernelMode = "auto") -> PFN:
    """Route ``model``'s attention (eval mode: ``predict`` / ``forward``) through the kernel.
    With "auto" on a machine without CUDA this changes nothing: the model keeps its default
    SDPA path, bit for bit (which also computes only the query rows in the last block).
    Returns the model."""
    fn = KernelAttention(mode)  # rejects an unknown mode
    model.set_attention(None if mode == "auto" and not torch.cuda.is_available() else fn)
    return model


def disable_kernels(model: PFN) -> PFN:
    """Back to SDPA with the boolean mask (the default)."""
    model.set_attention(None)
    return model
