"""The plain-Python service under the HTTP routes: model loading, warm-up, batched prediction.

No web framework here. ``ModelService.load`` verifies the weights (sha256) synchronously — a
failure stops the server from starting; ``ModelService.prepare`` builds the runtime (exporting
or loading the cached ONNX graph), checks it against eager torch and warms it up, after which
the service is *ready*.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfn.bar import BarDistribution
from pfn.errors import CurveError
from pfn.io import load_model, resolve_model_dir
from pfn.predictor import Curve, Predictor, Prepared
from pfn.summary import SummarySpec, posterior_from_logits, summarize_posterior
from serve.export import ensure_onnx
from serve.runtime import ChunkedRuntime, Runtime, check_parity, make_runtime
from serve.settings import ServeSettings

log = logging.getLogger("curvecast.serve")


@dataclass(frozen=True)
class PredictJob:
    """One request's validated, padded curves and what to report for each."""

    prepared: Prepared
    specs: list[SummarySpec]

    @property
    def rows(self) -> int:
        return sum(self.prepared.n_query)


def merge_prepared(ps: Sequence[Prepared]) -> Prepared:
    """Stack padded batches into one (padding to the largest context and query count)."""
    if len(ps) == 1:
        return ps[0]
    B = sum(p.t_ctx.shape[0] for p in ps)
    K = max(p.t_ctx.shape[1] for p in ps)
    Q = max(p.t_qry.shape[1] for p in ps)
    t_ctx = torch.zeros(B, K)
    y_ctx = torch.zeros(B, K)
    mask = torch.zeros(B, K, dtype=torch.bool)
    t_qry = torch.ones(B, Q)
    b = 0
    for p in ps:
        n, k = p.t_ctx.shape
        t_ctx[b : b + n, :k] = p.t_ctx
        y_ctx[b : b + n, :k] = p.y_ctx
        mask[b : b + n, :k] = p.ctx_mask
        t_qry[b : b + n, : p.t_qry.shape[1]] = p.t_qry
        b += n
    return Prepared(
        t_ctx=t_ctx, y_ctx=y_ctx, ctx_mask=mask, t_qry=t_qry,
        n_query=[q for p in ps for q in p.n_query],
        query_epochs=[e for p in ps for e in p.query_epochs],
        scale=torch.cat([p.scale for p in ps]),
        offset=torch.cat([p.offset for p in ps]),
        decay=torch.cat([p.decay for p in ps]),
    )


class FrozenBar(BarDistribution):
    """``BarDistribution`` with its border-derived constants (tail scales, bucket means and
    second moments) computed once: the maths stays in ``pfn.bar``, but a small batch's
    summaries no longer rebuild them on every call (about half their cost). Inference only."""

    def __init__(self, borders: torch.Tensor) -> None:
        super().__init__(borders)
        with torch.no_grad():
            self._scales_c = super()._scales()
            self._means_c = super().bucket_means()
            self._m2_c = super().bucket_second_moments()

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scales_c

    def bucket_means(self) -> torch.Tensor:
        return self._means_c

    def bucket_second_moments(self) -> torch.Tensor:
        return self._m2_c


class ModelService:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.predictor: Predictor | None = None
        self.runtime: Runtime | None = None
        self.model_dir: Path | None = None
        self.ready = threading.Event()
        self.error: str | None = None  # set when preparing the runtime failed
        self.parity: float | None = None

    # --- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Resolve and verify the weights (raises WeightsIntegrityError / ModelNotFoundError)."""
        torch.set_num_threads(self.settings.n_threads)
        self.model_dir = resolve_model_dir(self.settings.model)
        model, cfg = load_model(self.model_dir)
        self.predictor = Predictor(model, cfg)
        self.predictor.bar = FrozenBar(model.bar.borders)
        log.info("loaded model %s (sha256 %s) from %s", self.settings.model_name,
                 self.predictor.sha256, self.model_dir)

    def prepare(self) -> None:
        """Build, verify and warm up the runtime; then mark the service ready."""
        try:
            self._prepare()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("preparing the runtime failed; the server will not become ready")
            raise

    def _prepare(self) -> None:
        assert self.predictor is not None and self.model_dir is not None
        s = self.settings
        model, model_dir, sha = self.predictor.model, self.model_dir, self.predictor.sha256
        t0 = time.perf_counter()

        def build(force: bool = False) -> Runtime:
            if force:
                ensure_onnx(model, model_dir, sha, s.onnx_cache_dir, s.quantize, force=True)
            return make_runtime(s.runtime, model, model_dir, sha, s.onnx_cache_dir,
                                threads=s.n_threads, spin=s.spin, quantize=s.quantize)

        runtime = build()
        if not s.quantize:  # int8 answers differ by design; quantisation is gated by the eval
            try:
                self.parity = check_parity(runtime, model)
            except RuntimeError as e:
                if not runtime.name.startswith("onnx"):
                    raise
                log.warning("%s; re-exporting", e)
                runtime = build(force=True)
                self.parity = check_parity(runtime, model)
        self.runtime = ChunkedRuntime(runtime)
        self.predictor.runtime = self.runtime
        if s.warmup:
            self.warm_up()
        log.info("runtime %s ready in %.1f s (parity %.2g)", runtime.describe(),
                 time.perf_counter() - t0, self.parity or 0.0)
        self.ready.set()

    def warm_up(self) -> None:
        """A few passes at typical shapes (allocations, kernel selection, lazy init)."""
        assert self.predictor is not None
        for b, k, q in ((1, 5, 1), (8, 20, 4), (32, 50, 1)):
            curves = [Curve(np.arange(1, k + 1), np.linspace(0.2, 0.6, k), horizon=100,
                            query_epochs=np.linspace(50, 100, q)) for _ in range(b)]
            self.run_predict_batch([self.make_job(curves, [SummarySpec()] * b)])

    # --- serving ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.settings.model_name

    @property
    def runtime_name(self) -> str:
        return self.runtime.name if self.runtime is not None else "loading"

    def model_ref(self) -> dict[str, Any]:
        assert self.predictor is not None
        return {"name": self.name, "sha256": self.predictor.sha256, "runtime": self.runtime_name}

    def model_card(self, routes: Sequence[str]) -> dict[str, Any]:
        assert self.predictor is not None
        rt: dict[str, Any] = (self.runtime.describe() if self.runtime is not None
                              else {"name": "loading"})
        if self.parity is not None:
            rt["parity_max_abs_logit_diff"] = self.parity
        return {"name": self.name, "sha256": self.predictor.sha256,
                "config": self.predictor.config, "runtime": rt, "ready": self.ready.is_set(),
                "routes": list(routes)}

    def check_limits(self, curves: Sequence[Curve]) -> None:
        s = self.settings
        if len(curves) > s.max_curves_per_request:
            raise CurveError(None, "curves", f"{len(curves)} curves exceed this server's limit "
                             f"of {s.max_curves_per_request} per request",
                             "split the request into smaller ones")
        rows = 0
        for i, c in enumerate(curves):
            n = len(c.epochs)
            if n > s.max_points_per_curve:
                raise CurveError(i, "epochs", f"{n} points exceed this server's limit of "
                                 f"{s.max_points_per_curve} per curve", "subsample the curve "
                                 f"(the model uses at most {self.max_context} points)")
            nq = len(c.query_epochs) if c.query_epochs is not None else 1
            if nq > s.max_query_epochs:
                raise CurveError(i, "query_epochs", f"{nq} query epochs exceed this server's "
                                 f"limit of {s.max_query_epochs}", "ask for fewer epochs")
            rows += nq
        if rows > s.max_rows_per_request:
            raise CurveError(None, "curves", f"{rows} query rows (curves x query epochs) exceed "
                             f"this server's limit of {s.max_rows_per_request} per request",
                             "split the request or ask for fewer query epochs")

    @property
    def max_context(self) -> int:
        return self.predictor.max_context if self.predictor is not None else 0

    def make_job(self, curves: Sequence[Curve], specs: list[SummarySpec]) -> PredictJob:
        """Validate and pad one request's curves (raises CurveError naming index and field)."""
        assert self.predictor is not None
        self.check_limits(curves)
        return PredictJob(self.predictor.prepare(curves), specs)

    def run_predict_batch(self, jobs: list[PredictJob]) -> list[list[dict[str, Any]]]:
        """One forward pass and one vectorised summary for all jobs; results split per job."""
        assert self.predictor is not None
        p = merge_prepared([j.prepared for j in jobs])
        logits = self.predictor.run(p)
        post, starts = posterior_from_logits(self.predictor, p, logits)
        summaries = summarize_posterior(post, starts, [s for j in jobs for s in j.specs])
        out, a = [], 0
        for j in jobs:
            out.append(summaries[a : a + len(j.specs)])
            a += len(j.specs)
        return out

    def infer_raw(self, t_ctx: np.ndarray, y_ctx: np.ndarray, ctx_mask: np.ndarray,
                  t_qry: np.ndarray) -> np.ndarray:
        """The model's logits (B, Q, n_buckets) for raw tensors (Open Inference Protocol)."""
        assert self.predictor is not None
        out = self.predictor.runtime(torch.from_numpy(t_ctx), torch.from_numpy(y_ctx),
                                     torch.from_numpy(ctx_mask), torch.from_numpy(t_qry))
        return out.float().numpy()
