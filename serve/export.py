"""ONNX export of ``PFN.predict`` and the on-disk cache of exported models.

The graph has four inputs with dynamic batch ``B``, context length ``K`` and query count ``Q``:
``t_ctx`` (B, K) f32, ``y_ctx`` (B, K) f32, ``ctx_mask`` (B, K) bool, ``t_qry`` (B, Q) f32, and one
output ``logits`` (B, Q, n_buckets) f32 — exactly ``PFN.predict``. A model with a decay branch
(``PFNConfig.decay_input``) gets a second graph, ``decay=True``, with a fifth input ``decay`` (B,)
f32, each curve's learning-rate-decay flag: the first graph leaves the branch out (it adds
nothing at flag 0), so batches without a flag run as fast as the model without it.

Cache: ``pfn-<weights sha256>.v<EXPORT_VERSION>[.decay][.int8].onnx``, next to the weights when that
directory is writable, else in the user cache directory (``~/.cache/curvecast``). The key is the
weights' sha256 plus this module's export version (bump it when the export changes), and the
server re-checks every loaded file against eager torch (``serve.runtime.check_parity``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from pfn.model import PFN

EXPORT_VERSION = 2  # bump when the exported graph changes for the same weights
OPSET = 20
INPUT_NAMES = ("t_ctx", "y_ctx", "ctx_mask", "t_qry")
DECAY_INPUT = "decay"  # the fifth input of a model with a decay input
OUTPUT_NAME = "logits"

log = logging.getLogger("curvecast.serve")


class PredictGraph(nn.Module):
    """``PFN.predict`` as a module ``forward``, the function the ONNX graph computes."""

    def __init__(self, model: PFN) -> None:
        super().__init__()
        self.model = model

    def forward(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor, t_qry: Tensor) -> Tensor:
        return self.model.predict(t_ctx, y_ctx, ctx_mask, t_qry)


class PredictDecayGraph(PredictGraph):
    """The same with the decay flags (B,) as a fifth input."""

    def forward(self, t_ctx: Tensor, y_ctx: Tensor, ctx_mask: Tensor,  # type: ignore[override]
                t_qry: Tensor, decay: Tensor) -> Tensor:
        return self.model.predict(t_ctx, y_ctx, ctx_mask, t_qry, decay)


def onnx_filename(sha256: str, quantized: bool = False, decay: bool = False) -> str:
    if not sha256:
        raise ValueError("sha256: the model has no weights digest; cannot key the ONNX cache")
    return (f"pfn-{sha256}.v{EXPORT_VERSION}{'.decay' if decay else ''}"
            f"{'.int8' if quantized else ''}.onnx")


def export_onnx(model: PFN, path: str | Path, decay: bool = False) -> Path:
    """Export ``model.predict`` to ``path`` (atomically: a crash never leaves a partial file);
    with ``decay`` the graph of a model with a decay branch that takes the flags."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if decay and not model.cfg.decay_input:
        raise ValueError("decay: this model has no decay branch (PFNConfig.decay_input)")
    graph = (PredictDecayGraph if decay else PredictGraph)(model.eval()).eval()
    # distinct sizes >= 2 so that torch.export neither specialises nor unifies the dims
    ex: tuple[Tensor, ...] = (torch.rand(3, 7), torch.rand(3, 7), torch.rand(3, 7) > 0.3,
                              torch.rand(3, 5))
    b = torch.export.Dim("batch", min=1, max=1 << 20)
    k = torch.export.Dim("n_ctx", min=1, max=1 << 20)
    q = torch.export.Dim("n_qry", min=1, max=1 << 20)
    shapes = {"t_ctx": {0: b, 1: k}, "y_ctx": {0: b, 1: k}, "ctx_mask": {0: b, 1: k},
              "t_qry": {0: b, 1: q}}
    names = list(INPUT_NAMES)
    if decay:
        ex += (torch.tensor([0.0, 1.0, 0.0]),)
        shapes[DECAY_INPUT] = {0: b}
        names.append(DECAY_INPUT)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" and the like
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), \
                contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            warnings.simplefilter("ignore")  # exporter chatter (axis renames, deprecations)
            program = torch.onnx.export(
                graph, ex, dynamo=True, dynamic_shapes=shapes, input_names=names,
                output_names=[OUTPUT_NAME], opset_version=OPSET, optimize=True, verbose=False,
            )
            assert program is not None
            program.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600: other users (a container's) must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        quiet.setLevel(level)
    return path


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """int8 dynamic quantisation of the MatMul weights (activations stay f32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".onnx")
    os.close(fd)
    try:
        quantize_dynamic(str(src), tmp, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _writable(d: Path) -> bool:
    """Can we create files in d? (Tries it: os.access lies on read-only mounts.)"""
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".curvecast-probe-")
    except OSError:
        return False
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return True


def find_cached(model_dir: Path, cache_dir: Path, sha256: str, quantized: bool = False,
                decay: bool = False) -> Path | None:
    name = onnx_filename(sha256, quantized, decay)
    for d in (model_dir, cache_dir):
        if (d / name).is_file():
            return d / name
    return None


def default_cache_dir() -> Path:
    """Where exports go when the model's own directory is read-only: $XDG_CACHE_HOME/curvecast
    (~/.cache/curvecast)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curvecast"


def ensure_onnx(model: PFN, model_dir: Path, sha256: str, cache_dir: Path,
                quantized: bool = False, force: bool = False, decay: bool = False) -> Path:
    """The cached ONNX file for these weights (with ``decay``, the graph with the decay
    flags), exporting (and quantising) it on a miss."""
    if not force:
        hit = find_cached(model_dir, cache_dir, sha256, quantized, decay)
        if hit is not None:
            return hit
    target_dir = model_dir if _writable(model_dir) else cache_dir
    if not _writable(target_dir):
        raise OSError(f"cannot write the ONNX export to {model_dir} or {cache_dir}; "
                      "set CURVECAST_CACHE_DIR to a writable directory")
    target_dir.mkdir(parents=True, exist_ok=True)
    fp32 = target_dir / onnx_filename(sha256, False, decay)
    if force or not fp32.is_file():
        log.info("exporting the model to ONNX: %s", fp32)
        export_onnx(model, fp32, decay)
    if not quantized:
        return fp32
    int8 = target_dir / onnx_filename(sha256, True, decay)
    log.info("quantising the ONNX model to int8: %s", int8)
    return quantize_onnx(fp32, int8)
