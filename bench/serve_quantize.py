"""Gate for int8 dynamic quantisation of the ONNX model: log-likelihood loss at every cutoff.

The paper's prior protocol (``pfn.evaluate.prior_log_likelihood``): seeded prior curves, the
first ``cutoff`` epochs observed, mean log-density of the later noisy values. The same curves go
through the fp32 and the int8 onnxruntime graphs; the loss is the paired mean difference
``LL(fp32) - LL(int8)`` (nats, with its standard error). int8 may be shipped (``--quantize`` /
``CURVECAST_QUANTIZE=true``) only if the loss is <= 0.02 nats at every cutoff; the script also
reports the speed-up at one typical batch. Rerun it whenever the weights change.

    python bench/serve_quantize.py [--model default] [--curves 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pfn.evaluate import PRIOR_CUTOFFS, prior_log_likelihood
from pfn.io import load_model, resolve_model_dir
from prior import get_prior
from serve.export import ensure_onnx, quantize_onnx
from serve.runtime import OnnxRuntime
from serve.settings import ServeSettings

GATE_NATS = 0.02


class RuntimeAsModel:
    """What prior_log_likelihood needs of a PFN: ``predict`` and ``bar``."""

    def __init__(self, runtime: OnnxRuntime, bar: torch.nn.Module) -> None:
        self.predict = runtime
        self.bar = bar


def speed(rt: OnnxRuntime, reps: int = 20) -> float:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 20, generator=g), torch.rand(64, 20, generator=g),
         torch.ones(64, 20, dtype=torch.bool), torch.rand(64, 1, generator=g))
    rt(*x)
    t = time.perf_counter()
    for _ in range(reps):
        rt(*x)
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--curves", type=int, default=1000, help="prior curves per cutoff")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model_dir = resolve_model_dir(a.model)
    model, cfg = load_model(model_dir)
    fp32_path = ensure_onnx(model, model_dir, cfg["sha256"], ServeSettings().onnx_cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = quantize_onnx(fp32_path, Path(tmp) / "int8.onnx")
        fp32 = OnnxRuntime(fp32_path, threads=a.threads)
        int8 = OnnxRuntime(int8_path, threads=a.threads, quantized=True)
        sizes = (os.path.getsize(fp32_path) / 2**20, os.path.getsize(int8_path) / 2**20)
        prior = get_prior("lcpfn")
        y = prior.sample(a.curves, torch.Generator().manual_seed(a.seed)).y
        print(f"# int8 dynamic quantisation gate — model {a.model} (sha256 {cfg['sha256'][:12]}, "
              f"{cfg.get('meta', {}).get('steps', '?')} training steps), {a.curves} prior curves "
              f"per cutoff, seed {a.seed}")
        print("\n| cutoff | LL fp32 | LL int8 | loss (nats) | ± s.e. | <= 0.02 |")
        print("|---|---|---|---|---|---|")
        ok = True
        for c in PRIOR_CUTOFFS:
            lf = prior_log_likelihood(RuntimeAsModel(fp32, model.bar), y, c)  # type: ignore[arg-type]
            li = prior_log_likelihood(RuntimeAsModel(int8, model.bar), y, c)  # type: ignore[arg-type]
            d = (lf - li).double()
            loss, se = float(d.mean()), float(d.std() / np.sqrt(len(d)))
            passed = loss <= GATE_NATS
            ok &= passed
            print(f"| {c} | {float(lf.mean()):.4f} | {float(li.mean()):.4f} | {loss:.4f} | "
                  f"{se:.4f} | {'yes' if passed else 'NO'} |")
        tf, ti = speed(fp32), speed(int8)
        print(f"\nsize {sizes[0]:.1f} MB -> {sizes[1]:.1f} MB; forward (64 curves x 21 tokens, "
              f"{a.threads} thread): fp32 {tf * 1e3:.2f} ms, int8 {ti * 1e3:.2f} ms "
              f"({tf / ti:.2f}x)")
        print(f"verdict: int8 {'MAY' if ok else 'must NOT'} be shipped for these weights "
              f"(gate: loss <= {GATE_NATS} nats at every cutoff)")


if __name__ == "__main__":
    main()
