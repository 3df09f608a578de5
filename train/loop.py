"""Pretraining on prior curves sampled on the fly: single process or torchrun DDP.

Batch layout: every curve is one sequence of its ``m`` epochs; a cutoff drawn per curve marks
the first ``cutoff`` epochs as context, the rest as queries (see ``pfn/model.py``'s mask). The
loss is the mean negative log-density of the noisy value at every query position, and the
output head runs on query tokens only.

With ``max_queries`` (query subsampling) each curve keeps its context and at most that many of
its later epochs, drawn at random; each kept query's loss is weighted by (queries of the curve)
/ (queries kept), so the step's loss is an unbiased estimate of the all-queries loss
(``tests/test_train.py`` checks it). Rows then have different lengths, so the curves are sorted
by length and run as ``query_groups`` micro-batches, each padded to its longest row, with one
optimizer step. Fewer tokens per curve: 1.5-1.6x more curves per second for 6 x 256 at
``max_queries=16`` (docs/model-card.md).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from pfn.bar import borders_from_samples
from pfn.evaluate import prior_log_likelihood
from pfn.io import load_model, save_model
from pfn.model import PFN, Block
from prior import CurvePrior, get_prior, sample_cutoffs
from train.checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.export import model_from_checkpoint, model_meta, seeds_before

EVAL_CUTOFFS = (1, 4, 10, 20, 40, 80)  # 1 and 4: the early-stopping regime
# config keys that may change between a run and its resumption (they don't change the maths)
# (ema_decay only changes the averaged copy that is exported, not the optimised weights;
# n_curves re-targets the learning-rate schedule from the step reached: a run can be shortened
# or extended, and the change is logged; max_queries, query_groups and expected_targets change
# how the loss is estimated, not what it is)
OPERATIONAL_KEYS = frozenset({"threads", "device", "ckpt_every", "log_every", "eval_every",
                              "eval_curves", "compile", "out_dir", "ema_decay", "n_curves",
                              "max_queries", "query_groups", "expected_targets"})


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    total = cfg.total_steps
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_borders(cfg: TrainConfig, prior: CurvePrior) -> Tensor:
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    return borders_from_samples(prior.sample(cfg.border_curves, g).y, cfg.model.n_buckets)


def build_model(cfg: TrainConfig, prior: CurvePrior) -> PFN:
    torch.manual_seed(cfg.seed)
    return PFN(cfg.model, make_borders(cfg, prior))


def warm_start(model: PFN, source: str, verbose: bool = False) -> list[str]:
    """Copy a trained model's weights into ``model`` (same widths and buckets, possibly with
    extra parameters such as the sharpening head, or extra blocks on top, which start as the
    identity: the grown model answers exactly as its source); returns the parameters it
    lacked. ``source``: a training run directory (its checkpoint's EMA weights), a model
    directory or a shipped model name."""
    if (Path(source) / CKPT_NAME).is_file():
        src, _ = model_from_checkpoint(source)
    else:
        src, _ = load_model(source)
    state = src.state_dict()  # bucket borders included: the head was trained for them
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"init_from={source!r}: does not fit model config: {e}") from e
    if unexpected:
        raise ValueError(f"init_from={source!r}: parameters {unexpected} have no place in this "
                         "model; use a model config that holds them")
    for block in model.blocks[len(src.blocks):]:  # depth growth: new blocks on top
        assert isinstance(block, Block)
        block.make_identity()
    if verbose:
        print(f"warm start from {source}; newly initialised: {missing or 'nothing'}",
              file=sys.stderr)
    return list(missing)


def freeze_except(model: torch.nn.Module, trainable: str) -> list[str]:
    """Freeze every parameter whose name is not, or does not start with, one of the
    comma-separated prefixes in ``trainable`` ("" freezes nothing); returns the names that
    still train. A frozen body costs a forward pass and no backward pass."""
    if not trainable:
        return [n for n, _ in model.named_parameters()]
    prefixes = [p.strip() for p in trainable.split(",") if p.strip()]
    named = list(model.named_parameters())

    def trains(name: str, pres: list[str]) -> bool:
        return any(name == pre or name.startswith(pre + ".") for pre in pres)

    unmatched = [pre for pre in prefixes if not any(trains(n, [pre]) for n, _ in named)]
    if unmatched:
        modules = sorted({n.split(".")[0] for n, _ in named})
        raise ValueError(f"trainable: no parameter of this model is named {unmatched} (or "
                         f"starts with it); its modules are {modules}")
    for n, p in named:
        p.requires_grad_(trains(n, prefixes))
    return [n for n, p in named if p.requires_grad]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


class TrainBatch(NamedTuple):
    """A step's curves, each (n, m) unless said: progress t, noisy values y, the context mask
    is_ctx from per-curve cutoffs, decay (n,) float (1 for the curves the prior drew under
    learning-rate decay: the input of a model with ``decay_input``; all 0 without
    ``anneal_prob``), and the noise-free values f and noise scales sigma (n,) the noisy values
    were drawn from (the targets of ``TrainConfig.expected_targets``)."""

    t: Tensor
    y: Tensor
    is_ctx: Tensor
    decay: Tensor
    f: Tensor
    sigma: Tensor


def training_batch(
    prior: CurvePrior, n: int, g: torch.Generator, min_cutoff: int, log_share: float = 0.0
) -> TrainBatch:
    """``n`` prior curves with cutoffs drawn by ``sample_cutoffs``."""
    m = prior.n_epochs
    batch = prior.sample(n, g)
    cut = sample_cutoffs(n, m, g, low=min_cutoff, log_share=log_share)
    t = (torch.arange(1, m + 1, dtype=torch.float32) / m).expand(n, m)
    is_ctx = torch.arange(m)[None, :] < cut[:, None]  # (n, m)
    return TrainBatch(t, batch.y, is_ctx, batch.annealed.float(), batch.f, batch.sigma)


def query_nll(model: PFN, logits: Tensor, y: Tensor, target: tuple[Tensor, Tensor] | None
              ) -> Tensor:
    """Each query's negative log-density (N,) at its noisy value y (N,), or with ``target``
    = (f, sd) (N,) each, its expected value over the noise y ~ N(f, sd^2) (the same
    loss in expectation, with less variance: ``BarDistribution.expected_nll``)."""
    if target is None:
        return -model.bar.log_density(logits.float(), y)
    return model.bar.expected_nll(logits.float(), *target)


def loss_fn(model: PFN, fwd: Any, t: Tensor, y: Tensor, is_ctx: Tensor, amp: Any,
            per_curve: bool = False, decay: Tensor | None = None,
            target: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Mean negative log-density over all query tokens of the batch, or with ``per_curve`` the
    mean over curves of each curve's mean over its queries (the paper protocol's weighting);
    ``target`` = (f, sd) (n, m) each: the expected loss over the noise (``query_nll``)."""
    with amp:
        logits = fwd(t, y, is_ctx, ~is_ctx, decay)  # (N_query, n_buckets)
    qry = ~is_ctx
    nll = query_nll(model, logits, y[qry], None if target is None else
                    (target[0][qry], target[1][qry]))  # (N_query,) row-major
    if not per_curve:
        return nll.mean()
    n_qry = qry.sum(1)  # (n,)
    w = (1.0 / n_qry.clamp(min=1).float()).repeat_interleave(n_qry)  # (N_query,)
    return (nll * w).sum() / int((n_qry > 0).sum())


@dataclass(frozen=True)
class MicroBatch:
    """Curves with subsampled queries, padded to the longest row: tokens (b, L); ``select``
    marks the kept queries (not the context, not the padding), ``weight`` (N_select,) their
    loss weights, ``decay`` (b,) the curves' decay flags; with expected targets ``f`` and
    ``sd`` (b, L) the tokens' noise-free values and noise scales."""

    t: Tensor
    y: Tensor
    is_ctx: Tensor
    select: Tensor
    weight: Tensor
    decay: Tensor
    f: Tensor | None = None
    sd: Tensor | None = None

    def to(self, device: torch.device) -> MicroBatch:
        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return MicroBatch(self.t.to(device), self.y.to(device), self.is_ctx.to(device),
                          self.select.to(device), self.weight.to(device), self.decay.to(device),
                          move(self.f), move(self.sd))

    def target(self) -> tuple[Tensor, Tensor] | None:
        """(f, sd) of the kept queries (N_select,) each, or None (noisy targets)."""
        if self.f is None or self.sd is None:
            return None
        return self.f[self.select], self.sd[self.select]


def query_microbatches(t: Tensor, y: Tensor, is_ctx: Tensor, max_queries: int, groups: int,
                       g: torch.Generator, per_curve: bool = False,
                       decay: Tensor | None = None,
                       target: tuple[Tensor, Tensor] | None = None) -> list[MicroBatch]:
    """Each curve of (t, y, is_ctx) (n, m) keeps its context and min(max_queries, its query
    count) of its queries, uniformly without replacement, each weighted by (query count) /
    (kept); the curves, sorted by kept length, are split into ``groups`` micro-batches. The
    weighted sum of the kept queries' losses is an unbiased estimate of the sum over all.
    With ``per_curve`` every curve weighs (all queries) / n in all, (all queries) / (n kept)
    per kept query: the same sum then estimates (all queries) x the mean over curves of each
    curve's mean loss, so ``subsampled_loss`` estimates ``loss_fn(per_curve=True)``.
    ``target`` = (f, sd) (n, m) each rides along for expected targets."""
    n, m = t.shape
    decay = torch.zeros(n) if decay is None else decay
    n_ctx = is_ctx.sum(1)  # (n,)
    n_qry = m - n_ctx
    key = torch.rand(n, m, generator=g).masked_fill(is_ctx, -1.0)
    order = key.argsort(1)  # (n, m): each row's context, then its queries in random order
    kept = n_qry.clamp(max=max_queries)
    length = n_ctx + kept  # (n,) tokens per curve
    w_curve = n_qry.float() / kept.clamp(min=1).float()
    if per_curve:
        w_curve = float(n_qry.sum()) / int((n_qry > 0).sum()) / kept.clamp(min=1).float()
    out = []
    for idx in length.argsort().tensor_split(min(groups, n)):
        L = int(length[idx].max())
        o = order[idx, :L]  # (b, L)
        pos = torch.arange(L)[None, :]
        ctx = pos < n_ctx[idx, None]  # (b, L)
        sel = (pos < length[idx, None]) & ~ctx
        f, sd = (None, None) if target is None else (
            torch.gather(target[0][idx], 1, o), torch.gather(target[1][idx], 1, o))
        out.append(MicroBatch(torch.gather(t[idx], 1, o), torch.gather(y[idx], 1, o), ctx, sel,
                              w_curve[idx, None].expand(-1, L)[sel], decay[idx], f, sd))
    return out


def subsampled_loss(model: PFN, fwd: Any, mb: MicroBatch, amp: Any, total: float) -> Tensor:
    """The micro-batch's weighted negative log-density sum over ``total`` (the query count
    of the whole batch): these summed over a step's micro-batches estimate ``loss_fn``."""
    with amp:
        logits = fwd(mb.t, mb.y, mb.is_ctx, mb.select, mb.decay)  # (N_select, n_buckets)
    nll = query_nll(model, logits, mb.y[mb.select], mb.target())
    return (nll * mb.weight).sum() / total


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.dist = _init_dist(dev)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if dev == "cuda" else "cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % self.dist.world:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the {self.dist.world} ranks"
            )
        self.local_batch = cfg.batch_size // self.dist.world
        self.prior = get_prior(cfg.prior)
        self.model = build_model(cfg, self.prior)
        if cfg.init_from and not (Path(cfg.out_dir) / CKPT_NAME).is_file():
            # (a resumed run takes its weights from its own checkpoint, not from the source)
            warm_start(self.model, cfg.init_from, verbose=self.dist.main)
            if self.dist.main and cfg.seed in seeds_before(cfg.init_from):
                print(f"warning: seed={cfg.seed} was already used by a run behind init_from="
                      f"{cfg.init_from!r}: this run draws the prior curves that run drew "
                      "(the same curves again, when the batch layout matches too); set seed to "
                      "a new value for fresh curves", file=sys.stderr)
        self.model = self.model.to(self.device)
        trained = freeze_except(self.model, cfg.trainable)
        if cfg.trainable and self.dist.main:
            print(f"trainable={cfg.trainable!r}: {len(trained)} parameter tensors train, the "
                  "rest is frozen", file=sys.stderr)
        self.opt = make_optimizer(self.model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17 + self.dist.rank)
        self.step = 0
        self.out = Path(cfg.out_dir)
        self.ddp: Any = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.fwd: Any = torch.compile(self.ddp, dynamic=True) if cfg.compile else self.ddp
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        self.eval_decay: Tensor | None = None  # the held-out curves' decay flags
        self.eval_set = self._eval_set()
        # EMA of the parameters (what gets exported when ema_decay > 0)
        self.ema: dict[str, Tensor] = {}
        if cfg.ema_decay > 0:
            self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()
                        if p.requires_grad}

    def ema_update(self) -> None:
        if not self.ema:
            return
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        named = dict(self.model.named_parameters())
        keys = list(self.ema)
        torch._foreach_lerp_([self.ema[k] for k in keys], [named[k].detach() for k in keys],
                             1 - d)

    def averaged_model(self) -> PFN:
        """The model to evaluate and export: the EMA weights when enabled."""
        if not self.ema:
            return self.model
        m = copy.deepcopy(self.model)
        m.load_state_dict({**self.model.state_dict(), **self.ema})
        return m

    def _eval_set(self) -> Tensor | None:
        if not self.cfg.eval_every or not self.dist.main:
            return None
        # fixed, not cfg.seed: runs that differ only in their training stream are compared on
        # the same held-out curves
        g = torch.Generator().manual_seed(10_000)
        prior = get_prior(self.cfg.eval_prior) if self.cfg.eval_prior else self.prior
        batch = prior.sample(self.cfg.eval_curves, g)
        if self.cfg.model.decay_input:
            self.eval_decay = batch.annealed.float()
        return batch.y

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / CKPT_NAME

    def _gather_rng(self) -> list[Tensor]:
        s = self.gen.get_state()
        if self.dist.world == 1:
            return [s]
        out = [torch.empty_like(s) for _ in range(self.dist.world)]
        dist.all_gather(out, s)
        return out

    def save(self) -> None:
        rng = self._gather_rng()  # collective: every rank takes part
        if self.dist.main:
            meta = {"config": self.cfg.to_dict(), "step": self.step, "world": self.dist.world}
            save_checkpoint(self.ckpt_path, self.model.state_dict(), self.opt.state_dict(),
                            rng, meta, self.ema)

    def try_resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        ck = load_checkpoint(self.ckpt_path)
        saved = TrainConfig.from_dict(ck["meta"]["config"]).to_dict()  # new fields: defaults
        now = self.cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in now.items()
                if saved.get(k) != v and k not in OPERATIONAL_KEYS}
        if diff:
            raise ValueError(f"{self.ckpt_path}: config differs from the checkpoint's: {diff}; "
                             "use the same config or another out_dir")
        if ck["meta"]["world"] != self.dist.world:
            raise ValueError(f"{self.ckpt_path}: saved with {ck['meta']['world']} ranks; "
                             f"resume with the same number (now {self.dist.world})")
        if saved["n_curves"] != now["n_curves"] and self.dist.rank == 0:
            print(f"resuming at step {ck['meta']['step']} with n_curves {saved['n_curves']:,} -> "
                  f"{now['n_curves']:,}: the learning-rate schedule re-targets", file=sys.stderr)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optim"])
        self.gen.set_state(ck["rng_prior"][self.dist.rank])
        torch.set_rng_state(ck["rng_torch"])
        self.step = int(ck["meta"]["step"])
        if self.ema:  # resumed EMA, or (EMA switched on mid-run) start from the weights
            self.ema = {k: ck["ema"].get(k, v).clone() for k, v in
                        ((n, p.detach()) for n, p in self.model.named_parameters()
                         if p.requires_grad)}
        return True

    # -- the loop ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        t, y, is_ctx, decay, f, sigma = training_batch(
            self.prior, self.local_batch, self.gen, cfg.min_cutoff, cfg.cutoff_log_share)
        target = (f, sigma[:, None].expand_as(f)) if cfg.expected_targets else None  # (n, m)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        if cfg.max_queries:
            loss, tokens = self.subsampled_backward(t, y, is_ctx, decay, target)
        else:
            t, y, is_ctx = t.to(self.device), y.to(self.device), is_ctx.to(self.device)
            if target is not None:
                target = (target[0].to(self.device), target[1].to(self.device))
            loss = loss_fn(self.model, self.fwd, t, y, is_ctx, self.amp, cfg.per_curve_loss,
                           decay.to(self.device), target)
            loss.backward()
            tokens = float(t.numel())
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.ema_update()
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(gn), "tokens": tokens}

    def subsampled_backward(self, t: Tensor, y: Tensor, is_ctx: Tensor,
                            decay: Tensor | None = None,
                            target: tuple[Tensor, Tensor] | None = None
                            ) -> tuple[Tensor, float]:
        """Backward through the step's micro-batches (``max_queries``; gradients summed; DDP
        syncs on the last one only); returns the estimated loss and the tokens processed.
        The batch (t, y, is_ctx) is on the CPU, where the generator draws the queries."""
        mbs = [mb.to(self.device) for mb in query_microbatches(
            t, y, is_ctx, self.cfg.max_queries, self.cfg.query_groups, self.gen,
            self.cfg.per_curve_loss, decay, target)]
        total = float((~is_ctx).sum())
        loss = torch.zeros(())
        for i, mb in enumerate(mbs):
            sync = i == len(mbs) - 1 or not hasattr(self.ddp, "no_sync")
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                part = subsampled_loss(self.model, self.fwd, mb, self.amp, total)
                part.backward()
            loss = loss + part.detach().cpu()
        return loss, float(sum(mb.t.numel() for mb in mbs))

    def evaluate(self) -> dict[str, float]:
        assert self.eval_set is not None
        model = self.averaged_model().eval()
        out = {}
        with self.amp:
            for c in EVAL_CUTOFFS:
                decay = None if self.eval_decay is None else self.eval_decay.to(self.device)
                ll = prior_log_likelihood(model, self.eval_set.to(self.device), c, decay=decay)
                out[f"val_ll_{c}"] = float(ll.mean())
        return out

    def run(self, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Train to the config's end (or max_steps more steps); returns the last metrics."""
        from tqdm import tqdm

        cfg = self.cfg
        resumed = self.try_resume()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps,
                                                              self.step + max_steps)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not (progress and
                   self.dist.main), unit="step", dynamic_ncols=True)
        log = open(self.out / "metrics.jsonl", "a") if self.dist.main else None  # noqa: SIM115
        last: dict[str, Any] = {"resumed": resumed}
        t0, tok, cur = time.perf_counter(), 0.0, 0
        stop = self._stop_on_sigterm()
        try:
            while self.step < end:
                if stop.is_set():  # SIGTERM: checkpoint the step reached, then return
                    self.save()
                    break
                m = self.train_step()
                tok += m["tokens"] * self.dist.world
                cur += cfg.batch_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    dt = time.perf_counter() - t0
                    last = {"step": self.step, "curves": self.step * cfg.batch_size,
                            "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                            "curves_per_s": cur / dt, "tokens_per_s": tok / dt,
                            "time": time.time()}
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.dist.main:
                        last.update(self.evaluate())
                    if log is not None:
                        log.write(json.dumps(last) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{m['loss']:.3f}", cps=f"{cur / dt:.0f}")
                    t0, tok, cur = time.perf_counter(), 0.0, 0
                if self.step % cfg.ckpt_every == 0 or self.step == end:
                    self.save()
        finally:
            bar.close()
            if log is not None:
                log.close()
        if self.step >= cfg.total_steps and self.dist.main:
            self.export()
        return last

    def _stop_on_sigterm(self) -> threading.Event:
        """An event set by SIGTERM (single process, main thread only: under DDP a lone rank
        leaving the loop would hang the others, and torchrun stops the group itself)."""
        ev = threading.Event()
        if self.dist.world == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: ev.set())
        return ev

    def export(self, out_dir: Path | None = None) -> str:
        meta = model_meta(self.cfg, self.step, bool(self.ema))
        model = self.averaged_model()
        return save_model(model.cpu().float().eval(), out_dir or self.out / "model", meta)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        """Leave the process group cleanly: drop the DDP wrapper (its reducer holds the group
        and pending gloo work), wait until every rank is here (rank 0 may still be exporting),
        then destroy the group while the interpreter is fully alive. A rank that tore its gloo
        pairs down while a peer still used them, or left the group to interpreter shutdown,
        could die with SIGABRT ("terminate called without an active exception"). After an error
        (clean=False) the barrier is skipped: the failed peer would never reach it."""
        if self.dist.world > 1 and dist.is_initialized():
            self.fwd = self.ddp = self.model
            gc.collect()
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def train(cfg: TrainConfig, max_steps: int | None = None, progress: bool = True) -> dict:
    with Trainer(cfg) as tr:
        return tr.run(max_steps=max_steps, progress=progress)
