"""The Python client: torch-free import, typed results equal to the local Predictor's, retries."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from serve.client import (
    AsyncClient,
    Client,
    Curve,
    RemoteCurvecastError,
    RemotePosterior,
    ServerUnavailable,
    connect,
    curve_json,
)
from serve.testing import LocalServer, free_port

CURVES = [
    Curve([1, 2, 3, 4], [0.3, 0.42, 0.5, 0.53], horizon=50, query_epochs=[10, 50],
          bounds=(0, 1)),
    Curve(np.arange(1, 11), 2.0 * np.exp(-np.arange(1, 11) / 5) + 0.3, horizon=40,
          direction="min"),
    Curve([2, 4, 6], [0.5, float("nan"), 0.7], horizon=6),
]


def test_importing_the_client_imports_neither_torch_nor_onnxruntime():
    code = ("import sys, serve.client; "
            "bad = [m for m in ('torch', 'onnxruntime', 'pfn', 'fastapi') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_curve_json_accepts_client_and_pfn_curves_and_dicts():
    from pfn.predictor import Curve as LocalCurve

    a = curve_json(Curve([1, 2], [0.1, float("nan")], horizon=5, bounds=(0, None)))
    assert a == {"epochs": [1.0, 2.0], "values": [0.1, None], "horizon": 5.0,
                 "bounds": [0.0, None]}
    b = curve_json(LocalCurve(np.array([1, 2]), np.array([0.1, 0.2]), horizon=5,
                              direction="min", query_epochs=[5]))
    assert b["direction"] == "min" and b["query_epochs"] == [5.0] and "lr_decay" not in b
    assert curve_json(Curve([1], [0.1], horizon=5, lr_decay=True))["lr_decay"] is True
    assert curve_json(LocalCurve([1], [0.1], horizon=5, lr_decay=True))["lr_decay"] is True
    assert curve_json({"epochs": np.array([1]), "values": [1], "horizon": 3,
                       "meta": {}}) == {"epochs": [1.0], "values": [1.0], "horizon": 3}


def test_remote_posterior_answers_only_what_was_computed():
    p = RemotePosterior.from_json({
        "query_epochs": [5, 10], "mean": [0.5, 0.6], "std": [0.1, 0.1],
        "quantiles": {"0.05": [0.3, 0.4], "0.5": [0.5, 0.6]}, "prob_greater": {"0.55": [0.4, 0.7]},
        "cdf": {"0.5": [0.5, 0.3]}, "log_density": {"0.5": [1.2, None]}})
    assert len(p) == 2
    np.testing.assert_array_equal(p.median, [0.5, 0.6])
    assert p.quantile([0.05, 0.5]).shape == (2, 2)
    assert np.isnan(p.log_density(0.5)[1])
    with pytest.raises(KeyError, match="quantiles="):
        p.quantile(0.9)


def test_unreachable_server_raises_after_retries():
    c = Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(ServerUnavailable, match="ConnectError"):
        c.predict(CURVES)


@pytest.fixture(scope="module")
def local():
    from pfn.predictor import Predictor

    return Predictor.load()


@pytest.fixture(scope="module")
def starting_server():
    """Started, not waited for: the first test below talks to it while it boots."""
    srv = LocalServer(env={"CURVECAST_WARMUP": "0", "CURVECAST_THREADS": "1"}).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def server(starting_server):
    return starting_server.wait_ready()


def test_client_started_before_the_server_retries_until_it_is_ready(starting_server, local):
    """Connection refused (and 503 while warming up) are retried with backoff. (Run first in
    this module, it meets a booting server; run alone later, a ready one.)"""
    with Client(starting_server.url, retries=600, backoff=0.05, max_backoff=0.25) as c:
        got = c.predict(CURVES[:1])
    np.testing.assert_allclose(got[0].mean, local.predict([_local(CURVES[0])])[0].mean,
                               atol=1e-4)


def test_sync_client_matches_local_predictor(server, local):
    remote = connect(server.url, quantiles=[0.1, 0.5, 0.9])
    assert isinstance(remote, Client)
    with remote:
        got = remote.predict(CURVES, thresholds=[0.55], density_at=[[0.5], None, [0.6]])
        assert remote.model["sha256"] == local.sha256
    want = local.predict([_local(c) for c in CURVES])
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.query_epochs, w.query_epochs)
        np.testing.assert_allclose(g.mean, w.mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g.std, w.std, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g.quantile([0.1, 0.9]), w.quantile([0.1, 0.9]), atol=1e-4)
        np.testing.assert_allclose(g.median, w.median, atol=1e-4)
        np.testing.assert_allclose(g.prob_greater(0.55), w.prob_greater(0.55), atol=1e-4)
    np.testing.assert_allclose(got[0].cdf(0.5), want[0].cdf(0.5), atol=1e-4)
    np.testing.assert_allclose(got[2].log_density(0.6), want[2].log_density(0.6), atol=1e-4)
    with pytest.raises(KeyError):
        got[1].cdf(0.5)


def test_client_splits_large_batches(server, local):
    curves = [Curve([1, 2, 3], [0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.07], horizon=20)
              for i in range(7)]
    with Client(server.url, max_curves_per_request=3) as c:
        got = c.predict(curves)
    want = local.predict([_local(c) for c in curves])
    np.testing.assert_allclose([g.mean[0] for g in got], [w.mean[0] for w in want], atol=1e-4)


def test_async_client_concurrent_calls(server, local):
    async def main():
        async with AsyncClient(server.url, max_curves_per_request=2) as c:
            assert (await c.models())[0]["sha256"] == local.sha256
            return await asyncio.gather(*(c.predict(CURVES) for _ in range(8)))

    results = asyncio.run(main())
    want = local.predict([_local(c) for c in CURVES])
    for got in results:
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.mean, w.mean, rtol=1e-4, atol=1e-4)


def test_user_errors_raise_a_value_error_naming_the_field(server):
    with Client(server.url) as c, pytest.raises(RemoteCurvecastError) as e:
        c.predict([CURVES[0], Curve([1, 3, 2], [0.1, 0.2, 0.3], horizon=5)])
    assert isinstance(e.value, ValueError)
    assert e.value.status_code == 422 and e.value.field == "curves[1].epochs"
    assert "strictly increasing" in str(e.value)


def test_connect_without_url_is_the_local_predictor():
    from pfn.predictor import Predictor

    assert isinstance(connect(), Predictor)
    slow = connect("slowstart")
    assert isinstance(slow, Predictor) and slow.sha256 != connect("default").sha256
    with pytest.raises(ValueError, match="quantiles apply to a server URL only"):
        connect("default", quantiles=[0.5])


def _local(c: Curve):
    from pfn.predictor import Curve as LocalCurve

    return LocalCurve(c.epochs, c.values, c.horizon, c.query_epochs, c.direction, c.bounds)


def test_early_stop_through_the_client(server):
    """The server's /v1/early-stop runs the model for decisions (pfn.io.DECISION_MODEL)."""
    from pfn.early_stop import StopRule, decide
    from pfn.io import DECISION_MODEL
    from pfn.predictor import Predictor

    local = Predictor.load(DECISION_MODEL)

    curves = [Curve([1, 2, 3], [0.1, 0.12, 0.13], horizon=50, bounds=(0, 1)),
              Curve([1, 2, 3], [0.5, 0.7, 0.78], horizon=20)]
    rule = StopRule(kind="all_epochs", delta=0.05)
    with Client(server.url) as c:
        got = c.early_stop(curves, [0.9, None], rule=rule)
    want = decide(local, [_local(x) for x in curves], [0.9, None], rule=rule)
    assert [g.stop for g in got] == [w.stop for w in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g.prob_improve - w.prob_improve) <= 1e-4
        assert abs(g.final_mean - w.final_mean) <= 1e-4
        assert g.final_quantiles.keys() == w.final_quantiles.keys()
    assert np.isnan(got[1].expected_improvement)
