"""Where a model loses log-likelihood on the prior: per noise level, against the true curve.

    python bench/noise_bands.py [--model default] [--model DIR ...] [--cutoff 80] [--curves 3000]

Prior curves (seeded); every model sees the same ones. For the epochs after the cutoff, the
mean log-density of the noisy observations under the model (the paper's metric) and under
the oracle that knows the noise-free curve and sigma, N(f_t, sigma^2): an upper bound no
posterior reaches. Rows by log sigma (the prior draws it from N(-4, 1)): the mean gap, its
share of the whole gap (the band's weight times its gap), and the model's predictive spread
at the first query epoch relative to sigma (std / sigma, median): near 1 means the model has
read the noise level. "oracle on buckets" is the same oracle with its density averaged over
each of the model's buckets (its mass in the bucket / the bucket's width): every density a bar
distribution (with or without the sharpening head) can express is constant on the buckets, so
this is the bound for the model's output layer, and oracle - buckets is what the borders cost.
It is computed on the prior's own scale, which is what the paper protocol (``pfn.evaluate``)
feeds the model; the model column goes through ``Predictor``, which rescales each curve by its
observed range (finer buckets for a flat curve, coarser for a steep one).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pfn import Curve, Predictor
from prior.core import get_prior

BANDS = ((-9.0, -5.5), (-5.5, -5.0), (-5.0, -4.0), (-4.0, -3.0), (-3.0, 0.0))


def bucket_oracle(borders: torch.Tensor, y: np.ndarray, f: np.ndarray,
                  sig: np.ndarray) -> np.ndarray:
    """Per curve: mean log of the oracle's mass in the bucket holding y over that bucket's width."""
    b = borders.double()
    yt, ft = torch.from_numpy(y), torch.from_numpy(f)
    st = torch.from_numpy(sig)[:, None].expand_as(yt)
    k = torch.searchsorted(b, yt.contiguous()).clamp(1, len(b) - 1) - 1  # (n, q) bucket index
    lo, hi = b[k], b[k + 1]
    mass = torch.special.ndtr((hi - ft) / st) - torch.special.ndtr((lo - ft) / st)
    return (mass.clamp_min(1e-300).log() - (hi - lo).log()).mean(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="name or model directory (repeatable)")
    ap.add_argument("--cutoff", type=int, default=80)
    ap.add_argument("--curves", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batch = get_prior("lcpfn").sample(a.curves, torch.Generator().manual_seed(a.seed))
    y = batch.y.numpy().astype(np.float64)
    f, sig = batch.f.numpy().astype(np.float64), batch.sigma.numpy().astype(np.float64)
    c, m = a.cutoff, y.shape[1]
    x = np.arange(1, m + 1, dtype=np.float64)
    rest = list(range(c + 1, m + 1))
    z = (y[:, c:] - f[:, c:]) / sig[:, None]
    oracle = np.mean(-0.5 * z**2 - np.log(sig[:, None]) - 0.5 * np.log(2 * np.pi), 1)
    ls = np.log(sig)
    for name in a.model or ["default"]:
        pred = Predictor.load(name)
        buckets = bucket_oracle(pred.model.bar.borders, y[:, c:], f[:, c:], sig)
        ll, spread = np.empty(len(y)), np.empty(len(y))
        curves = [Curve(x[:c], y[i, :c], horizon=float(m), query_epochs=rest)
                  for i in range(len(y))]
        for j in range(0, len(curves), 256):
            for k, p in enumerate(pred.predict(curves[j:j + 256])):
                ll[j + k] = float(np.mean(p.log_density(y[j + k, c:])))
                spread[j + k] = float(np.asarray(p.std).ravel()[0])
        print(f"{name}: cutoff {c}, {len(y)} prior curves (seed {a.seed}): "
              f"model {ll.mean():.4f}, oracle {oracle.mean():.4f}, gap "
              f"{oracle.mean() - ll.mean():.4f}; oracle on buckets {buckets.mean():.4f}")
        print("| log sigma | share of curves | model | oracle | gap | share of the gap "
              "| std / sigma | oracle on buckets |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        total = float((oracle - ll).sum())
        for lo, hi in BANDS:
            b = (ls >= lo) & (ls < hi)
            gap = oracle[b] - ll[b]
            print(f"| [{lo:g}, {hi:g}) | {b.mean():.2f} | {ll[b].mean():.3f} | "
                  f"{oracle[b].mean():.3f} | {gap.mean():.3f} | {gap.sum() / total:.0%} | "
                  f"{np.median(spread[b] / sig[b]):.2f} | {buckets[b].mean():.3f} |")


if __name__ == "__main__":
    main()
