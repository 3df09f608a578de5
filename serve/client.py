"""Python client for a curvecast server: sync and async, httpx only (no torch, no onnxruntime).

    from serve.client import Client, Curve
    with Client("http://127.0.0.1:8000") as cc:
        post = cc.predict([Curve([1, 2, 3], [0.3, 0.45, 0.52], horizon=50)])[0]
        post.mean, post.quantile(0.95), post.prob_greater(0.8)  # thresholds: see predict()

``Client.predict(curves)`` has the call signature of the in-process ``pfn.Predictor.predict``
and returns one posterior per curve with the same methods (``mean``, ``std``, ``median``,
``quantile``, ``prob_greater``, ``cdf``, ``log_density``), so switching between local and
remote is one argument::

    predictor = serve.client.connect("http://host:8000")   # or connect() / connect("default")

A remote posterior answers only what the server computed: the quantile levels, thresholds and
density points passed to ``predict`` (``quantile(0.05 ... 0.95)`` by default); asking for
others raises ``KeyError`` naming what is available.

Retries: connection errors, timeouts and 502/503/504 answers are retried ``retries`` times with
exponential backoff and jitter (at least the server's ``Retry-After`` on 503). Every call is
side-effect free on the server, so retrying is safe. 4xx answers raise ``RemoteCurvecastError``
(a ``ValueError``, like the local ``pfn.errors.CurvecastError``) with the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
RETRY_STATUS = frozenset({502, 503, 504})
ArrayLike = Sequence[float] | np.ndarray


@dataclass
class Curve:
    """One partial learning curve (the fields of ``pfn.Curve``, without importing torch)."""

    epochs: ArrayLike  # observed epochs (positive, strictly increasing, <= horizon)
    values: ArrayLike  # observed metric values (NaN/None: missing, dropped with its epoch)
    horizon: float  # the run's final epoch (its budget)
    query_epochs: ArrayLike | None = None  # epochs to predict; default [horizon]
    direction: Literal["max", "min"] = "max"  # "max" for accuracies, "min" for losses
    bounds: tuple[float | None, float | None] | None = None  # known range of the metric
    lr_decay: bool = False  # the run's learning rate decays before the horizon
    meta: dict[str, Any] = field(default_factory=dict)  # kept client-side, not sent


class RemoteError(RuntimeError):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, status_code: int, type_: str, message: str, field: str | None = None
                 ) -> None:
        self.status_code = status_code
        self.type = type_
        self.message = message
        self.field = field
        super().__init__(f"HTTP {status_code} {type_}: {message}")


class RemoteCurvecastError(RemoteError, ValueError):
    """A 4xx answer: the request is invalid (the message names the field and the fix)."""


class ServerUnavailable(RemoteError):
    """Still unreachable or overloaded (503) after every retry."""


def _floats(x: Any) -> list[float | None]:
    a = np.asarray(x, dtype=np.float64).ravel()
    return [None if math.isnan(v) else float(v) for v in a.tolist()]


def curve_json(c: Any) -> dict[str, Any]:
    """The JSON form of a curve: this module's ``Curve``, a ``pfn.Curve`` or a mapping."""
    if isinstance(c, Mapping):
        d = dict(c)
        d.pop("meta", None)
        for k in ("epochs", "values", "query_epochs"):
            if d.get(k) is not None:
                d[k] = _floats(d[k])
        return d
    d = {"epochs": _floats(c.epochs), "values": _floats(c.values), "horizon": float(c.horizon)}
    if getattr(c, "query_epochs", None) is not None:
        d["query_epochs"] = _floats(c.query_epochs)
    if getattr(c, "direction", "max") != "max":
        d["direction"] = c.direction
    if getattr(c, "bounds", None) is not None:
        d["bounds"] = [None if b is None else float(b) for b in c.bounds]
    if getattr(c, "lr_decay", False):
        d["lr_decay"] = True
    return d


def _lookup(table: dict[float, np.ndarray], at: Any, what: str, how: str) -> np.ndarray:
    scalar = np.ndim(at) == 0
    cols = []
    for v in np.atleast_1d(np.asarray(at, dtype=np.float64)).tolist():
        if v not in table:
            have = ", ".join(f"{k:g}" for k in sorted(table)) or "none"
            raise KeyError(f"{what} {v:g} was not computed by the server (have: {have}); "
                           f"pass {how} to predict()")
        cols.append(table[v])
    return cols[0] if scalar else np.stack(cols, axis=-1)


@dataclass(frozen=True)
class RemotePosterior:
    """A curve's posterior summaries as computed by the server, one entry per query epoch."""

    query_epochs: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    quantiles: dict[float, np.ndarray]
    prob_greater_at: dict[float, np.ndarray]
    cdf_at: dict[float, np.ndarray]
    log_density_at: dict[float, np.ndarray]  # NaN where the density underflows (-inf)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RemotePosterior:
        def arr(v: Any) -> np.ndarray:
            return np.asarray([math.nan if x is None else x for x in v], dtype=np.float64)

        def table(m: Mapping[str, Any]) -> dict[float, np.ndarray]:
            return {float(k): arr(v) for k, v in m.items()}

        return cls(arr(d["query_epochs"]), arr(d["mean"]), arr(d["std"]),
                   table(d["quantiles"]), table(d["prob_greater"]), table(d["cdf"]),
                   table(d["log_density"]))

    def __len__(self) -> int:
        return len(self.query_epochs)

    @property
    def median(self) -> np.ndarray:
        return self.quantile(0.5)

    def quantile(self, q: float | ArrayLike) -> np.ndarray:
        return _lookup(self.quantiles, q, "quantile", "quantiles=[...]")

    def prob_greater(self, threshold: float | ArrayLike) -> np.ndarray:
        return _lookup(self.prob_greater_at, threshold, "threshold", "thresholds=[...]")

    def cdf(self, v: float | ArrayLike) -> np.ndarray:
        return _lookup(self.cdf_at, v, "cdf point", "density_at=[...]")

    def log_density(self, v: float | ArrayLike) -> np.ndarray:
        return _lookup(self.log_density_at, v, "density point", "density_at=[...]")


@dataclass(frozen=True)
class RemoteDecision:
    """An early-stopping decision (the fields of ``pfn.early_stop.Decision``)."""

    stop: bool
    prob_improve: float
    prob_improve_final: float
    final_mean: float
    final_quantiles: dict[float, float]
    expected_remaining_epochs: float
    reason: str
    expected_improvement: float = math.nan  # NaN when there is no incumbent

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RemoteDecision:
        ei = d.get("expected_improvement")
        return cls(bool(d["stop"]), float(d["prob_improve"]), float(d["prob_improve_final"]),
                   float(d["final_mean"]),
                   {float(k): float(v) for k, v in d["final_quantiles"].items()},
                   float(d["expected_remaining_epochs"]), str(d["reason"]),
                   math.nan if ei is None else float(ei))


def _per_curve(x: Any, n: int, name: str) -> list[list[float] | None]:
    """One flat list for every curve, or one list (or None) per curve."""
    if x is None:
        return [None] * n
    x = list(x)
    if all(isinstance(v, (int, float, np.floating, np.integer)) for v in x):
        return [[float(v) for v in x]] * n
    if len(x) != n:
        raise ValueError(f"{name}: give one list for all curves or one per curve ({n})")
    return [None if v is None else [float(u) for u in v] for v in x]


class _Base:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int,
                 backoff: float, max_backoff: float, quantiles: Sequence[float],
                 max_curves_per_request: int, headers: Mapping[str, str] | None) -> None:
        if retries < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError("retries, backoff, max_backoff must be >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.quantiles = tuple(float(q) for q in quantiles)
        self.max_curves_per_request = max_curves_per_request
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self.headers = {"User-Agent": "curvecast-client/0.1", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model: dict[str, Any] | None = None  # the "model" block of the last answer

    # request bodies ----------------------------------------------------------------------

    def _predict_bodies(self, curves: Sequence[Any], quantiles: Sequence[float] | None,
                        thresholds: Any, density_at: Any) -> list[dict[str, Any]]:
        n = len(curves)
        th = _per_curve(thresholds, n, "thresholds")
        da = _per_curve(density_at, n, "density_at")
        qs = [float(q) for q in (quantiles if quantiles is not None else self.quantiles)]
        items = []
        for i, c in enumerate(curves):
            d = curve_json(c)
            if th[i]:
                d["thresholds"] = th[i]
            if da[i]:
                d["density_at"] = da[i]
            items.append(d)
        step = self.max_curves_per_request
        return [{"curves": items[a : a + step], "quantiles": qs} for a in range(0, n, step)]

    def _early_stop_body(self, curves: Sequence[Any], incumbents: Sequence[float | None],
                         rule: Any, quantiles: Sequence[float] | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "curves": [curve_json(c) for c in curves],
            "incumbents": [None if v is None or (isinstance(v, float) and math.isnan(v))
                           else float(v) for v in incumbents],
        }
        if rule is not None:  # a mapping, or a pfn.early_stop.StopRule
            body["rule"] = dict(rule) if isinstance(rule, Mapping) else {
                k: getattr(rule, k) for k in ("kind", "delta", "min_epochs", "min_gain_per_epoch")
                if getattr(rule, k, None) is not None}
        if quantiles is not None:
            body["quantiles"] = [float(q) for q in quantiles]
        return body

    # answers ---------------------------------------------------------------------------------

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        d = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
        if response is not None and response.status_code == 503:
            with contextlib.suppress(ValueError):  # an HTTP-date Retry-After: ignore it
                d = max(d, min(float(response.headers.get("Retry-After", 0)), self.max_backoff))
        return d

    @staticmethod
    def _raise(r: httpx.Response, retried: bool = False) -> None:
        try:
            err = r.json()["error"]
            type_, message, fld = str(err["type"]), str(err["message"]), err.get("field")
        except Exception:
            type_, message, fld = "HTTPError", r.text[:500], None
        if r.status_code in RETRY_STATUS:
            raise ServerUnavailable(r.status_code, type_, message, fld)
        if 400 <= r.status_code < 500:
            raise RemoteCurvecastError(r.status_code, type_, message, fld)
        raise RemoteError(r.status_code, type_, message, fld)

    def _posteriors(self, r: httpx.Response) -> list[RemotePosterior]:
        body = r.json()
        self.model = body.get("model")
        return [RemotePosterior.from_json(p) for p in body["predictions"]]

    def _decisions(self, r: httpx.Response) -> list[RemoteDecision]:
        body = r.json()
        self.model = body.get("model")
        return [RemoteDecision.from_json(d) for d in body["decisions"]]


class Client(_Base):
    """Synchronous client (one httpx connection pool; thread-safe)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.05,
                 max_backoff: float = 2.0, quantiles: Sequence[float] = DEFAULT_QUANTILES,
                 max_curves_per_request: int = 1024, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, max_backoff, quantiles,
                         max_curves_per_request, headers)
        self._http = httpx.Client(base_url=self.url, headers=self.headers,
                                  timeout=self.timeout, transport=transport)

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._http.request(method, path, json=json)
            except httpx.TransportError as e:
                if last:
                    raise ServerUnavailable(0, type(e).__name__, f"{self.url}{path}: {e}") from e
                time.sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUS and not last:
                time.sleep(self._delay(attempt, r))
                continue
            if r.status_code >= 400:
                self._raise(r)
            return r
        raise AssertionError("unreachable")

    def predict(self, curves: Sequence[Any], *, quantiles: Sequence[float] | None = None,
                thresholds: Any = None, density_at: Any = None) -> list[RemotePosterior]:
        """One posterior per curve (as ``Predictor.predict``); thresholds / density_at are one
        list for every curve or one list per curve."""
        out: list[RemotePosterior] = []
        for body in self._predict_bodies(curves, quantiles, thresholds, density_at):
            out += self._posteriors(self._request("POST", "/v1/predict", body))
        return out

    def early_stop(self, curves: Sequence[Any], incumbents: Sequence[float | None], *,
                   rule: Any = None, quantiles: Sequence[float] | None = None
                   ) -> list[RemoteDecision]:
        """Stop/continue per curve (as ``pfn.early_stop.decide``)."""
        body = self._early_stop_body(curves, incumbents, rule, quantiles)
        return self._decisions(self._request("POST", "/v1/early-stop", body))

    def plot(self, curves: Sequence[Any]) -> bytes:
        """The fan chart PNG of these curves."""
        body = {"curves": [curve_json(c) for c in curves]}
        return self._request("POST", "/v1/plot", body).content

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models").json()["models"])

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerUnavailable(0, "NotReady", f"{self.url} not ready after {timeout} s")
            time.sleep(interval)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client; the same methods as ``Client``, awaited."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.05,
                 max_backoff: float = 2.0, quantiles: Sequence[float] = DEFAULT_QUANTILES,
                 max_curves_per_request: int = 1024, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None) -> None:
        super().__init__(url, api_key, timeout, retries, backoff, max_backoff, quantiles,
                         max_curves_per_request, headers)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers,
                                       timeout=self.timeout, transport=transport,
                                       limits=limits or httpx.Limits(max_connections=256))

    async def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = await self._http.request(method, path, json=json)
            except httpx.TransportError as e:
                if last:
                    raise ServerUnavailable(0, type(e).__name__, f"{self.url}{path}: {e}") from e
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if r.status_code in RETRY_STATUS and not last:
                await asyncio.sleep(self._delay(attempt, r))
                continue
            if r.status_code >= 400:
                self._raise(r)
            return r
        raise AssertionError("unreachable")

    async def predict(self, curves: Sequence[Any], *, quantiles: Sequence[float] | None = None,
                      thresholds: Any = None, density_at: Any = None) -> list[RemotePosterior]:
        bodies = self._predict_bodies(curves, quantiles, thresholds, density_at)
        answers = await asyncio.gather(*(self._request("POST", "/v1/predict", b)
                                         for b in bodies))
        return [p for r in answers for p in self._posteriors(r)]

    async def early_stop(self, curves: Sequence[Any], incumbents: Sequence[float | None], *,
                         rule: Any = None, quantiles: Sequence[float] | None = None
                         ) -> list[RemoteDecision]:
        body = self._early_stop_body(curves, incumbents, rule, quantiles)
        return self._decisions(await self._request("POST", "/v1/early-stop", body))

    async def plot(self, curves: Sequence[Any]) -> bytes:
        body = {"curves": [curve_json(c) for c in curves]}
        return (await self._request("POST", "/v1/plot", body)).content

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/models")).json()["models"])

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ServerUnavailable(0, "NotReady", f"{self.url} not ready after {timeout} s")
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def connect(target: str | None = None, *, api_key: str | None = None,
            timeout: float | None = None, retries: int | None = None,
            quantiles: Sequence[float] | None = None) -> Any:
    """A predictor by one argument: an ``http(s)://`` URL gives a ``Client`` (the keyword
    options are the client's); anything else (``None``, a shipped model name such as
    ``"slowstart"``, a model directory) loads ``pfn.Predictor`` in-process (which imports
    torch) and takes no options."""
    options: dict[str, Any] = {"api_key": api_key, "timeout": timeout, "retries": retries,
                               "quantiles": quantiles}
    given = {k: v for k, v in options.items() if v is not None}  # the rest: Client's defaults
    if target is not None and target.startswith(("http://", "https://")):
        return Client(target, **given)
    if given:
        raise ValueError(f"connect: {', '.join(given)} apply to a server URL only, but "
                         f"target {target!r} is a local model; drop them or pass http(s)://")
    from pfn.predictor import Predictor  # local inference: torch from here on

    return Predictor.load(target)


__all__ = [
    "AsyncClient",
    "Client",
    "Curve",
    "RemoteCurvecastError",
    "RemoteDecision",
    "RemoteError",
    "RemotePosterior",
    "ServerUnavailable",
    "connect",
]
