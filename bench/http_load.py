"""A small closed-loop HTTP/1.1 load generator (asyncio streams, keep-alive, one connection per
client), cheap enough per request to measure the server rather than the client on a 2-core box.

    from bench.http_load import run_load
    stats = asyncio.run(run_load("127.0.0.1", 8000, "/v1/predict", bodies, clients=64,
                                 seconds=10))

Also a CLI: ``python bench/http_load.py --url http://127.0.0.1:8000 --clients 64 --curves 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class LoadStats:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of 2xx answers, seconds
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)  # transport
    curves_ok: int = 0

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def failed(self) -> int:
        return sum(self.statuses.values()) - self.ok + sum(self.errors.values())

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1e3 if self.latencies else float("nan")

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        return {"seconds": round(self.seconds, 2), "requests_ok": self.ok,
                "req_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
                "curves_per_s": round(self.curves_ok / self.seconds, 1) if self.seconds else 0.0,
                "p50_ms": round(self.pct(50), 2), "p90_ms": round(self.pct(90), 2),
                "p99_ms": round(self.pct(99), 2),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "transport_errors": dict(self.errors)}


def curve_bodies(n_bodies: int, curves: int, points: int, seed: int = 0) -> list[bytes]:
    """Distinct /v1/predict bodies: `curves` rising noisy curves of `points` epochs each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_bodies):
        cs = []
        for _ in range(curves):
            e = np.arange(1, points + 1)
            v = 0.9 - 0.6 * e ** -rng.uniform(0.3, 1.5) + rng.normal(0, 0.01, points)
            cs.append({"epochs": e.tolist(), "values": np.round(v, 5).tolist(), "horizon": 100,
                       "bounds": [0, 1]})
        out.append(json.dumps({"curves": cs}).encode())
    return out


def _request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def _client(host: str, port: int, reqs: Sequence[tuple[bytes, int]], t_end: float,
                  st: LoadStats, offset: int) -> None:
    reader = writer = None
    i = offset
    while time.perf_counter() < t_end:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            raw, n_curves = reqs[i % len(reqs)]
            i += 1
            t0 = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == b"connection" and v.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            dt = time.perf_counter() - t0
            st.statuses[status] += 1
            if 200 <= status < 300:
                st.latencies.append(dt)
                st.curves_ok += n_curves
            if close:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            st.errors[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run_load(host: str, port: int, path: str, bodies: Sequence[bytes], clients: int,
                   seconds: float, curves_per_body: int, headers: dict[str, str] | None = None
                   ) -> LoadStats:
    """`clients` closed-loop clients for `seconds`; each sends the next body when answered."""
    reqs = [(_request(host, port, path, b, headers or {}), curves_per_body) for b in bodies]
    st = LoadStats()
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(host, port, reqs, t0 + seconds, st, k * 7)
                           for k in range(clients)))
    st.seconds = time.perf_counter() - t0
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--curves", type=int, default=8, help="curves per request")
    ap.add_argument("--points", type=int, default=10, help="observed epochs per curve")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()
    u = urlparse(a.url)
    bodies = curve_bodies(16, a.curves, a.points)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    st = asyncio.run(run_load(u.hostname or "127.0.0.1", u.port or 80, "/v1/predict", bodies,
                              a.clients, a.seconds, a.curves, headers))
    print(json.dumps(st.summary(), indent=1))


if __name__ == "__main__":
    main()
