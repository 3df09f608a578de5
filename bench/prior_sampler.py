"""Prior sampler throughput: curvecast vs lcpfn's `sample_from_prior`, measured in one run.

    pip install --no-deps lcpfn==0.1.3   # the reference implementation
    python bench/prior_sampler.py [--seconds 10] [--threads 1]

lcpfn samples one curve per Python call (numpy, single core). curvecast samples whole batches
(torch); rows: eager and torch.compile'd curve evaluation, on `--threads` intra-op threads
(1 = the same single core as lcpfn).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from prior import CurvePrior


def rate(fn, n_per_call: int, seconds: float) -> float:
    fn()  # warm-up (compilation, caches)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        done += n_per_call
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batch", type=int, default=100_000, help="curves per curvecast call")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    try:
        from lcpfn.domhan_prior import sample_from_prior

        rng = np.random.RandomState(0)
        ref = rate(lambda: [sample_from_prior(rng)()[1] for _ in range(100)], 100, a.seconds)
        rows.append(("lcpfn 0.1.3 sample_from_prior (1 core)", ref))
    except ImportError:
        ref = 3708.0  # measured on this project's reference machine, one core
        rows.append(("lcpfn (not installed; figure from the issue)", ref))
    g = torch.Generator().manual_seed(0)
    for compiled in (False, True):
        p = CurvePrior(compiled=compiled)
        r = rate(lambda p=p: p.sample(a.batch, g), a.batch, a.seconds)
        rows.append((f"curvecast CurvePrior(compiled={compiled}), {a.threads} thread(s)", r))
    print("| sampler | curves/s | ratio vs lcpfn |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {r / ref:.1f}x |")


if __name__ == "__main__":
    main()
