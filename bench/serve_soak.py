"""Reliability soak of `curvecast serve`: sustained load, memory, overload and recovery.

One real server (subprocess, onnxruntime, default model) with a bounded queue, then:

1. *steady*: ``--clients`` (64) concurrent clients for ``--seconds`` (60); the server's RSS is
   sampled every 2 s. Pass: 0 errors, RSS growth after the first 10 s under 10% (flat).
2. *overload*: ``--overload-clients`` (512) clients x 16 curves for 10 s against a queue of
   ``--queue`` (2048) query rows: more work than fits, so some requests must be refused with
   503 + Retry-After — and nothing else (no 5xx other than 503, no dropped connections).
3. *recovery*: back to 8 clients for 10 s. Pass: 0 errors.

    python bench/serve_soak.py [--seconds 60] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from http_load import curve_bodies, run_load  # noqa: E402
from serve_http import rss_mb  # noqa: E402

from serve.testing import LocalServer  # noqa: E402


def phase(srv: LocalServer, clients: int, curves: int, seconds: float, seed: int):
    bodies = curve_bodies(32, curves, 10, seed)
    return asyncio.run(run_load("127.0.0.1", srv.port, "/v1/predict", bodies, clients, seconds,
                                curves))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--curves", type=int, default=4, help="curves per request (steady)")
    ap.add_argument("--overload-clients", type=int, default=512)
    ap.add_argument("--queue", type=int, default=2048, help="server max_queue_size (rows)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    env = {"CURVECAST_THREADS": str(a.threads), "CURVECAST_MAX_QUEUE_SIZE": str(a.queue),
           "CURVECAST_MAX_ROWS_PER_REQUEST": str(min(a.queue, 1024)),
           "CURVECAST_LOG_LEVEL": "warning"}
    print(f"# curvecast serve soak — {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    with LocalServer(env=env) as srv:
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            t0 = time.perf_counter()
            while not done.is_set():
                samples.append((time.perf_counter() - t0, rss_mb(srv.pid())))
                done.wait(2.0)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        steady = phase(srv, a.clients, a.curves, a.seconds, seed=1)
        done.set()
        th.join()
        after = [r for t, r in samples if t >= 10] or [r for _, r in samples]
        growth = (after[-1] - after[0]) / after[0]
        s = steady.summary()
        ok1 = steady.failed == 0 and growth < 0.10
        print(f"\n1. steady: {a.clients} clients x {a.curves} curves for {a.seconds:g} s: "
              f"{s['requests_ok']} requests ({s['curves_per_s']} curves/s), p50 {s['p50_ms']} "
              f"ms, p99 {s['p99_ms']} ms, errors {steady.failed}; RSS {samples[0][1]:.0f} MB at "
              f"start, {after[0]:.0f} -> {after[-1]:.0f} MB from 10 s on "
              f"({growth * 100:+.1f}%), max {max(r for _, r in samples):.0f} MB: "
              f"{'PASS' if ok1 else 'FAIL'}")

        over = phase(srv, a.overload_clients, 16, 10.0, seed=2)
        o = over.summary()
        n503 = over.statuses.get(503, 0)
        other = over.failed - n503
        ok2 = n503 > 0 and other == 0
        print(f"2. overload: {a.overload_clients} clients x 16 curves for 10 s, queue "
              f"{a.queue} rows: {o['requests_ok']} answered 200, {n503} refused 503 "
              f"(Retry-After), other errors {other} {o['transport_errors']}: "
              f"{'PASS' if ok2 else 'FAIL'}")

        rec = phase(srv, 8, a.curves, 10.0, seed=3)
        r = rec.summary()
        ok3 = rec.failed == 0 and rec.ok > 0
        print(f"3. recovery: 8 clients for 10 s: {r['requests_ok']} requests, p50 "
              f"{r['p50_ms']} ms, errors {rec.failed}: {'PASS' if ok3 else 'FAIL'}")
        healthy = srv.proc is not None and srv.proc.poll() is None
        print(f"server still running: {healthy}; RSS now {rss_mb(srv.pid()):.0f} MB")
        sys.exit(0 if ok1 and ok2 and ok3 and healthy else 1)


if __name__ == "__main__":
    main()
