"""Training checkpoints without pickle: one safetensors file, JSON metadata in its header.

Holds the model, AdamW's state, every rank's prior-RNG state, the torch RNG state, the config
and the step. Written to a temporary file and ``os.replace``-d, so a kill at any moment leaves
either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CKPT_NAME = "checkpoint.safetensors"


def _flatten_optim(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{pid}.{k}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optim(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: Path,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    rng_states: list[torch.Tensor],
    meta: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    for k, v in (ema_state or {}).items():
        tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    opt, groups = _flatten_optim(optim_state)
    tensors.update(opt)
    for r, s in enumerate(rng_states):
        tensors[f"rng.prior.{r}"] = s.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    header = {"meta": json.dumps(meta), "param_groups": json.dumps(groups)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata (config, step, world) without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return dict(json.loads((f.metadata() or {})["meta"]))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """{'model': state, 'ema': averaged parameters (may be empty), 'optim': state,
    'rng_prior': [...], 'rng_torch': t, 'meta': dict}."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    rng = sorted(
        ((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.prior.")),
    )
    return {
        "model": model,
        "ema": ema,
        "optim": _unflatten_optim(optim, json.loads(header["param_groups"])),
        "rng_prior": [v for _, v in rng],
        "rng_torch": tensors["rng.torch"],
        "meta": json.loads(header["meta"]),
    }
