"""Runtimes: what runs ``PFN.predict`` inside the server.

A runtime is a callable ``(t_ctx, y_ctx, ctx_mask, t_qry[, decay]) -> logits`` on CPU torch
tensors (the ``Predictor``'s ``runtime`` argument) that also describes itself for
``/v1/models``; ``decay`` (B,), the curves' learning-rate-decay flags, reaches models with a
decay input (None: all 0) and must be None for the others.

* ``onnx`` — onnxruntime on the exported graph; CUDA execution provider when present, else CPU
  (the default on CPU machines).
* ``torch`` — eager ``PFN.predict`` (on CUDA when present).
* ``torch-triton`` — eager torch on CUDA with the fused Triton kernels of ``serve.kernels``.
* ``auto`` — ``torch-triton`` on a CUDA machine whose ``serve.kernels`` imports, else ``onnx``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pfn.model import PFN
from pfn.predictor import Predictor
from serve.export import DECAY_INPUT, INPUT_NAMES, default_cache_dir, ensure_onnx

log = logging.getLogger("curvecast.serve")

PARITY_ATOL = 1e-3  # max |logit difference| of an fp32 runtime vs eager torch at start-up


class Runtime(Protocol):
    name: str

    def __call__(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor,
                 decay: Tensor | None = None) -> Tensor:
        ...

    def describe(self) -> dict[str, Any]:
        ...


class OnnxRuntime:
    """onnxruntime session on an exported graph; for a model with a decay branch a second
    session on its graph with the flags (``decay_path``), used for batches with a flag set."""

    def __init__(self, path: str | Path, threads: int = 1, spin: bool = False,
                 providers: list[str] | None = None, quantized: bool = False,
                 decay_path: str | Path | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.log_severity_level = 3
        avail = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in avail]
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.decay_path = None if decay_path is None else Path(decay_path)
        self.decay_session = (None if decay_path is None
                              else ort.InferenceSession(str(decay_path), so, providers=providers))
        if self.decay_session is not None and DECAY_INPUT not in {
                i.name for i in self.decay_session.get_inputs()}:
            raise ValueError(f"decay_path: {decay_path} has no {DECAY_INPUT!r} input")
        self.providers = self.session.get_providers()
        self.threads = threads
        self.quantized = quantized
        self.name = "onnx-int8" if quantized else "onnx"

    def run_numpy(self, t_ctx: np.ndarray, y_ctx: np.ndarray, ctx_mask: np.ndarray,
                  t_qry: np.ndarray, decay: np.ndarray | None = None) -> np.ndarray:
        feeds = dict(zip(INPUT_NAMES, (t_ctx, y_ctx, ctx_mask, t_qry), strict=True))
        session = self.session
        if decay is not None and bool(decay.any()):  # flags at 0 add nothing: the first graph
            if self.decay_session is None:
                raise ValueError(f"{self.path.name}: the model has no decay branch")
            session = self.decay_session
            feeds[DECAY_INPUT] = decay.astype(np.float32)
        out: np.ndarray = session.run(None, feeds)[0]
        return out

    def __call__(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor,
                 decay: Tensor | None = None) -> Tensor:
        out = self.run_numpy(t_ctx.numpy(), y_ctx.numpy(), ctx_mask.numpy(), t_qry.numpy(),
                             None if decay is None else decay.numpy())
        return torch.from_numpy(out)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"name": self.name, "engine": f"onnxruntime {ort.__version__}",
                "providers": list(self.providers), "threads": self.threads,
                "file": self.path.name,
                **({"decay_file": self.decay_path.name} if self.decay_path else {})}


class TorchRuntime:
    """Eager ``PFN.predict`` (optionally with the Triton kernels enabled on the model)."""

    def __init__(self, model: PFN, device: str = "cpu", threads: int = 1,
                 name: str = "torch") -> None:
        # a copy on an accelerator: the Predictor keeps its CPU model for the bar distribution
        self.model = (model if device == "cpu" else copy.deepcopy(model).to(device)).eval()
        self.device = torch.device(device)
        self.threads = threads
        self.name = name
        if self.device.type == "cpu":
            torch.set_num_threads(threads)

    def __call__(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor,
                 decay: Tensor | None = None) -> Tensor:
        d = self.device
        with torch.inference_mode():
            out = self.model.predict(t_ctx.to(d), y_ctx.to(d), ctx_mask.to(d), t_qry.to(d),
                                     None if decay is None else decay.to(d))
        return out.float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "engine": f"torch {torch.__version__}",
                "device": str(self.device), "threads": self.threads}


class ChunkedRuntime:
    """Bounds the memory of one forward pass by splitting it along batch and queries.

    Splitting is exact: curves are independent, and a query token attends only to the context
    and itself (``pfn.model``), so the logits of a query do not depend on the other queries.
    Chunks keep ``b * (K + q)`` tokens and ``b * (K + q)^2`` attention scores per head bounded.
    """

    def __init__(self, inner: Runtime, max_tokens: int = 16_384, max_scores: int = 1 << 24,
                 max_queries: int = 256) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_tokens = max_tokens
        self.max_scores = max_scores
        self.max_queries = max_queries

    def __call__(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor,
                 decay: Tensor | None = None) -> Tensor:
        B, K = t_ctx.shape
        Q = t_qry.shape[1]
        qc = min(Q, self.max_queries)
        L = K + qc
        bc = max(1, min(B, self.max_tokens // L, self.max_scores // (L * L)))
        if bc >= B and qc >= Q:
            return self.inner(t_ctx, y_ctx, ctx_mask, t_qry, *(() if decay is None else (decay,)))
        rows = []
        for b in range(0, B, bc):
            sl = slice(b, b + bc)
            d = () if decay is None else (decay[sl],)
            parts = [self.inner(t_ctx[sl], y_ctx[sl], ctx_mask[sl], t_qry[sl, q : q + qc], *d)
                     for q in range(0, Q, qc)]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
        return torch.cat(rows, 0)  # (B, Q, n_buckets)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def kernels_module() -> Any | None:
    """``serve.kernels`` if it imports (it needs Triton), else None."""
    try:
        return importlib.import_module("serve.kernels")
    except Exception as e:  # ImportError, or Triton failing to initialise
        log.info("serve.kernels unavailable: %s", e)
        return None


def resolve_kind(kind: str) -> str:
    """The concrete runtime for a setting (``auto`` picks by hardware)."""
    if kind != "auto":
        return kind
    if torch.cuda.is_available() and kernels_module() is not None:
        return "torch-triton"
    return "onnx"


def make_runtime(kind: str, model: PFN, model_dir: Path, sha256: str, cache_dir: Path,
                 threads: int = 1, spin: bool = False, quantize: bool = False) -> Runtime:
    """Build the runtime a setting names (exporting/caching the ONNX graph when needed)."""
    kind = resolve_kind(kind)
    if quantize and kind != "onnx":
        raise ValueError(f"quantize: only the onnx runtime supports int8, not {kind!r}")
    if kind == "onnx":
        path = ensure_onnx(model, model_dir, sha256, cache_dir, quantized=quantize)
        decay = (ensure_onnx(model, model_dir, sha256, cache_dir, quantized=quantize, decay=True)
                 if model.cfg.decay_input else None)
        return OnnxRuntime(path, threads=threads, spin=spin, quantized=quantize,
                           decay_path=decay)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "torch":
        return TorchRuntime(model, device, threads)
    if kind == "torch-triton":
        kernels = kernels_module()
        if kernels is None or device != "cuda":
            raise ValueError("runtime 'torch-triton' needs a CUDA GPU and Triton "
                             "(serve.kernels); use 'onnx' or 'torch'")
        rt = TorchRuntime(model, device, threads, name="torch-triton")
        kernels.enable_kernels(rt.model)
        return rt
    raise ValueError(f"runtime: unknown {kind!r}; choose auto, onnx, torch or torch-triton")


def load_predictor(name_or_path: str | Path | None = None, runtime: str = "onnx",
                   threads: int = 1, cache_dir: Path | None = None) -> Predictor:
    """``Predictor.load`` running on a serving runtime in this process: by default onnxruntime,
    the server's path (one curve in ~1.2 ms on one thread of the development machine, against
    ~3 ms in torch eager; docs/model-card.md). The ONNX graph is exported once and cached
    beside the weights or in ``cache_dir`` (default ``$XDG_CACHE_HOME/curvecast``); its answers
    are checked against eager torch (``check_parity``) before the predictor is returned."""
    from pfn.io import resolve_model_dir

    pred = Predictor.load(name_or_path)
    rt = make_runtime(runtime, pred.model, resolve_model_dir(name_or_path), pred.sha256,
                      cache_dir or default_cache_dir(), threads=threads)
    check_parity(rt, pred.model)
    pred.runtime = rt
    return pred


def probe_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A small fixed batch with ragged contexts (padding included)."""
    g = torch.Generator().manual_seed(seed)
    B, K, Q = 3, 9, 4
    t_ctx = torch.sort(torch.rand(B, K, generator=g), dim=1).values
    y_ctx = torch.rand(B, K, generator=g)
    mask = torch.arange(K)[None, :] < torch.tensor([[K], [3], [1]])
    t_qry = torch.rand(B, Q, generator=g)
    return t_ctx, y_ctx, mask, t_qry


def check_parity(runtime: Runtime, model: PFN, atol: float = PARITY_ATOL) -> float:
    """Max |logit difference| vs eager torch on the probe batch (for a model with a decay
    branch also with flags of both values, so a graph that drops them shows); raises above
    ``atol``."""
    probes: list[tuple[Tensor, ...]] = [probe_inputs()]
    if model.cfg.decay_input:
        probes.append((*probe_inputs(), torch.tensor([1.0, 0.0, 1.0])))
    worst = 0.0
    for x in probes:
        with torch.inference_mode():
            ref = model.predict(*x).float()
        out = runtime(*x).float()
        if out.shape != ref.shape:
            raise RuntimeError(f"runtime {runtime.name}: output shape {tuple(out.shape)}, "
                               f"expected {tuple(ref.shape)}")
        diff = float((out - ref).abs().max())
        if not diff <= atol:
            raise RuntimeError(f"runtime {runtime.name}: logits differ from eager torch by "
                               f"{diff:.3g} (> {atol:g}); the cached export is stale or broken")
        worst = max(worst, diff)
    return worst
