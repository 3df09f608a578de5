"""Triton kernels vs their torch twins on a CUDA GPU, measured side by side in one run.

    python bench/gpu_kernels.py              # needs a CUDA GPU; without one: says so, exits 0
    python bench/gpu_kernels.py --quick      # fewer shapes
    python bench/gpu_kernels.py --compile    # no GPU needed: compile for sm_80/sm_90, report
                                             # registers / spills / shared memory (no timing)

Rows (``triton.testing.do_bench``: CUDA-event median, L2 flushed between runs):

* attention — ``serve.kernels`` PFN attention vs its twin (SDPA with the boolean (B,1,L,L)
  mask) and, as a yardstick only, unmasked SDPA (flash backend; different semantics) over
  batch sizes, context lengths (full and ragged) and 1 or 10 queries; µs and useful TFLOP/s
  (4·D·(L·kv + L) per curve and head, kv = that curve's context length: all three rows are
  credited with the same useful work).
* posterior head — the fused kernel vs the twin (``BarDistribution``: softmax, cumsum, gathers)
  for 3 quantiles, 2 thresholds, 2 values per row; µs and GB/s of logits read.
* end to end — the embedded model (``pfn/weights/default``), GPU-resident inputs ->
  mean, std, 3 quantiles, P(y > 0.8): eager torch + twin vs kernels, batch 1 and 1024.

Every row also prints the max |difference| kernel vs twin, so a run doubles as a GPU
correctness check (CI proves correctness on the CPU interpreter only).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F

QUANTILES = [0.05, 0.5, 0.95]


def no_cuda_message() -> str:
    return ("no CUDA device: nothing timed. The kernels' correctness is tested on the CPU "
            "under TRITON_INTERPRET=1 (tests/test_kernels*.py); `--compile` checks that they "
            "compile for sm_80/sm_90 without a GPU. Run this script on a CUDA machine for "
            "timings.")


def compile_report(archs: list[int]) -> None:
    """AOT-compile each kernel at the shapes the model uses (no GPU needed)."""
    from serve.kernels import attention, posterior
    from serve.kernels.aot import compile_launch

    print(f"{'kernel':<34}{'sm':>4}{'regs':>6}{'spill B':>9}{'smem B':>9}{'mma':>5}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, H, L, D in ((1024, 4, 110, 64), (8, 8, 300, 32), (8, 2, 300, 128)):
            q, k, v = (torch.empty(B, L, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4))
            is_ctx = torch.zeros(B, L, dtype=torch.bool)
            out = torch.empty(B, L, H, D, dtype=dtype).permute(0, 2, 1, 3)
            launch = attention.attention_launch(q, k, v, is_ctx, out)
            c = launch.constexprs
            name = (f"attention {str(dtype)[6:]} D={D} "
                    f"{c['BLOCK_M']}x{c['BLOCK_N']}/{launch.num_warps}w")
            for arch in archs:
                r = compile_launch(attention._pfn_attention_kernel, launch, arch)
                print(f"{name:<34}{arch:>4}{r.registers:>6}{r.spill_bytes:>9}"
                      f"{r.shared_bytes:>9}{'yes' if r.mma else 'no':>5}")
    borders = torch.linspace(-0.2, 1.2, 1001)
    for dtype in (torch.float32, torch.float16):
        for nq, nt, nv in ((3, 2, 2), (8, 8, 8)):
            R, n = 4096, 1000
            x = torch.empty(R, n, dtype=dtype)
            tab = posterior.BucketTable.build(borders)
            launch = posterior.posterior_launch(
                x, tab, torch.empty(1, nq), torch.empty(1, nt), torch.empty(1, nv),
                torch.empty(4, R), torch.empty(R, nq), torch.empty(R, nt), torch.empty(R, nv))
            c = launch.constexprs
            name = (f"posterior {str(dtype)[6:]} k={nq},{nt},{nv} "
                    f"{c['BLOCK_R']}x{c['BLOCK_K']}x{c['BLOCK_N']}")
            for arch in archs:
                r = compile_launch(posterior._posterior_kernel, launch, arch)
                print(f"{name:<34}{arch:>4}{r.registers:>6}{r.spill_bytes:>9}"
                      f"{r.shared_bytes:>9}{'yes' if r.mma else 'no':>5}")
    print("compiled only: no timing, no execution (spill B: register spill stores, ptxas -v)")


def bench_attention(quick: bool) -> None:
    from triton.testing import do_bench

    from serve.kernels.attention import attention_torch, attention_triton

    H, D = 4, 64
    print(f"\n== attention (H={H}, D={D}) ==")
    print(f"{'dtype':<6}{'B':>6}{'K':>5}{'Q':>4}{'ctx':>8} | {'kernel µs':>10}{'TF/s':>7} | "
          f"{'twin µs':>9}{'TF/s':>7} | {'sdpa* µs':>9} | {'twin/kern':>9} | max|diff|")
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for B in (1, 64, 1024) if not quick else (1, 1024):
            for K in (10, 50, 99) if not quick else (10, 99):
                for Q in (1, 10):
                    for ragged in (False, True):
                        L = K + Q
                        n_ctx = (torch.randint(1, K + 1, (B,), device="cuda", generator=g)
                                 if ragged else torch.full((B,), K, device="cuda"))
                        pos = torch.arange(L, device="cuda")
                        is_ctx = pos[None, :] < n_ctx[:, None]
                        q, k, v = torch.randn(3, B, H, L, D, device="cuda", dtype=dtype,
                                              generator=g).unbind(0)
                        t_k = do_bench(partial(attention_triton, q, k, v, is_ctx))
                        t_t = do_bench(partial(attention_torch, q, k, v, is_ctx))
                        t_s = do_bench(partial(F.scaled_dot_product_attention, q, k, v))
                        kv = n_ctx.double()
                        flops = float((4 * D * H * (L * kv + L)).sum())
                        diff = float((attention_triton(q, k, v, is_ctx).float()
                                      - attention_torch(q, k, v, is_ctx).float()).abs().max())
                        print(f"{str(dtype)[6:]:<6}{B:>6}{K:>5}{Q:>4}"
                              f"{'ragged' if ragged else 'full':>8} | {t_k * 1e3:>10.1f}"
                              f"{flops / t_k / 1e9:>7.2f} | {t_t * 1e3:>9.1f}"
                              f"{flops / t_t / 1e9:>7.2f} | {t_s * 1e3:>9.1f} | "
                              f"{t_t / t_k:>9.2f} | {diff:.2e}")
    print("sdpa*: unmasked SDPA (flash backend) — a speed yardstick with different semantics")


def bench_posterior(quick: bool) -> None:
    from triton.testing import do_bench

    from serve.kernels.posterior import posterior_summary

    n = 1000
    borders = torch.linspace(-0.2, 1.2, n + 1, device="cuda")
    print(f"\n== posterior head (n_buckets={n}, 3 quantiles, 2 thresholds, 2 values) ==")
    print(f"{'dtype':<6}{'rows':>8} | {'kernel µs':>10}{'GB/s':>8} | {'twin µs':>9}{'GB/s':>8} | "
          f"{'twin/kern':>9} | max|diff| (quantiles)")
    for dtype in (torch.float32, torch.float16):
        for R in (1, 1024, 16384) if not quick else (1, 1024):
            x = (3 * torch.randn(R, n, device="cuda")).to(dtype)
            args = dict(quantiles=QUANTILES, thresholds=[0.5, 0.8], values=[0.3, 0.9])
            t_k = do_bench(partial(posterior_summary, x, borders, mode="triton", **args))
            t_t = do_bench(partial(posterior_summary, x, borders, mode="torch", **args))
            gb = R * n * x.element_size() / 1e9
            a = posterior_summary(x, borders, mode="triton", **args)
            b = posterior_summary(x, borders, mode="torch", **args)
            diff = float((a.quantiles - b.quantiles).abs().max())
            print(f"{str(dtype)[6:]:<6}{R:>8} | {t_k * 1e3:>10.1f}{gb / t_k * 1e3:>8.1f} | "
                  f"{t_t * 1e3:>9.1f}{gb / t_t * 1e3:>8.1f} | {t_t / t_k:>9.2f} | {diff:.2e}")


def posterior_e2e(model, x: tuple[torch.Tensor, ...], borders: torch.Tensor,
                  mode: str) -> torch.Tensor:
    from serve.kernels import posterior_summary

    with torch.inference_mode():
        logits = model.predict(*x)
        s = posterior_summary(logits, borders, QUANTILES, [0.8], mode=mode)  # type: ignore[arg-type]
    return s.mean


def bench_end_to_end() -> None:
    from triton.testing import do_bench

    from pfn.io import load_model
    from serve.kernels import disable_kernels, enable_kernels

    model, _ = load_model()
    model = model.cuda().eval()
    borders = model.bar.borders
    K = 20  # observed epochs per curve; one query (the final epoch)
    print(f"\n== end to end: default model, {K} context points, 1 query, fp32 ==")
    print(f"{'batch':>6} | {'torch+twin ms':>13} | {'kernels ms':>10} | {'speed-up':>8} | "
          "max|diff| mean")
    for B in (1, 1024):
        t_ctx = torch.linspace(0.01, 0.2, K, device="cuda").expand(B, K).contiguous()
        y_ctx = torch.rand(B, K, device="cuda")
        mask = torch.ones(B, K, dtype=torch.bool, device="cuda")
        t_qry = torch.ones(B, 1, device="cuda")

        x = (t_ctx, y_ctx, mask, t_qry)
        disable_kernels(model)
        t_t = do_bench(partial(posterior_e2e, model, x, borders, "torch"))
        ref = posterior_e2e(model, x, borders, "torch")
        enable_kernels(model, "triton")
        t_k = do_bench(partial(posterior_e2e, model, x, borders, "triton"))
        diff = float((posterior_e2e(model, x, borders, "triton") - ref).abs().max())
        disable_kernels(model)
        print(f"{B:>6} | {t_t:>13.3f} | {t_k:>10.3f} | {t_t / t_k:>8.2f} | {diff:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--compile", action="store_true",
                    help="AOT-compile for --archs and report resources (no GPU needed)")
    ap.add_argument("--archs", default="80,90", help="compute capabilities for --compile")
    a = ap.parse_args()
    if a.compile:
        compile_report([int(s) for s in a.archs.split(",")])
        return 0
    if not torch.cuda.is_available():
        print(no_cuda_message())
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__}")
    bench_attention(a.quick)
    bench_posterior(a.quick)
    bench_end_to_end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
