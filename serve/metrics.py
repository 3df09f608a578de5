"""Prometheus metrics (prometheus-client), one registry per app.

With several uvicorn workers every process keeps its own counters and a scrape reaches one of
them; run one worker per pod and scale with replicas (deploy/) to keep them exact.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("curvecast_http_requests", "HTTP requests",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("curvecast_http_request_duration_seconds",
                                 "HTTP request latency (receive to last byte)", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("curvecast_batch_rows",
                                    "query rows (curves x query epochs) per forward pass",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("curvecast_batch_requests",
                                        "requests coalesced into one forward pass",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("curvecast_batch_duration_seconds",
                                       "forward pass + summaries of one batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("curvecast_queue_rows", "query rows waiting for the model",
                                 registry=r)
        self.rejected = Counter("curvecast_rejected", "requests refused because the queue was full",
                                registry=r)
        self.curves = Counter("curvecast_curves", "curves predicted", registry=r)
        self.ready = Gauge("curvecast_ready", "1 once the model is loaded and warmed up",
                           registry=r)
        self.model = Info("curvecast_model", "served model", registry=r)

    def on_batch(self, rows: int, jobs: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(jobs)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
