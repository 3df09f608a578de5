"""Where a model loses log-likelihood on the prior: per noise level, against the true curve.

    python bench/noise_bands.py [--model default] [--model DIR ...] [--cutoff 80] [--curves 3000]
                                [--mcmc 30]

Prior curves (seeded); every model sees the same ones, on the prior's own scale (bounds (0, 1),
which is what the paper protocol, ``pfn.evaluate``, feeds the model). For the epochs after the
cutoff, the mean log-density of the noisy observation at each epoch under the model's
predictive for that epoch (the paper's metric) and under the oracle that knows the noise-free
curve and sigma, N(f_t, sigma^2): an upper bound no posterior reaches. Rows by log sigma (the
prior draws it from N(-4, 1)): the mean gap, its share of the whole gap (the band's weight
times its gap), the model's predictive spread at the first query epoch relative to sigma
(half the 15.9-84.1% interval over sigma, median: near 1 means the model has read the noise
level) and its centre error there (|median - f| / sigma, median: how far the extrapolated
curve is off, in noise units), and both at the horizon. "oracle on buckets" is the same
oracle with its density averaged over each of the model's buckets (its mass in the bucket /
the bucket's width): every density a bar distribution (with or without the sharpening head)
can express is constant on the buckets, so this is the bound for the model's output layer,
and oracle - buckets is what the borders cost.

``--mcmc N`` adds a second table on the first N curves of every band: the same columns for the
oracle, the MCMC reference posterior (``prior.reference``, setting ``gold``: the exact
posterior predictive up to sampling error, ~2.5 s per curve here) and every model, so the gap
a model leaves to the Bayes-optimal answer is visible per band, not only the gap to the oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from pfn import Curve, Predictor
from prior.core import CurveBatch, get_prior
from prior.reference import SETTINGS, mcmc_posterior_predictive

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


def score(pred: Predictor, y: np.ndarray, f: np.ndarray, sig: np.ndarray,
          c: int) -> tuple[np.ndarray, ...]:
    """Per curve: mean log-density of each later epoch's value under that epoch's predictive;
    spread and centre error (in units of sigma) at the first query epoch and at the last."""
    m = y.shape[1]
    x = np.arange(1, m + 1, dtype=np.float64)
    rest = list(range(c + 1, m + 1))
    curves = [Curve(x[:c], y[i, :c], horizon=float(m), query_epochs=rest, bounds=(0.0, 1.0))
              for i in range(len(y))]
    out = np.empty((5, len(y)))  # ll, spread first, error first, spread last, error last
    for j in range(0, len(curves), 256):
        for k, p in enumerate(pred.predict(curves[j:j + 256])):
            i = j + k
            # values of shape (Q, 1): each query epoch's own value (a 1-D array would be
            # evaluated at every query epoch)
            out[0, i] = float(np.mean(p.log_density(y[i, c:, None])[:, 0]))
            lo, med, hi = (p.quantile(q)[[0, -1]] for q in (0.1587, 0.5, 0.8413))
            out[1::2, i] = (hi - lo) / 2 / sig[i]
            out[2::2, i] = np.abs(med - f[i, [c, m - 1]]) / sig[i]
    return tuple(out)


def mcmc_score(batch: CurveBatch, rows: np.ndarray, c: int, seed: int) -> tuple[np.ndarray, ...]:
    """``score`` for the MCMC reference posterior (setting ``gold``) of the curves ``rows``."""
    st = SETTINGS["gold"]
    kw = {k.name: getattr(st, k.name) for k in dataclasses.fields(st)}
    r = mcmc_posterior_predictive(batch.x[:c], batch.y[rows, :c], batch.x[c:],
                                  generator=torch.Generator().manual_seed(seed), **kw)
    ll = r.log_density(batch.y[rows, c:].double()).mean(1).numpy()
    q = r.quantile([0.1587, 0.5, 0.8413])[:, [0, -1]].numpy()  # (n, 2, 3): first, last epoch
    sig = batch.sigma[rows].double().numpy()[:, None]
    f = batch.f[rows][:, [c, -1]].double().numpy()  # (n, 2)
    spread, err = (q[..., 2] - q[..., 0]) / 2 / sig, np.abs(q[..., 1] - f) / sig
    return ll, spread[:, 0], err[:, 0], spread[:, 1], err[:, 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="name or model directory (repeatable)")
    ap.add_argument("--cutoff", type=int, default=80)
    ap.add_argument("--curves", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mcmc", type=int, default=0,
                    help="also compare with the gold MCMC posterior on N curves per band")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batch = get_prior("lcpfn").sample(a.curves, torch.Generator().manual_seed(a.seed))
    y = batch.y.numpy().astype(np.float64)
    f, sig = batch.f.numpy().astype(np.float64), batch.sigma.numpy().astype(np.float64)
    c = a.cutoff
    z = (y[:, c:] - f[:, c:]) / sig[:, None]
    oracle = np.mean(-0.5 * z**2 - np.log(sig[:, None]) - 0.5 * np.log(2 * np.pi), 1)
    ls = np.log(sig)
    names = a.model or ["default"]
    scores = {}
    for name in names:
        pred = Predictor.load(name)
        buckets = bucket_oracle(pred.model.bar.borders, y[:, c:], f[:, c:], sig)
        ll, spread, err, spread_h, err_h = scores[name] = score(pred, y, f, sig, c)
        print(f"{name}: cutoff {c}, {len(y)} prior curves (seed {a.seed}): "
              f"model {ll.mean():.4f}, oracle {oracle.mean():.4f}, gap "
              f"{oracle.mean() - ll.mean():.4f}; oracle on buckets {buckets.mean():.4f}")
        print("| log sigma | share of curves | model | oracle | gap | share of the gap "
              "| spread / sigma | centre error / sigma | the same at the horizon "
              "| oracle on buckets |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        total = float((oracle - ll).sum())
        for lo, hi in BANDS:
            b = (ls >= lo) & (ls < hi)
            gap = oracle[b] - ll[b]
            print(f"| [{lo:g}, {hi:g}) | {b.mean():.2f} | {ll[b].mean():.3f} | "
                  f"{oracle[b].mean():.3f} | {gap.mean():.3f} | {gap.sum() / total:.0%} | "
                  f"{np.median(spread[b]):.2f} | {np.median(err[b]):.2f} | "
                  f"{np.median(spread_h[b]):.2f}, {np.median(err_h[b]):.2f} | "
                  f"{buckets[b].mean():.3f} |")
    if not a.mcmc:
        return
    rows = np.concatenate([np.flatnonzero((ls >= lo) & (ls < hi))[:a.mcmc] for lo, hi in BANDS])
    t0 = time.perf_counter()
    ref = mcmc_score(batch, rows, c, a.seed)
    print(f"\nMCMC (gold) on the first {a.mcmc} curves of every band: "
          f"{(time.perf_counter() - t0) / len(rows):.1f} s per curve. Log-likelihood "
          "(spread / sigma, centre error / sigma at the first query epoch; the same at the "
          "horizon)")
    one, zero = np.ones(len(rows)), np.zeros(len(rows))
    cols = {"oracle": (oracle[rows], one, zero, one, zero), "MCMC": ref}
    cols |= {n: tuple(v[rows] for v in scores[n]) for n in names}
    print("| log sigma | curves | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    lr = ls[rows]
    for lo, hi in BANDS:
        b = (lr >= lo) & (lr < hi)
        print(f"| [{lo:g}, {hi:g}) | {b.sum()} | " + " | ".join(
            f"{v[0][b].mean():.3f} ({np.median(v[1][b]):.2f}, {np.median(v[2][b]):.2f}; "
            f"{np.median(v[3][b]):.2f}, {np.median(v[4][b]):.2f})"
            for v in cols.values()) + " |")
    # bands weighted by their share of all curves, as the prior draws them
    weights = [((ls >= lo) & (ls < hi)).mean() for lo, hi in BANDS]
    sel = [(lr >= lo) & (lr < hi) for lo, hi in BANDS]
    print("| all (band-weighted) | | " + " | ".join(
        f"{sum(w * v[0][b].mean() for w, b in zip(weights, sel, strict=True)):.3f}"
        for v in cols.values()) + " |")


if __name__ == "__main__":
    main()
