"""Model weights as data: ``model.safetensors`` + ``config.json`` (with the file's sha256).

No pickle anywhere: the config is JSON, tensors are safetensors, and loading verifies the
sha256 before touching the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pfn.errors import ModelNotFoundError, WeightsIntegrityError
from pfn.model import PFN, PFNConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "default"  # predictions: the best posteriors (grow4, docs/model-card.md)
# Early-stopping decisions (pfn.early_stop, pfn.hpo, the server's /v1/early-stop): stage 4, the
# model whose rankings do best in the replay on real curves (docs/early-stopping.md).
DECISION_MODEL = "stage4"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_from_dict(d: dict[str, Any]) -> PFNConfig:
    known = {f.name for f in fields(PFNConfig)}
    unknown = set(d) - known
    if unknown:
        raise WeightsIntegrityError(f"config.json: unknown model keys {sorted(unknown)}")
    return PFNConfig(**d)


def save_model(model: PFN, out_dir: str | Path, meta: dict[str, Any] | None = None) -> str:
    """Write weights + config (+ sha256); returns the sha256 of the weights file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_FILE}.")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be readable
        os.replace(tmp, out / WEIGHTS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    digest = sha256_file(out / WEIGHTS_FILE)
    cfg = {"model": model.cfg.to_dict(), "sha256": digest, "meta": meta or {}}
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(cfg, indent=2) + "\n").encode())
    return digest


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """A shipped model by name (``default``, ...) or a directory holding the two files."""
    key = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    p = Path(key)
    if (p / CONFIG_FILE).is_file():
        return p
    shipped = WEIGHTS_DIR / key
    if (shipped / CONFIG_FILE).is_file():
        return shipped
    names = sorted(d.name for d in WEIGHTS_DIR.iterdir() if (d / CONFIG_FILE).is_file())
    raise ModelNotFoundError(
        f"model: {key!r} is neither a shipped model ({', '.join(names)}) nor a directory with "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}; pass one of those"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((model_dir / CONFIG_FILE).read_text()))


def load_model(name_or_path: str | Path | None = None) -> tuple[PFN, dict[str, Any]]:
    """Load and verify a model; returns (model in eval mode, config.json contents)."""
    d = resolve_model_dir(name_or_path)
    cfg = read_config(d)
    digest = sha256_file(d / WEIGHTS_FILE)
    if digest != cfg.get("sha256"):
        raise WeightsIntegrityError(
            f"{d / WEIGHTS_FILE}: sha256 {digest} does not match config.json's "
            f"{cfg.get('sha256')}; the weights are corrupted or belong to another model — "
            "re-download or re-export them"
        )
    model_cfg = config_from_dict(cfg["model"])
    state = load_file(str(d / WEIGHTS_FILE))
    model = PFN(model_cfg, state["bar.borders"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsIntegrityError(f"{d / WEIGHTS_FILE}: does not fit config.json: {e}") from e
    model.eval()
    return model, cfg


__all__ = [
    "CONFIG_FILE",
    "DECISION_MODEL",
    "DEFAULT_MODEL",
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "atomic_write_bytes",
    "load_model",
    "save_model",
    "sha256_file",
]
