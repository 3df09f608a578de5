"""Default model latency/throughput vs lcpfn's 6- and 12-layer architectures, in one run.

    pip install --no-deps lcpfn==0.1.3
    python bench/model_latency.py [--threads 1] [--seconds 3]

Workload: curves observed for 20 epochs, one query (the final epoch). Rows: curvecast's default
model through torch (`PFN.predict`) and through onnxruntime (the serving path), and lcpfn's
`TransformerModel` (512 wide, 4 heads, 1024 hidden, 1000 buckets, as its released checkpoints)
with 6 and 12 layers and random weights. Batch 1 = latency; batch 256/1024 = throughput.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pfn import Predictor

CUT = 20


def timeit(fn: Callable[[], object], seconds: float) -> float:
    """Median seconds per call over repeated calls."""
    fn()
    ts = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(ts) < 5:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def curvecast_inputs(b: int) -> tuple[torch.Tensor, ...]:
    t = torch.arange(1, CUT + 1, dtype=torch.float32).expand(b, CUT) / 100
    y = torch.rand(b, CUT)
    return t, y, torch.ones(b, CUT, dtype=torch.bool), torch.ones(b, 1)


def lcpfn_model(layers: int) -> Callable[[int], Callable[[], object]]:
    import lcpfn.layer
    from lcpfn import encoders
    from lcpfn.transformer import TransformerModel

    # lcpfn 0.1.3 relies on `from torch.nn.modules.transformer import *` exporting these,
    # which newer torch no longer does; supply them so its architecture builds unchanged.
    for name in ("MultiheadAttention", "Linear", "Dropout", "LayerNorm"):
        setattr(lcpfn.layer, name, getattr(torch.nn, name))
    lcpfn.layer.F = torch.nn.functional  # type: ignore[attr-defined]

    torch.manual_seed(0)
    m = TransformerModel(encoders.Linear(1, 512), 1000, 512, 4, 1024, layers,
                         y_encoder=encoders.Linear(1, 512)).eval()
    enc = m.transformer_encoder

    def run_layers(src: torch.Tensor, mask: torch.Tensor | None = None, **_: object) -> object:
        # torch's TransformerEncoder now passes is_causal=, which lcpfn's layers don't take
        for layer in enc.layers:
            src = layer(src, src_mask=mask)
        return src

    enc.forward = run_layers

    def make(b: int) -> Callable[[], object]:
        x = (torch.arange(1, CUT + 2, dtype=torch.float32) / 100)[:, None, None]
        x = x.expand(CUT + 1, b, 1)  # (T, B, 1)
        y = torch.rand(CUT, b)

        def run() -> object:
            with torch.inference_mode():
                return m((x, y), single_eval_pos=CUT)

        return run

    return make


def curvecast_rows(name: str, threads: int) -> dict[str, Callable[[int], Callable[[], object]]]:
    """Benchmark rows for one curvecast model: torch, and onnxruntime when installed."""
    model = Predictor.load(name).model
    cfg = model.cfg
    tag = f"curvecast {Path(name).name} ({cfg.n_layers}x{cfg.d_model})"

    def torch_make(b: int) -> Callable[[], object]:
        inp = curvecast_inputs(b)

        def run() -> object:
            with torch.inference_mode():
                return model.predict(*inp)

        return run

    def torch_decay_make(b: int) -> Callable[[], object]:
        inp = curvecast_inputs(b)
        flags = torch.ones(b)

        def run() -> object:
            with torch.inference_mode():
                return model.predict(*inp, flags)

        return run

    decay = model.cfg.decay_input  # the decay branch runs only for curves with lr_decay=True
    rows = {f"{tag}, torch": torch_make}
    if decay:
        rows[f"{tag} with lr_decay, torch"] = torch_decay_make
    try:
        from serve.export import export_onnx
        from serve.runtime import OnnxRuntime

        tmp = Path(tempfile.mkdtemp())
        ort_rt = OnnxRuntime(export_onnx(model, tmp / "m.onnx"), threads=threads,
                             decay_path=export_onnx(model, tmp / "d.onnx", True) if decay else None)

        def ort_make(b: int) -> Callable[[], object]:
            inp = [x.numpy() for x in curvecast_inputs(b)]
            return lambda: ort_rt.run_numpy(*inp)

        def ort_decay_make(b: int) -> Callable[[], object]:
            inp = [x.numpy() for x in curvecast_inputs(b)]
            flags = np.ones(b, np.float32)
            return lambda: ort_rt.run_numpy(*inp, flags)

        rows[f"{tag}, onnxruntime"] = ort_make
        if decay:
            rows[f"{tag} with lr_decay, onnxruntime"] = ort_decay_make
    except ImportError as e:
        print(f"(onnxruntime row skipped: {e})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batches", default="1,256,1024")
    ap.add_argument("--model", action="append",
                    help="a shipped model name or a model directory (repeat to compare several "
                         "in one run; default: the default model)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    rows: dict[str, Callable[[int], Callable[[], object]]] = {}
    for name in a.model or ["default"]:
        rows.update(curvecast_rows(name, a.threads))
    try:
        rows["lcpfn 6x512 (random weights), torch"] = lcpfn_model(6)
        rows["lcpfn 12x512 (random weights), torch"] = lcpfn_model(12)
    except ImportError as e:
        print(f"(lcpfn rows skipped: {e}; pip install --no-deps lcpfn==0.1.3)")
    res = {name: [timeit(make(b), a.seconds) for b in batches] for name, make in rows.items()}
    base = next(iter(res.values()))
    hdr = " | ".join(f"batch {b}" for b in batches)
    print(f"threads={a.threads}; ms per call (curves/s); ratio = time / curvecast torch time\n")
    print(f"| model | {hdr} |\n|---|" + "---|" * len(batches))
    for name, ts in res.items():
        cells = [f"{t * 1e3:.2f} ms ({b / t:,.0f}/s, {t / t0:.1f}x)"
                 for t, b, t0 in zip(ts, batches, base, strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
