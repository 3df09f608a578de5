"""Fan charts: observed points, posterior median, 50% and 90% bands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

import numpy as np

from pfn.predictor import Curve, Posterior


def fan_chart(
    curves: Sequence[Curve],
    posteriors: Sequence[Posterior],
    out: str | IO[bytes],
    titles: Sequence[str] | None = None,
) -> None:
    """Write a PNG with one panel per curve to a path or a binary file object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for k, (c, p) in enumerate(zip(curves, posteriors, strict=True)):
        ax = axes[k // cols][k % cols]
        x = p.query_epochs
        order = np.argsort(x)
        x = x[order]
        q = p.quantile([0.05, 0.25, 0.5, 0.75, 0.95])[order]
        ax.fill_between(x, q[:, 0], q[:, 4], color="tab:blue", alpha=0.18, label="90%")
        ax.fill_between(x, q[:, 1], q[:, 3], color="tab:blue", alpha=0.35, label="50%")
        ax.plot(x, q[:, 2], color="tab:blue", lw=1.5, label="median")
        ax.plot(np.asarray(c.epochs), np.asarray(c.values), "k.", ms=4, label="observed")
        ax.set_xlabel("epoch")
        ax.set_title(titles[k] if titles else f"curve {k}", fontsize=9)
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
