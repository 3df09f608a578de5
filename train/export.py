"""Export a training checkpoint's model as shipped weights (safetensors + config + sha256)."""

from __future__ import annotations

from pathlib import Path

from pfn.io import save_model
from pfn.model import PFN
from prior import get_prior
from train.checkpoint import CKPT_NAME, load_checkpoint
from train.config import TrainConfig


def model_meta(cfg: TrainConfig, step: int, ema: bool) -> dict[str, object]:
    """What an exported model's config.json records about its training."""
    prior = get_prior(cfg.prior)
    return {"train_config": cfg.to_dict(), "ema": ema, "steps": step,
            "curves_seen": step * cfg.batch_size, "max_context": prior.n_epochs - 1,
            "prior": prior.name}


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
