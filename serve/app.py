"""The FastAPI app: thin routes over ``serve.service`` and ``serve.batching``.

Start-up (``lifespan``): the weights are loaded and their sha256 verified first — a mismatch
stops the server from starting. Two models when ``early_stop_model`` names another one than
``model`` (the default: ``default`` for predictions, ``stage4`` for ``/v1/early-stop``); both
are verified, and ``/readyz`` waits for both. The runtime (ONNX export or cache, parity check
against eager torch, warm-up) is then prepared on the inference thread while the server
already answers ``/healthz``; ``/readyz`` turns 200 when it is done. Shutdown: uvicorn stops
accepting connections and lets in-flight requests finish (``graceful_timeout_s``); then the
batcher drains its queue and the inference thread stops.

Errors have one JSON shape, ``{"error": {"type", "message", "field"}}``: a ``CurvecastError``
becomes its 4xx/503 status, pydantic validation 422 (naming ``curves[i].field``), anything else
a 500 with the traceback in the log.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pfn import early_stop as es
from pfn.errors import CurvecastError, CurveError
from pfn.predictor import Curve
from pfn.summary import SummarySpec, check_bounds
from serve import protocol as P
from serve.batching import BatchStats, MicroBatcher
from serve.metrics import CONTENT_TYPE, Metrics
from serve.service import ModelService
from serve.settings import ServeSettings, unknown_env_vars

log = logging.getLogger("curvecast.serve")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
BATCHED_PATHS = frozenset({"/v1/predict"})
ARRIVING = "curvecast.arriving"  # scope flag: counted in MicroBatcher.arriving


class NotReady(CurvecastError):
    status_code = 503


class Unauthorized(CurvecastError):
    status_code = 401


class NotFound(CurvecastError):
    status_code = 404


def _error(status: int, type_: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, "field": field}},
                        status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    """("body", "curves", 3, "values", 2, "float") -> "curves[3].values[2]"."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", str(part)) and part not in (
                "float", "int", "bool", "str", "list", "dict", "tuple", "none"):
            out += f".{part}" if out else str(part)
    return out or "body"


def _errors_body(errors: list[dict[str, Any]]) -> tuple[str, str]:
    msgs = []
    if errors and errors[0].get("type") == "json_invalid":
        e = errors[0]
        return (f"body is not valid JSON: {e.get('ctx', {}).get('error', 'decode error')} at "
                f"position {e['loc'][-1]}; send a JSON object", "body")
    for e in errors[:5]:
        where = _loc(tuple(e.get("loc", ())))
        got = repr(e.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        msg = str(e.get("msg", "invalid"))
        msgs.append(f"{where}: {msg}" + (f" (got {got})" if "input" in e and
                                         e.get("type") != "missing" else ""))
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    first = _loc(tuple(errors[0].get("loc", ()))) if errors else None
    return "; ".join(msgs) + more, first or "body"


class Guard:
    """Pure ASGI middleware: API key, request metrics, and the batcher's arrival count."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics,
                 batcher: MicroBatcher) -> None:
        self.app = app
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self.max_body = settings.max_body_bytes
        self.metrics = metrics
        self.batcher = batcher

    def _authorized(self, scope: Scope) -> bool:
        assert self.key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                    return True
            elif name == b"x-api-key" and hmac.compare_digest(value.strip(), self.key):
                return True
        return False

    def _too_large(self) -> JSONResponse:
        return _error(413, "BodyTooLarge", f"request body exceeds this server's limit of "
                      f"{self.max_body} bytes; split the request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        status = 500
        path = scope["path"]
        refused = False  # a 413 went out while the app was reading the body

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def app_send(message: Message) -> None:
            if not refused:
                await send_wrapper(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_body:
                    refused = True
                    await self._too_large()(scope, receive, send_wrapper)
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        arriving = path in BATCHED_PATHS
        if arriving:
            scope[ARRIVING] = True
            self.batcher.arriving += 1
        try:
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                resp = _error(401, "Unauthorized", "missing or wrong API key: send "
                              "'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                              headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_wrapper)
                return
            length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await self._too_large()(scope, receive, send_wrapper)
                return
            await self.app(scope, limited_receive, app_send)
        finally:
            if scope.pop(ARRIVING, False):
                self.batcher.arriving -= 1
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(loop.time() - t0)


def arrived(request: Request) -> None:
    """The request is parsed: it no longer counts as arriving for the batcher."""
    if request.scope.pop(ARRIVING, False):
        request.app.state.batcher.arriving -= 1


def to_curves(curves: Sequence[P.CurveBase], quantiles: list[float]
              ) -> tuple[list[Curve], list[SummarySpec]]:
    out, specs = [], []
    for i, c in enumerate(curves):
        out.append(Curve(
            epochs=c.epochs,
            values=[math.nan if v is None else v for v in c.values],
            horizon=c.horizon,
            query_epochs=c.query_epochs,
            direction=c.direction,
            bounds=check_bounds(list(c.bounds), i) if c.bounds is not None else None,
            lr_decay=c.lr_decay,
        ))
        if isinstance(c, P.CurveIn):
            specs.append(SummarySpec(
                quantiles=tuple(c.quantiles if c.quantiles is not None else quantiles),
                thresholds=tuple(c.thresholds or ()),
                density_at=tuple(c.density_at or ()),
            ))
    return out, specs


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": P.ErrorResponse, "description": "unparseable body (not UTF-8 JSON)"},
    401: {"model": P.ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": P.ErrorResponse, "description": "request body too large"},
    422: {"model": P.ErrorResponse, "description": "invalid input; names the field and the fix"},
    500: {"model": P.ErrorResponse, "description": "server bug (logged)"},
    503: {"model": P.ErrorResponse, "description": "not ready, queue full or shutting down; "
          "see Retry-After"},
}


def _errs(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: ERRORS[c] for c in codes}


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in unknown_env_vars():
        log.warning("ignoring unknown setting %s (not a curvecast serve setting)", name)
    metrics = Metrics()
    service = ModelService(settings)
    es_settings = settings.early_stop_settings()
    # the model behind /v1/early-stop (settings.early_stop_model; the served one when equal)
    es_service = ModelService(es_settings) if es_settings is not None else service
    stats = BatchStats(on_batch=metrics.on_batch, on_queue=metrics.queue_depth.set,
                       on_reject=metrics.rejected.inc)
    batcher = MicroBatcher(service.run_predict_batch, max_batch_size=settings.max_batch_size,
                           max_wait_us=settings.max_wait_us,
                           max_queue_size=settings.max_queue_size, enabled=settings.batching,
                           stats=stats)
    retry = {"Retry-After": str(settings.retry_after_s)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            service.load()  # sha256 verified here: a mismatch stops the start-up
            if es_service is not service:
                es_service.load()
        except CurvecastError as e:
            log.critical("refusing to start: %s", e)
            raise
        assert service.predictor is not None and es_service.predictor is not None
        metrics.model.info({"name": service.name, "sha256": service.predictor.sha256,
                            "model": settings.model,
                            "early_stop_sha256": es_service.predictor.sha256,
                            "early_stop_model": settings.early_stop_model})
        batcher.start()
        loop = asyncio.get_running_loop()

        def prepare_all() -> None:  # the early-stop model first: `ready` means both are
            if es_service is not service:
                try:
                    es_service.prepare()
                except Exception:
                    service.error = f"early-stop model: {es_service.error}"
                    raise
            service.prepare()

        prep = loop.run_in_executor(batcher.executor, prepare_all)

        def prepared(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                metrics.ready.set(1)

        prep.add_done_callback(prepared)
        try:
            yield
        finally:
            metrics.ready.set(0)
            await batcher.close()
            log.info("shut down cleanly")

    app = FastAPI(
        title="curvecast",
        version="0.1.0",
        summary="Bayesian learning-curve extrapolation with a PFN: posterior predictive "
        "distributions and early-stopping decisions for partial training curves.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.early_stop_service = es_service
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.add_middleware(Guard, settings=settings, metrics=metrics, batcher=batcher)

    # --- errors -------------------------------------------------------------------------------

    @app.exception_handler(CurvecastError)
    async def on_user_error(request: Request, e: CurvecastError) -> JSONResponse:
        field = None
        if isinstance(e, CurveError):
            field = f"curves[{e.index}].{e.field}" if e.index is not None else e.field
        status = int(getattr(e, "status_code", 400))
        if status >= 500 and status != 503:
            log.error("%s: %s", type(e).__name__, e)
        return _error(status, type(e).__name__, str(e), field,
                      headers=retry if status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, field = _errors_body(list(e.errors()))
        return _error(422, "ValidationError", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 400 and "parsing the body" in message:
            message = "the body could not be parsed; send UTF-8 encoded JSON"
        return _error(e.status_code, "HTTPError", message,
                      headers=dict(e.headers) if e.headers else None)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return _error(500, "InternalError", "internal server error; the traceback is in the "
                      "server log")

    def require_ready() -> None:
        if not service.ready.is_set():
            detail = f" failed: {service.error}" if service.error else " is warming up"
            raise NotReady(f"model {service.name}{detail}; retry after the Retry-After delay")

    # --- v1 -----------------------------------------------------------------------------------

    @app.post("/v1/predict", response_model=P.PredictResponse,
              responses=_errs(400, 401, 413, 422, 500, 503), tags=["v1"])
    async def predict(req: P.PredictRequest, request: Request) -> Response:
        """Posterior summaries per curve and query epoch (the schema of `curvecast predict`).

        Concurrent requests are coalesced into one forward pass (dynamic micro-batching)."""
        arrived(request)
        require_ready()
        # shed load before any per-request work when the queue is full; a request over the
        # per-request limit gets its 4xx from make_job instead (retrying could never help)
        rows = sum(1 if c.query_epochs is None else len(c.query_epochs) for c in req.curves)
        if rows <= service.settings.max_rows_per_request:
            batcher.check_room(rows)
        curves, specs = to_curves(req.curves, req.quantiles)
        job = service.make_job(curves, specs)
        result = await batcher.submit("predict", job, job.rows)
        metrics.curves.inc(len(curves))
        return _json({"predictions": result, "model": service.model_ref()})

    @app.get("/v1/models", response_model=P.ModelsResponse, responses=_errs(401), tags=["v1"])
    async def models() -> Response:
        """The served model (and the early-stop model when it is another one): name, weights
        sha256, config, runtime and the routes it answers."""
        served = ["/v1/predict", "/v1/plot", f"/v2/models/{service.name}"]
        if es_service is service:
            return _json({"models": [service.model_card([*served, "/v1/early-stop"])]})
        return _json({"models": [service.model_card(served),
                                 es_service.model_card(["/v1/early-stop"])]})

    @app.post("/v1/plot", responses={200: {"content": {"image/png": {}},
                                           "description": "fan chart PNG"},
                                     **_errs(400, 401, 413, 422, 500, 503)}, tags=["v1"],
              response_class=Response)
    async def plot(req: P.PredictRequest) -> Response:
        """A fan chart (observed points, median, 50% and 90% bands), one panel per curve.

        Curves without ``query_epochs`` are drawn from their last epoch to the horizon."""
        require_ready()
        if len(req.curves) > settings.max_plot_curves:
            raise CurveError(None, "curves", f"{len(req.curves)} curves exceed the plot limit "
                             f"of {settings.max_plot_curves}", "plot fewer curves per request")
        curves, _ = to_curves(req.curves, req.quantiles)
        rows = 0
        for c in curves:
            if c.query_epochs is None:
                last = float(np.asarray(c.epochs, dtype=np.float64)[-1])
                c.query_epochs = (np.linspace(last, c.horizon, 60)[1:] if last < c.horizon
                                  else np.array([c.horizon]))
            rows += len(c.query_epochs)
        service.check_limits(curves)
        assert service.predictor is not None
        pred = service.predictor
        posts = await batcher.call(lambda: pred.predict(curves), rows)
        png = await asyncio.get_running_loop().run_in_executor(
            plot_executor, _render_png, curves, posts)
        return Response(png, media_type="image/png")

    @app.post("/v1/early-stop", response_model=P.EarlyStopResponse,
              responses=_errs(400, 401, 413, 422, 500, 503), tags=["v1"])
    async def early_stop(req: P.EarlyStopRequest, request: Request) -> Response:
        """Stop/continue decisions: is each trial still likely to beat its incumbent?
        (pfn.early_stop.decide; one forward pass for the whole batch.)"""
        require_ready()
        curves, _ = to_curves(req.curves, [])
        service.check_limits(curves)
        rule = es.rule_from_dict(req.rule.model_dump(exclude_none=True))
        assert es_service.predictor is not None
        pred = es_service.predictor
        incumbents = list(req.incumbents)
        quantiles = list(req.quantiles)
        size = sum(es.MAX_CHECKED_EPOCHS if c.query_epochs is None else len(c.query_epochs) + 1
                   for c in curves)
        decisions = await batcher.call(
            lambda: es.decide(pred, curves, incumbents, rule=rule, quantiles=quantiles), size)
        return _json({"decisions": [es.decision_to_dict(d) for d in decisions],
                      "model": es_service.model_ref()})

    # --- operations ---------------------------------------------------------------------------

    @app.get("/healthz", response_model=P.Health, responses={503: {"model": P.Health}},
             tags=["ops"])
    async def healthz() -> Response:
        """Liveness: 200 while the process is healthy (also while warming up)."""
        if service.error:
            return _json({"status": "error", "detail": service.error}, 503)
        return _json({"status": "ok", "detail": None})

    @app.get("/readyz", response_model=P.Health, responses={503: {"model": P.Health}},
             tags=["ops"])
    async def readyz() -> Response:
        """Readiness: 200 once the model is loaded, verified and warmed up."""
        if service.ready.is_set():
            return _json({"status": "ready", "detail": service.runtime_name})
        return _json({"status": "error" if service.error else "loading",
                      "detail": service.error}, 503)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **_errs(401)}, tags=["ops"])
    async def metrics_route() -> Response:
        """Prometheus metrics: requests, latencies, batch sizes, queue depth."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # --- Open Inference Protocol v2 -----------------------------------------------------------

    name_path = Path(description="the served model's name", examples=[settings.model_name])

    def model_or_404(name: str) -> None:
        if name != service.name:
            raise NotFound(f"model {name!r} is not served here; this server serves "
                           f"{service.name!r}")

    @app.get("/v2", response_model=P.ServerMetadata, responses=_errs(401), tags=["v2"])
    async def v2_server() -> Response:
        return _json({"name": "curvecast", "version": "0.1.0", "extensions": []})

    @app.get("/v2/health/live", response_model=P.Live, tags=["v2"])
    async def v2_live() -> Response:
        return _json({"live": service.error is None}, 200 if service.error is None else 503)

    @app.get("/v2/health/ready", response_model=P.Ready, responses={503: {"model": P.Ready}},
             tags=["v2"])
    async def v2_ready() -> Response:
        ok = service.ready.is_set()
        return _json({"ready": ok}, 200 if ok else 503)

    @app.get("/v2/models/{model_name}", response_model=P.ModelMetadata,
             responses=_errs(401) | {404: ERRORS[422] | {"description": "unknown model"}},
             tags=["v2"])
    async def v2_model(model_name: str = name_path) -> Response:
        model_or_404(model_name)
        assert service.predictor is not None
        n = service.predictor.model.cfg.n_buckets
        platform = "onnxruntime_onnx" if service.runtime_name.startswith("onnx") else "pytorch"
        return _json({
            "name": service.name, "versions": [service.predictor.sha256[:12]],
            "platform": platform,
            "inputs": [{"name": "t_ctx", "datatype": "FP32", "shape": [-1, -1]},
                       {"name": "y_ctx", "datatype": "FP32", "shape": [-1, -1]},
                       {"name": "ctx_mask", "datatype": "BOOL", "shape": [-1, -1]},
                       {"name": "t_qry", "datatype": "FP32", "shape": [-1, -1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, n]}],
        })

    @app.get("/v2/models/{model_name}/ready", response_model=P.Ready,
             responses=_errs(401) | {404: ERRORS[422] | {"description": "unknown model"},
                                     503: {"model": P.Ready}}, tags=["v2"])
    async def v2_model_ready(model_name: str = name_path) -> Response:
        model_or_404(model_name)
        ok = service.ready.is_set()
        return _json({"ready": ok}, 200 if ok else 503)

    @app.post("/v2/models/{model_name}/infer", response_model=P.InferResponse,
              responses=_errs(400, 401, 413, 422, 500, 503) | {
                  404: ERRORS[422] | {"description": "unknown model"}}, tags=["v2"])
    async def v2_infer(req: P.InferRequest, model_name: str = name_path) -> Response:
        """Raw model tensors in, bar-distribution logits (B, Q, n_buckets) out.

        Inputs: t_ctx, y_ctx (B, K) FP32 progress/normalised values, ctx_mask (B, K) BOOL,
        t_qry (B, Q) FP32 — see pfn.model.PFN.predict."""
        model_or_404(model_name)
        require_ready()
        arrays = _infer_inputs(req, settings)
        B, Q = arrays[3].shape
        logits = await batcher.call(lambda: service.infer_raw(*arrays), B * Q)
        if not np.isfinite(logits).all():
            raise CurveError(None, "inputs", "produce non-finite logits",
                             "send progress and values on the model's scale (about [0, 1])")
        return _json({"model_name": service.name,
                      "model_version": service.predictor.sha256[:12],  # type: ignore[union-attr]
                      "id": req.id,
                      "outputs": [{"name": "logits", "shape": list(logits.shape),
                                   "datatype": "FP32", "data": logits.ravel().tolist()}]})

    return app


# fan charts render here, off the inference thread (matplotlib is slow and not thread-safe)
plot_executor = ThreadPoolExecutor(1, thread_name_prefix="curvecast-plot")


def _render_png(curves: list[Curve], posts: list[Any]) -> bytes:
    from pfn.plot import fan_chart

    buf = io.BytesIO()
    fan_chart(curves, posts, buf)
    return buf.getvalue()


def _infer_inputs(req: P.InferRequest, s: ServeSettings
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the four OIP v2 input tensors; (t_ctx, y_ctx, ctx_mask, t_qry) arrays."""
    by_name: dict[str, P.InferInput] = {}
    for t in req.inputs:
        if t.name in by_name:
            raise CurveError(None, f"inputs.{t.name}", "is given twice", "send each input once")
        by_name[t.name] = t
    out = []
    for name in ("t_ctx", "y_ctx", "ctx_mask", "t_qry"):
        found = by_name.get(name)
        if found is None:
            raise CurveError(None, f"inputs.{name}", "is missing",
                             "send t_ctx, y_ctx, ctx_mask and t_qry")
        t = found
        want = "BOOL" if name == "ctx_mask" else "FP32"
        if t.datatype != want:
            raise CurveError(None, f"inputs.{name}.datatype", f"must be {want}, got "
                             f"{t.datatype}", f"send {name} as {want}")
        rows, cols = t.shape
        if rows < 1 or cols < 1:
            raise CurveError(None, f"inputs.{name}.shape", f"must be positive, got {t.shape}",
                             "send at least one curve and one point")
        if len(t.data) != rows * cols:
            raise CurveError(None, f"inputs.{name}.data", f"has {len(t.data)} entries for "
                             f"shape {t.shape}", "send prod(shape) values, row-major")
        if want == "BOOL":
            if not all(isinstance(v, bool) for v in t.data):
                raise CurveError(None, f"inputs.{name}.data", "must hold booleans",
                                 "send true/false")
            a = np.asarray(t.data, dtype=bool).reshape(rows, cols)
        else:
            if any(isinstance(v, bool) for v in t.data):
                raise CurveError(None, f"inputs.{name}.data", "must hold numbers, not booleans",
                                 "send numbers")
            a = np.asarray(t.data, dtype=np.float64).reshape(rows, cols)
            if not (np.isfinite(a).all() and (np.abs(a) <= 1e6).all()):
                raise CurveError(None, f"inputs.{name}.data", "must be finite with |x| <= 1e6",
                                 "send progress t = epoch / horizon and normalised values")
            a = a.astype(np.float32)
        out.append(a)
    t_ctx, y_ctx, mask, t_qry = out
    if not (t_ctx.shape == y_ctx.shape == mask.shape):
        raise CurveError(None, "inputs", f"t_ctx {list(t_ctx.shape)}, y_ctx {list(y_ctx.shape)} "
                         f"and ctx_mask {list(mask.shape)} must have one shape (B, K)",
                         "pad contexts to one length K")
    if t_qry.shape[0] != t_ctx.shape[0]:
        raise CurveError(None, "inputs.t_qry.shape", f"has batch {t_qry.shape[0]}, the "
                         f"context {t_ctx.shape[0]}", "send one query row per curve")
    B, K = t_ctx.shape
    Q = t_qry.shape[1]
    too_big = (s.max_curves_per_request < B, s.max_points_per_curve < K,
               s.max_rows_per_request < B * Q)
    if any(too_big):
        raise CurveError(None, "inputs.shape", f"B={B}, K={K}, B*Q={B * Q} exceed this "
                         f"server's limits ({s.max_curves_per_request} curves, "
                         f"{s.max_points_per_curve} points, {s.max_rows_per_request} query rows)",
                         "split the request")
    return t_ctx, y_ctx, mask, t_qry


def create_app_from_env() -> FastAPI:
    """uvicorn factory: settings from CURVECAST_* (what `curvecast serve` exports)."""
    return create_app(ServeSettings())
