"""How close a model's final-epoch posterior is to the exact one after one or two epochs.

    python bench/first_epochs.py [--model default] [--model DIR ...] [--prior-curves 4000000]

Early-stopping decisions start from a curve's first epoch or two, where the prior's posterior
predictive needs no MCMC: importance sampling of N prior curves (seeded) weighted by the
Gaussian likelihood of the observed values is exact as N grows (its effective sample size is
printed). Everything is on the prior's own scale and horizon (100 epochs), which is what the
paper protocol feeds the model; models go through ``Predictor`` with bounds (0, 1).

Two tables:
- a grid of first values y1 (one observed epoch): the exact median of the final epoch and each
  model's; an exact posterior is almost flat for y1 <= 0.04, then rises;
- held-out prior curves cut after 1 and 2 epochs, all and those starting below 0.1: per model,
  the mean absolute error of its median and of its 10% / 90% quantiles against the exact ones,
  and the Spearman correlation of its median with the exact median across the curves: how well
  it ranks runs the way exact Bayes would, which is what a rung rule's first decisions rely on.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pfn import Curve, Predictor
from prior.core import get_prior

GRID = (0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.3, 0.5, 0.7)
QS = (0.1, 0.5, 0.9)
LOW = 0.1  # "low start" stratum: first observed value below this


class Exact:
    """Importance-sampled posterior of the final epoch's noisy value given the first epochs."""

    def __init__(self, n: int, seed: int, k_max: int) -> None:
        prior = get_prior("lcpfn")
        g = torch.Generator().manual_seed(seed)
        f, sig, final = [], [], []
        for s in range(0, n, 500_000):
            b = prior.sample(min(500_000, n - s), g)
            f.append(b.f[:, :k_max].double())
            sig.append(b.sigma.double())
            final.append(b.y[:, -1].double())
        order = torch.argsort(torch.cat(final))
        self.final = torch.cat(final)[order]  # (N,) sorted, so quantiles are one cumsum away
        self.f = torch.cat(f)[order]  # (N, k_max)
        self.sig = torch.cat(sig)[order]  # (N,)
        self.m = prior.n_epochs

    def quantiles(self, y: np.ndarray) -> tuple[np.ndarray, float]:
        """(q10, q50, q90) of the final epoch given observed y (k,), and the weights' ESS."""
        k = len(y)
        z = (torch.from_numpy(y)[None, :] - self.f[:, :k]) / self.sig[:, None]
        lw = -0.5 * (z**2).sum(1) - k * self.sig.log()
        w = (lw - lw.max()).exp()
        c = torch.cumsum(w, 0)
        idx = torch.searchsorted(c, torch.tensor(QS, dtype=c.dtype) * c[-1])
        ess = float(w.sum() ** 2 / (w**2).sum())
        return self.final[idx.clamp_max(len(c) - 1)].numpy(), ess


def model_quantiles(pred: Predictor, ys: list[np.ndarray], m: int) -> np.ndarray:
    curves = [Curve(np.arange(1, len(y) + 1), y, horizon=m, bounds=(0.0, 1.0)) for y in ys]
    return np.stack([p.quantile(list(QS))[0] for p in pred.predict(curves)])  # (n, 3)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="name or model directory (repeatable)")
    ap.add_argument("--prior-curves", type=int, default=4_000_000)
    ap.add_argument("--curves", type=int, default=300, help="held-out curves per cutoff")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = a.model or ["default"]
    preds = {n: Predictor.load(n) for n in names}
    ex = Exact(a.prior_curves, a.seed, k_max=2)

    print(f"one observed epoch (horizon {ex.m}): median of the final epoch")
    print(f"{'y1':>5} {'exact':>7} {'ess':>8} " + " ".join(f"{n[-10:]:>10}" for n in names))
    for y1 in GRID:
        q, ess = ex.quantiles(np.array([y1]))
        med = [model_quantiles(p, [np.array([y1])], ex.m)[0, 1] for p in preds.values()]
        print(f"{y1:5.2f} {q[1]:7.4f} {ess:8.0f} " + " ".join(f"{v:10.4f}" for v in med))

    y_all = get_prior("lcpfn").sample(20 * a.curves, torch.Generator().manual_seed(a.seed + 1000))
    y_all_np = y_all.y.double().numpy()
    strata = {"all": y_all_np[: a.curves], "low start": y_all_np[y_all_np[:, 0] < LOW][: a.curves]}
    print("\nheld-out prior curves, final epoch: |error| vs exact and rank agreement (spearman "
          f"of medians); 'low start': first value < {LOW}, where runs look alike at first")
    print(f"{'curves':>10} {'k':>2} {'model':>12} {'|q10|':>7} {'|q50|':>7} {'|q90|':>7} "
          f"{'spearman':>9}")
    for label, y_held in strata.items():
        for k in (1, 2):
            exact = np.stack([ex.quantiles(y_held[i, :k])[0] for i in range(len(y_held))])
            for n, p in preds.items():
                mq = model_quantiles(p, [y_held[i, :k] for i in range(len(y_held))], ex.m)
                err = np.abs(mq - exact).mean(0)
                print(f"{label:>10} {k:2d} {n[-12:]:>12} {err[0]:7.4f} {err[1]:7.4f} "
                      f"{err[2]:7.4f} {spearman(mq[:, 1], exact[:, 1]):9.3f}")


if __name__ == "__main__":
    main()
