"""ONNX export and runtimes, tested by their answers against eager torch.

Stated tolerances: at several (B, K, Q), onnxruntime logits within ATOL = 5e-4 of eager
torch (observed <= 1.5e-4: the size of eager fp32's own rounding error against a float64 run of
the same weights) and about as accurate as eager against float64 (within 2x of eager's error,
or 2e-4: the 1.89M-curve weights show 1.25e-4 against eager's 5.2e-5 at (7, 31, 63), i.e. a
density off by a factor 1.000125); Predictor summaries (mean,
std, quantiles, probabilities, densities) through the onnxruntime runtime within 1e-4
(relative) of the eager ones.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pfn.io import WEIGHTS_DIR, load_model
from pfn.model import PFN, PFNConfig
from pfn.predictor import Curve, Predictor
from pfn.summary import summarize
from serve import export
from serve.export import ensure_onnx, find_cached, onnx_filename
from serve.runtime import (
    ChunkedRuntime,
    OnnxRuntime,
    TorchRuntime,
    check_parity,
    load_predictor,
    probe_inputs,
)

ATOL = 5e-4


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, default_model) -> Path:
    """The embedded model's export, through the cache next to the weights that the server
    uses too (a clean checkout exports here, once: export_onnx is tested by its answers)."""
    model, cfg = default_model
    return ensure_onnx(model, WEIGHTS_DIR / "default", cfg["sha256"],
                       tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def ort_runtime(onnx_path) -> OnnxRuntime:
    return OnnxRuntime(onnx_path, threads=1)


def _inputs(B: int, K: int, Q: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    t_ctx = torch.sort(torch.rand(B, K, generator=g), 1).values
    y_ctx = torch.rand(B, K, generator=g)
    n = torch.randint(1, K + 1, (B, 1), generator=g)
    mask = torch.arange(K)[None, :] < n  # ragged contexts, padded
    t_qry = torch.rand(B, Q, generator=g)
    return t_ctx, y_ctx, mask, t_qry


@pytest.fixture(scope="module")
def model64(default_model):
    return copy.deepcopy(default_model[0]).double()


@pytest.mark.parametrize("B,K,Q", [(1, 1, 1), (3, 17, 5), (16, 99, 2), (7, 31, 63), (2, 4, 300)])
def test_onnx_matches_eager(ort_runtime, default_model, model64, B, K, Q):
    model, _ = default_model
    x = _inputs(B, K, Q, seed=B * 1000 + K)
    with torch.inference_mode():
        ref = model.predict(*x)
        ref64 = model64.predict(*(t.double() if t.is_floating_point() else t for t in x))
    out = ort_runtime(*x)
    assert out.shape == (B, Q, model.cfg.n_buckets)
    assert float((out - ref).abs().max()) <= ATOL
    err_ort = float((out.double() - ref64).abs().max())
    err_eager = float((ref.double() - ref64).abs().max())
    assert err_ort <= max(2 * err_eager, 2e-4), (err_ort, err_eager)


def test_onnx_matches_eager_with_step_and_anchor_inputs(tiny_model, tmp_path):
    """The step and anchor inputs (found by comparing epochs, with masked maxima and gathers) export
    with dynamic shapes and answer as eager does at several shapes from one export (the
    other tiny models ride along)."""
    runtime = OnnxRuntime(export.export_onnx(tiny_model, tmp_path / "tiny.onnx"), threads=1)
    for B, K, Q in [(1, 1, 1), (3, 17, 5), (2, 31, 63)]:
        x = _inputs(B, K, Q, seed=7 * B + K)
        with torch.inference_mode():
            ref = tiny_model.predict(*x)
        assert float((runtime(*x) - ref).abs().max()) <= ATOL, (B, K, Q)


class _DroppingFlags:
    """A broken runtime that ignores the decay flags."""

    name = "dropping"

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, t_ctx, y_ctx, ctx_mask, t_qry, decay=None):
        return self.inner(t_ctx, y_ctx, ctx_mask, t_qry)


def test_decay_branch_exports_as_a_second_graph_and_chunks_exactly(tmp_path):
    """A model with a decay branch exports two graphs: without it (batches with no flag set,
    as fast as the model without the branch) and with a fifth input, ``decay`` (B,); the
    runtime answers as eager for either flag at several shapes, a runtime that dropped the
    flags fails the parity check (it probes both values), the body graph alone refuses a flag,
    and chunking slices the flags with the curves."""
    torch.manual_seed(4)
    cfg = PFNConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, n_buckets=50, encoder_hidden=16,
                    step_inputs=True, anchor_inputs=True, decay_input=True)
    model = PFN(cfg, torch.linspace(-0.2, 1.2, 51)).eval()
    assert model.decay_emb is not None and model.decay_adapters is not None
    torch.nn.init.normal_(model.decay_emb, std=0.02)
    for a in model.decay_adapters:
        torch.nn.init.normal_(a[-1].weight, std=0.02)
    for enc in (model.step_enc, model.anchor_enc):
        assert enc is not None
        torch.nn.init.normal_(enc[-1].weight, std=0.1)
    runtime = OnnxRuntime(export.export_onnx(model, tmp_path / "body.onnx"), threads=1,
                          decay_path=export.export_onnx(model, tmp_path / "decay.onnx", True))
    assert check_parity(runtime, model) <= ATOL
    no_branch = OnnxRuntime(tmp_path / "body.onnx", threads=1)  # refuses a flag, not ignores it
    with pytest.raises(ValueError, match="no decay branch"):
        no_branch(*_inputs(2, 3, 1, seed=0), torch.ones(2))
    with pytest.raises(RuntimeError, match="differ from eager"):  # flags dropped: caught
        check_parity(_DroppingFlags(runtime), model)
    for B, K, Q in [(1, 1, 1), (3, 17, 5), (6, 31, 63)]:
        x = _inputs(B, K, Q, seed=5 * B + K)
        flags = (torch.arange(B) % 2).float()
        with torch.inference_mode():
            ref = model.predict(*x, flags)
            ref0 = model.predict(*x)
        assert float((runtime(*x, flags) - ref).abs().max()) <= ATOL, (B, K, Q)
        assert float((runtime(*x) - ref0).abs().max()) <= ATOL, (B, K, Q)
    x = _inputs(5, 13, 23, seed=3)
    flags = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    small = ChunkedRuntime(TorchRuntime(model), max_tokens=64, max_scores=4096, max_queries=7)
    assert float((small(*x, flags) - TorchRuntime(model)(*x, flags)).abs().max()) <= 1e-4


def test_exported_file_is_readable_by_other_users(onnx_path):
    """The image exports as root and serves as another user (Dockerfile)."""
    assert onnx_path.stat().st_mode & 0o044 == 0o044


def test_onnx_graph_has_dynamic_axes(onnx_path):
    import onnx

    m = onnx.load(str(onnx_path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input}
    assert set(dims) == {"t_ctx", "y_ctx", "ctx_mask", "t_qry"}
    for name, shape in dims.items():
        assert all(isinstance(d, str) for d in shape), (name, shape)  # symbolic, not fixed
    assert dims["t_ctx"] == dims["ctx_mask"] and dims["t_qry"][1] != dims["t_ctx"][1]


def test_predictor_summaries_identical_through_onnx(ort_runtime, default_model):
    model, cfg = default_model
    eager = Predictor(model, cfg)
    onnx = Predictor(model, cfg, runtime=ort_runtime)
    curves = [
        Curve([1, 2, 3, 4], [0.3, 0.42, 0.5, 0.53], horizon=50, query_epochs=[10, 25, 50],
              bounds=(0, 1)),
        Curve(np.arange(1, 31), 2.0 * np.exp(-np.arange(1, 31) / 10) + 0.3, horizon=100,
              direction="min"),
        Curve([5, 10, 15], [70.0, float("nan"), 81.0], horizon=15, query_epochs=[15]),
    ]
    kw = dict(quantiles=[0.05, 0.5, 0.95], thresholds=[[0.55], [0.4], [80.0]],
              density_at=[[0.5], [0.35], [80.5]])
    a, b = summarize(eager, curves, **kw), summarize(onnx, curves, **kw)
    assert len(a) == len(b) == 3
    for da, db in zip(a, b, strict=True):
        assert da.keys() == db.keys()
        assert da["query_epochs"] == db["query_epochs"]
        for k in ("mean", "std"):
            np.testing.assert_allclose(da[k], db[k], rtol=1e-4, atol=1e-5)
        for k in ("quantiles", "prob_greater", "cdf", "log_density"):
            assert da[k].keys() == db[k].keys()
            for kk in da[k]:
                np.testing.assert_allclose(da[k][kk], db[k][kk], rtol=1e-4, atol=1e-5)


def test_load_predictor_runs_onnxruntime_in_process(onnx_path, tmp_path):
    """The in-process fast path: the cached export beside the weights (onnx_path made it),
    answering as the eager predictor does for ragged curves."""
    pred = load_predictor("default", cache_dir=tmp_path)
    assert isinstance(pred.runtime, OnnxRuntime) and not any(tmp_path.iterdir())
    curves = [Curve(np.arange(1, 21), np.linspace(0.3, 0.7, 20), horizon=100),
              Curve([1, 2, 5], [0.8, 0.6, 0.5], horizon=30, direction="min", bounds=(0, 1),
                    query_epochs=[10, 30])]
    eager = Predictor.load("default").predict(curves)
    for a, b in zip(pred.predict(curves), eager, strict=True):
        np.testing.assert_allclose(a.quantile([0.05, 0.5, 0.95]), b.quantile([0.05, 0.5, 0.95]),
                                   atol=1e-4)
    with pytest.raises(ValueError, match="runtime"):
        load_predictor("default", runtime="tpu")


def test_check_parity_detects_a_wrong_graph(default_model, tmp_path):
    """A cached file from other weights (same sha name) is caught at start-up."""
    model, _ = default_model
    other = TorchRuntime(load_model("default")[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a per-bucket change (a uniform shift of the logits is no change)
        for p in other.model.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    with pytest.raises(RuntimeError, match="differ from eager torch"):
        check_parity(other, model)
    assert check_parity(TorchRuntime(model), model) == 0.0


def test_chunked_runtime_is_exact(default_model):
    """Splitting along curves and queries changes nothing (queries never see each other)."""
    model, _ = default_model
    inner = TorchRuntime(model)
    small = ChunkedRuntime(inner, max_tokens=64, max_scores=4096, max_queries=7)
    x = _inputs(5, 13, 23, seed=3)
    ref = inner(*x)
    out = small(*x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-4  # only GEMM blocking differs by batch shape


def test_cache_is_keyed_by_sha_and_reused(tmp_path, onnx_path, default_model, monkeypatch):
    model, cfg = default_model
    sha = cfg["sha256"]
    model_dir = tmp_path / "model"
    shutil.copytree(WEIGHTS_DIR / "default", model_dir,
                    ignore=shutil.ignore_patterns("*.onnx"))
    cache = tmp_path / "cache"
    assert find_cached(model_dir, cache, sha) is None
    # pretend the export already happened (the export itself is tested above)
    shutil.copy(onnx_path, model_dir / onnx_filename(sha))
    calls = []
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: calls.append(a))
    hit = ensure_onnx(model, model_dir, sha, cache)
    assert hit == model_dir / f"pfn-{sha}.v{export.EXPORT_VERSION}.onnx" and not calls
    # other weights (another sha) miss the cache
    assert find_cached(model_dir, cache, "0" * 64) is None


def test_read_only_model_dir_falls_back_to_user_cache(tmp_path, default_model, monkeypatch):
    model, cfg = default_model
    model_dir, cache = tmp_path / "ro", tmp_path / "cache"
    model_dir.mkdir()
    monkeypatch.setattr(export, "_writable", lambda d: Path(d) != model_dir)
    written = []

    def fake_export(m, path, decay=False):
        written.append(Path(path))
        Path(path).write_bytes(b"x")
        return Path(path)

    monkeypatch.setattr(export, "export_onnx", fake_export)
    out = ensure_onnx(model, model_dir, cfg["sha256"], cache)
    assert out.parent == cache and written == [out]
    assert find_cached(model_dir, cache, cfg["sha256"]) == out


def test_probe_inputs_have_padding():
    _, _, mask, _ = probe_inputs()
    assert bool(mask.all(1).any()) and not bool(mask.all())


@pytest.mark.slow
def test_int8_quantised_model_runs(onnx_path, default_model, tmp_path):
    """int8 answers differ by design (the log-likelihood gate is bench/serve_quantize.py)."""
    model, _ = default_model
    q = export.quantize_onnx(onnx_path, tmp_path / "q.onnx")
    rt = OnnxRuntime(q, threads=1, quantized=True)
    x = _inputs(4, 20, 3, seed=1)
    out = rt(*x)
    with torch.inference_mode():
        ref = model.predict(*x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    p, r = out.softmax(-1), ref.softmax(-1)
    assert float((p - r).abs().sum(-1).max()) < 0.5  # total variation: close, not equal
