"""Export a training checkpoint's model as shipped weights (safetensors + config + sha256)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pfn.bar import fit_tail_scales, with_tail_scales
from pfn.errors import ModelNotFoundError
from pfn.io import load_model, read_config, resolve_model_dir, save_model
from pfn.model import PFN
from prior import get_prior
from train.checkpoint import CKPT_NAME, load_checkpoint, read_checkpoint_meta
from train.config import TAILS_CURVES, TAILS_SEED, TrainConfig


def source_record(init_from: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a warm start's source recorded about its training: (its run's TrainConfig as a
    dict, the rest) from a run directory's checkpoint (the rest: ``step``) or a model
    directory's config (the rest: its export metadata); empty dicts when there is none."""
    if not init_from:
        return {}, {}
    ckpt = Path(init_from) / CKPT_NAME
    if ckpt.is_file():
        meta = read_checkpoint_meta(ckpt)
        return dict(meta["config"]), dict(meta)
    rec = dict(read_config(resolve_model_dir(init_from)).get("meta", {}))
    return dict(rec.get("train_config", {})), rec


def curves_before(init_from: str) -> int:
    """Training curves behind a warm start's source (0 without one): a run directory's own
    curves plus its source's, recursively, or a model directory's recorded total."""
    cfg, rec = source_record(init_from)
    if "step" in rec:  # a run directory
        src = TrainConfig.from_dict(cfg)
        return int(rec["step"]) * src.batch_size + curves_before(src.init_from)
    return int(rec.get("curves_seen_total", rec.get("curves_seen", 0)))


def seeds_before(init_from: str) -> list[int]:
    """The ``seed`` of every run behind a warm start (source first, then its source, ...), as
    far as the chain is recorded and its sources can be found from here. A run with one of
    these seeds and the same prior and batch layout draws the same curves again."""
    try:
        cfg, _ = source_record(init_from)
        src = TrainConfig.from_dict(cfg) if cfg else None
    except (ValueError, TypeError, ModelNotFoundError):  # an unrecorded or missing source
        return []
    return [] if src is None else [src.seed, *seeds_before(src.init_from)]


def model_meta(cfg: TrainConfig, step: int, ema: bool) -> dict[str, object]:
    """What an exported model's config.json records about its training (``curves_seen``: this
    run's; ``curves_seen_total``: with those behind its warm start)."""
    prior = get_prior(cfg.prior)
    seen = step * cfg.batch_size
    return {"train_config": cfg.to_dict(), "ema": ema, "steps": step, "curves_seen": seen,
            "curves_seen_total": seen + curves_before(cfg.init_from),
            "max_context": prior.n_epochs - 1, "prior": prior.name}


def model_from_checkpoint(run_dir: str | Path) -> tuple[PFN, dict[str, object]]:
    """run_dir's latest checkpoint as a model (its EMA weights when the run kept them) and the
    metadata an export records."""
    ck = load_checkpoint(Path(run_dir) / CKPT_NAME)
    cfg = TrainConfig.from_dict(ck["meta"]["config"])
    model = PFN(cfg.model, ck["model"]["bar.borders"])
    model.load_state_dict({**ck["model"], **ck["ema"]})
    return model.eval(), model_meta(cfg, int(ck["meta"]["step"]), bool(ck["ema"]))


def export_checkpoint(run_dir: str | Path, out_dir: str | Path) -> str:
    """Write run_dir's latest checkpoint as a model directory; returns the sha256."""
    model, meta = model_from_checkpoint(run_dir)
    return save_model(model, out_dir, meta)


def refit_tails(src: str | Path, out_dir: str | Path, n_curves: int = TAILS_CURVES,
                seed: int = TAILS_SEED) -> tuple[str, dict[str, Any]]:
    """Write ``src`` (a model name or directory) to ``out_dir`` with its bar distribution's
    tails refitted (``pfn.bar.fit_tail_scales``) on ``n_curves`` curves of the prior it was
    trained on (its config's ``meta.prior``), seeded: the outer borders move, every other
    tensor is copied. The tails' scales are not trained (see ``pfn.bar``), so this changes
    nothing but the shape of the density beyond the inner borders. Returns the new sha256 and
    the record added to the config's ``meta.tails``."""
    if n_curves < 1000:
        raise ValueError(f"n_curves: {n_curves} is too few to fit the tails; use >= 1000")
    model, cfg = load_model(src)
    meta = dict(cfg.get("meta", {}))
    prior = get_prior(str(meta.get("prior", "lcpfn")))
    y = prior.sample(n_curves, torch.Generator().manual_seed(seed)).y
    before = model.bar.tail_scales
    left, right = fit_tail_scales(y, model.bar.borders)
    with torch.no_grad():
        model.bar.borders.copy_(with_tail_scales(model.bar.borders, left, right))
    after = model.bar.tail_scales  # as the stored (float32) borders give them
    record = {"left": after[0], "right": after[1],
              "before": list(before), "prior": prior.name, "curves": n_curves, "seed": seed,
              "source_sha256": cfg.get("sha256", "")}
    meta["tails"] = record
    return save_model(model, out_dir, meta), record
