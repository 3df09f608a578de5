"""HTTP benchmark of `curvecast serve` on this machine (load generator on 127.0.0.1).

Starts the real server (a subprocess, onnxruntime, default model) twice — with dynamic
micro-batching and without (``CURVECAST_BATCHING=false``: one forward pass per request) — and
measures, each phase bounded in time:

* latency at 1 client, one curve per request: p50 / p90 / p99;
* throughput at 64 concurrent clients with several curves per request: curves/s and latency.

Prints a markdown table and the batched/unbatched ratios (measured side by side in one run).
Targets (issue 4): p50 <= 10 ms at 1 client; >= 2000 curves/s at 64 clients.

    python bench/serve_http.py [--seconds 10] [--clients 64] [--curves 8] [--points 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from http_load import curve_bodies, run_load  # noqa: E402

from serve.testing import LocalServer  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(srv: LocalServer, clients: int, curves: int, points: int, seconds: float,
         seed: int = 0):
    bodies = curve_bodies(32, curves, points, seed)
    return asyncio.run(run_load("127.0.0.1", srv.port, "/v1/predict", bodies, clients, seconds,
                                curves))


def batch_stats(srv: LocalServer) -> tuple[float, float]:
    """(mean query rows per forward pass, mean requests per pass) from /metrics."""
    text = httpx.get(srv.url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for name in ("curvecast_batch_rows_sum", "curvecast_batch_rows_count",
                     "curvecast_batch_requests_sum"):
            if line.startswith(name + " "):
                vals[name] = float(line.split()[1])
    n = vals.get("curvecast_batch_rows_count", 0.0) or 1.0
    return (vals.get("curvecast_batch_rows_sum", 0.0) / n,
            vals.get("curvecast_batch_requests_sum", 0.0) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--curves", type=int, default=8, help="curves per request at 64 clients")
    ap.add_argument("--points", type=int, default=10, help="observed epochs per curve")
    ap.add_argument("--threads", type=int, default=2, help="server intra-op threads")
    ap.add_argument("--max-wait-us", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="print JSON rows too")
    a = ap.parse_args()

    print(f"# curvecast serve HTTP benchmark — {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; {a.seconds:g} s per phase")
    rows = {}
    for mode, batching in (("batched", "true"), ("unbatched", "false")):
        env = {"CURVECAST_BATCHING": batching, "CURVECAST_THREADS": str(a.threads),
               "CURVECAST_MAX_WAIT_US": str(a.max_wait_us), "CURVECAST_LOG_LEVEL": "warning"}
        with LocalServer(env=env) as srv:
            load(srv, 4, a.curves, a.points, 2.0)  # warm caches, allocator, connections
            one = load(srv, 1, 1, a.points, a.seconds, seed=1)
            httpx.get(srv.url + "/metrics")
            t = time.perf_counter()
            many = load(srv, a.clients, a.curves, a.points, a.seconds, seed=2)
            rows_per_pass, reqs_per_pass = batch_stats(srv)
            rows[mode] = {"one_client": one.summary(), "many_clients": many.summary(),
                          "rows_per_pass": round(rows_per_pass, 1),
                          "requests_per_pass": round(reqs_per_pass, 2),
                          "server_rss_mb": round(rss_mb(srv.pid()), 1)}
            del t
    print()
    print(f"| mode | 1 client p50 / p90 / p99 (ms) | {a.clients} clients x {a.curves} curves: "
          "curves/s | p50 / p99 (ms) | errors | curves per forward pass (mean) |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        o, m = r["one_client"], r["many_clients"]
        errs = sum(v for k, v in m["statuses"].items() if not k.startswith("2")) + \
            sum(m["transport_errors"].values())
        print(f"| {mode} | {o['p50_ms']} / {o['p90_ms']} / {o['p99_ms']} | {m['curves_per_s']} "
              f"| {m['p50_ms']} / {m['p99_ms']} | {errs} | {r['rows_per_pass']} |")
    b, u = rows["batched"]["many_clients"], rows["unbatched"]["many_clients"]
    print(f"\nbatched / unbatched throughput at {a.clients} clients: "
          f"{b['curves_per_s'] / max(u['curves_per_s'], 1e-9):.2f}x")
    p50 = rows["batched"]["one_client"]["p50_ms"]
    print(f"targets: p50 at 1 client {p50} ms (<= 10: {'met' if p50 <= 10 else 'MISSED'}); "
          f"{b['curves_per_s']} curves/s at {a.clients} clients (>= 2000: "
          f"{'met' if b['curves_per_s'] >= 2000 else 'MISSED'})")
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
