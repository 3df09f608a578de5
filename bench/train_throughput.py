"""Training throughput of the default recipe's knobs, side by side in one run.

    python bench/train_throughput.py [--steps 6] [--threads 2]

Each row times full optimizer steps (sampling, forward, loss, backward, AdamW) of the default
3x256 PFN at batch 128 and reports curves/s, tokens/s and the ratio to a plain fp32 eager loop
that runs the output head on every token (the baseline). Rows: the baseline; head on query
tokens only (the recipe); + bf16 autocast; + torch.compile; + query subsampling (16 queries
per curve in 8 length-sorted micro-batches: ``max_queries``, ``query_groups``). Tokens count
what goes through the model (padding included). ``--layers 6`` times deep6's 6x256 instead.
"""

from __future__ import annotations

import argparse
import time

import torch

from pfn.model import PFN
from prior import get_prior
from train.config import TrainConfig, apply_overrides
from train.loop import make_optimizer, query_microbatches, subsampled_loss, training_batch


def run(cfg: TrainConfig, steps: int, query_head: bool) -> tuple[float, float]:
    prior = get_prior(cfg.prior)
    torch.manual_seed(0)
    model = PFN(cfg.model, torch.linspace(-0.2, 1.2, cfg.model.n_buckets + 1))
    opt = make_optimizer(model, cfg)
    fwd = torch.compile(model, dynamic=True) if cfg.compile else model
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    g = torch.Generator().manual_seed(0)
    times, tokens = [], 0
    for i in range(steps + 2):  # 2 warm-up steps (compilation)
        t0 = time.perf_counter()
        t, y, is_ctx = training_batch(prior, cfg.batch_size, g, 1)[:3]
        opt.zero_grad()
        n_tok = t.numel()
        if cfg.max_queries:
            mbs = query_microbatches(t, y, is_ctx, cfg.max_queries, cfg.query_groups, g)
            total = float((~is_ctx).sum())
            for mb in mbs:
                subsampled_loss(model, fwd, mb, amp, total).backward()
            n_tok = sum(mb.t.numel() for mb in mbs)
        else:
            with amp:  # the baseline runs the head on every token; the loss is on queries
                logits = (fwd(t, y, is_ctx, ~is_ctx) if query_head
                          else fwd(t, y, is_ctx)[~is_ctx])
            loss = -model.bar.log_density(logits.float(), y[~is_ctx]).mean()
            loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            tokens += n_tok
    dt = sum(times)
    return steps * cfg.batch_size / dt, tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=3, help="transformer blocks (3: the default)")
    ap.add_argument("--rows", default="all", help="'all', or 'subsampling': baseline, recipe "
                    "and query subsampling only (skips the slow bf16 and compile rows)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = apply_overrides(TrainConfig(), {"model.n_layers": a.layers,
                                           "model.sharpen_head": True})
    rows = [
        ("fp32 eager, head on all tokens (baseline)", base, False),
        ("fp32 eager, head on query tokens (recipe)", base, True),
        ("bf16 autocast, head on query tokens", apply_overrides(base, {"bf16": True}), True),
        ("fp32 torch.compile, head on query tokens", apply_overrides(base, {"compile": True}),
         True),
        ("fp32 eager, 16 queries per curve, 8 micro-batches",
         apply_overrides(base, {"max_queries": 16, "query_groups": 8}), True),
    ]
    if a.rows == "subsampling":
        rows = [rows[0], rows[1], rows[4]]
    res = [(name, *run(cfg, a.steps, qh)) for name, cfg, qh in rows]
    ref = res[0][1]
    print(f"threads={a.threads}, batch 128, {a.layers}x256 PFN with the sharpening head, "
          f"{a.steps} timed steps per row\n")
    print("| loop | curves/s | tokens/s | ratio |\n|---|---|---|---|")
    for name, cps, tps in res:
        print(f"| {name} | {cps:.1f} | {tps:,.0f} | {cps / ref:.2f}x |")


if __name__ == "__main__":
    main()
