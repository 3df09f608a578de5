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


def batch_metrics(srv: LocalServer) -> dict[str, float]:
    """Cumulative batch counters from /metrics."""
    text = httpx.get(srv.url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for name in ("curvecast_batch_rows_sum", "curvecast_batch_rows_count",
                     "curvecast_batch_requests_sum", "curvecast_batch_duration_seconds_sum"):
            if line.startswith(name + " "):
                vals[name] = float(line.split()[1])
    return vals


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (uvicorn workers)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if d.name == str(pid) or f[1] == str(pid):  # f[1]: parent pid
            total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


def phase_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("curvecast_batch_rows_count", 0.0) or 1.0
    return {"passes": d.get("curvecast_batch_rows_count", 0.0),
            "rows_per_pass": round(d.get("curvecast_batch_rows_sum", 0.0) / n, 1),
            "requests_per_pass": round(d.get("curvecast_batch_requests_sum", 0.0) / n, 2),
            "inference_busy_s": round(d.get("curvecast_batch_duration_seconds_sum", 0.0), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measured phase")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--curves", type=int, default=8, help="curves per request at 64 clients")
    ap.add_argument("--points", type=int, default=10, help="observed epochs per curve")
    ap.add_argument("--threads", type=int, default=2, help="server intra-op threads")
    ap.add_argument("--max-wait-us", type=int, default=1000)
    ap.add_argument("--quantize", action="store_true", help="int8 model (CURVECAST_QUANTIZE)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--json", action="store_true", help="print JSON rows too")
    a = ap.parse_args()

    print(f"# curvecast serve HTTP benchmark — {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; {a.seconds:g} s per phase; {a.points} observed "
          f"epochs per curve; server: {a.workers} worker(s) x {a.threads} thread(s)"
          f"{', int8' if a.quantize else ''}")
    rows = {}
    for mode, batching in (("batched", "true"), ("unbatched", "false")):
        env = {"CURVECAST_BATCHING": batching, "CURVECAST_THREADS": str(a.threads),
               "CURVECAST_MAX_WAIT_US": str(a.max_wait_us), "CURVECAST_LOG_LEVEL": "warning",
               "CURVECAST_QUANTIZE": str(a.quantize).lower(),
               "CURVECAST_WORKERS": str(a.workers)}
        with LocalServer(env=env) as srv:
            load(srv, 4, a.curves, a.points, 2.0)  # warm caches, allocator, connections
            c_one = cpu_seconds(srv.pid())
            one = load(srv, 1, 1, a.points, a.seconds, seed=1)
            cpu_one = cpu_seconds(srv.pid()) - c_one
            m0, c0 = batch_metrics(srv), cpu_seconds(srv.pid())
            many = load(srv, a.clients, a.curves, a.points, a.seconds, seed=2)
            ps = phase_stats(m0, batch_metrics(srv))
            ps["server_cpu_s"] = round(cpu_seconds(srv.pid()) - c0, 2)
            rows[mode] = {"one_client": one.summary(), "many_clients": many.summary(),
                          "cpu_ms_per_request_1_client": round(1e3 * cpu_one / max(one.ok, 1),
                                                               2),
                          **ps, "server_rss_mb": round(rss_mb(srv.pid()), 1)}
    print()
    print(f"| mode | 1 client p50 / p90 / p99 (ms) | server CPU ms per request | {a.clients} "
          f"clients x {a.curves} curves: "
          "curves/s | p50 / p99 (ms) | errors | curves per forward pass | server CPU-s per "
          "1000 curves |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        o, m = r["one_client"], r["many_clients"]
        errs = sum(v for k, v in m["statuses"].items() if not k.startswith("2")) + \
            sum(m["transport_errors"].values())
        print(f"| {mode} | {o['p50_ms']} / {o['p90_ms']} / {o['p99_ms']} | "
              f"{r['cpu_ms_per_request_1_client']} | {m['curves_per_s']} "
              f"| {m['p50_ms']} / {m['p99_ms']} | {errs} | {r['rows_per_pass']} | "
              f"{1000 * r['server_cpu_s'] / max(m['curves_per_s'] * m['seconds'], 1):.2f} |")
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
