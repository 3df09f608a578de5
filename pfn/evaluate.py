"""Evaluation: the paper's prior protocol and real curve files, with baselines."""

from __future__ import annotations

import torch
from torch import Tensor

from pfn.model import PFN


def prior_log_likelihood(model: PFN, y: Tensor, cutoff: int, batch: int = 1024) -> Tensor:
    """Per-curve mean log-density of the noisy values after ``cutoff`` (paper protocol).

    y: (n, m) noisy prior curves over epochs 1..m; the first ``cutoff`` epochs are observed.
    """
    n, m = y.shape
    t = torch.arange(1, m + 1, dtype=torch.float32, device=y.device) / m
    out = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            yb = y[s : s + batch]
            b = yb.shape[0]
            logits = model.predict(
                t[:cutoff].expand(b, cutoff),
                yb[:, :cutoff],
                torch.ones(b, cutoff, dtype=torch.bool, device=y.device),
                t[cutoff:].expand(b, m - cutoff),
            )
            out.append(model.bar.log_density(logits.float(), yb[:, cutoff:]).mean(1))
    return torch.cat(out)
