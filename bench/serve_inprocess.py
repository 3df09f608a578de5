"""In-process: the server's batched path vs one forward pass per request.

The same requests (``--curves`` curves each, ``--points`` observed epochs, one query) go
through ``ModelService.run_predict_batch`` — the code behind ``POST /v1/predict`` (forward pass
on onnxruntime + vectorised posterior summaries) — either one request per call (what the server
does without micro-batching) or ``--batch`` query rows per call (what the micro-batcher
coalesces). Bounded in time; prints curves/s of both and their ratio, measured side by side.

    python bench/serve_inprocess.py [--seconds 5] [--curves 1] [--batch 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pfn.predictor import Curve
from pfn.summary import SummarySpec
from serve.service import ModelService
from serve.settings import ServeSettings


def run(fn, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--curves", type=int, default=1, help="curves per request")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256, help="query rows per coalesced pass")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime/torch threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    svc = ModelService(ServeSettings(threads=a.threads))
    svc.load()
    svc.prepare()
    rng = np.random.default_rng(0)
    jobs = []
    for _ in range(512):
        cs = []
        for _ in range(a.curves):
            e = np.arange(1, a.points + 1)
            cs.append(Curve(e, 0.9 - 0.6 * e ** -rng.uniform(0.3, 1.5), horizon=100,
                            bounds=(0, 1)))
        jobs.append(svc.make_job(cs, [SummarySpec()] * a.curves))
    per_pass = max(1, a.batch // a.curves)
    state = {"i": 0}

    def single() -> int:
        j = jobs[state["i"] % len(jobs)]
        state["i"] += 1
        svc.run_predict_batch([j])
        return a.curves

    def batched() -> int:
        i = state["i"] % len(jobs)
        group = (jobs[i:] + jobs[:i])[:per_pass]
        state["i"] += per_pass
        svc.run_predict_batch(group)
        return a.curves * len(group)

    run(single, 0.5)
    run(batched, 0.5)  # warm both shapes
    n1, t1 = run(single, a.seconds)
    n2, t2 = run(batched, a.seconds)
    c1, c2 = n1 / t1, n2 / t2
    print(f"# in-process: {a.curves} curve(s)/request, {a.points} observed epochs, 1 query, "
          f"runtime {svc.runtime_name}, {a.threads} thread(s); {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f}")
    print("\n| path | curves/s | ms per request |")
    print("|---|---|---|")
    print(f"| one forward pass per request | {c1:.0f} | {1e3 * a.curves / c1:.2f} |")
    print(f"| batched ({per_pass} requests per pass) | {c2:.0f} | "
          f"{1e3 * a.curves / c2:.2f} (amortised) |")
    print(f"\nbatched / per-request: {c2 / c1:.1f}x")


if __name__ == "__main__":
    main()
