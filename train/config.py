"""Training configuration: a frozen dataclass saved inside every checkpoint.

Files (JSON or TOML) and ``--key=value`` overrides use the same dotted keys
(``lr=3e-4``, ``model.n_layers=4``); unknown keys are rejected with the list of known ones.
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from pfn.model import PFNConfig

# `curvecast refit-tails`: the prior curves a model's tails are fitted on, and their seed (none
# of the evaluations' seeds: the paper protocol draws with 0, training's held-out set with
# 10 000; training runs use small seeds from 0)
TAILS_CURVES = 500_000
TAILS_SEED = 99


@dataclass(frozen=True)
class TrainConfig:
    model: PFNConfig = field(default_factory=PFNConfig)  # the PFN's architecture
    prior: str = "lcpfn"  # prior name (prior.get_prior): lcpfn, lcpfn-slowstart, domhan or
    # bases joined by '+'
    eval_prior: str = ""  # prior of the held-out evaluations ("": the training prior)
    n_curves: int = 1_000_000  # training curves in total (all ranks); sets the step count
    batch_size: int = 128  # curves per optimizer step, summed over ranks
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.02  # final learning rate as a fraction of the peak (cosine decay)
    warmup_frac: float = 0.03  # share of steps with linear warm-up
    weight_decay: float = 0.01  # AdamW weight decay (matrices only)
    beta2: float = 0.98  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.0  # exponential moving average of the weights, exported (0: off)
    bf16: bool = False  # bfloat16 autocast (pays only on CPUs with AVX512-BF16/AMX or GPUs;
    # ~20x slower on this AVX2-only machine)
    compile: bool = False  # torch.compile the transformer body
    min_cutoff: int = 1  # smallest number of observed epochs drawn per curve
    cutoff_log_share: float = 0.0  # share of curves whose cutoff is drawn log-uniform (more
    # mass on the few-epoch regime early-stopping decisions live in) instead of uniform
    max_queries: int = 0  # query tokens kept per curve, drawn from its later epochs (0: all);
    # the loss is reweighted to stay an unbiased estimate of the all-queries loss
    per_curve_loss: bool = False  # every curve weighs the same in the loss (the mean over its
    # queries, as the paper protocol scores) instead of every query token (a curve cut early
    # has more queries, so token weighting favours early cutoffs)
    expected_targets: bool = False  # score each query by its expected loss over the prior's
    # noise around its noise-free value (closed form, BarDistribution.expected_nll) instead of
    # at one noisy draw: the same objective, with less gradient variance where the noise
    # spans several buckets (Rao-Blackwellisation); the held-out evaluations stay on draws
    query_groups: int = 8  # with max_queries: length-sorted micro-batches per step (less padding)
    border_curves: int = 10_000  # prior curves whose noisy values set the bucket borders
    seed: int = 0  # seeds borders, initialisation and every rank's prior stream (the held-out
    # curves are fixed); a warm-started run should not reuse its source's seed, or it re-sees
    # the source's first curves
    init_from: str = ""  # run directory (its checkpoint's EMA weights), model directory or
    # shipped name whose weights start the run with a fresh optimizer and schedule; parameters
    # it lacks keep their initialisation ("": none)
    trainable: str = ""  # comma-separated parameter-name prefixes (module names such as
    # "gauss" or "blocks.3") that train; every other parameter is frozen ("": all train)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads (0: torch's default)
    out_dir: str = "runs/default"  # checkpoint, metrics.jsonl and the exported model
    ckpt_every: int = 100  # steps between atomic checkpoints
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 500  # steps between held-out prior evaluations (0: never)
    eval_curves: int = 512  # held-out prior curves per evaluation

    def __post_init__(self) -> None:
        checks = {
            "n_curves": self.n_curves >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_frac": 0 <= self.warmup_frac < 1,
            "grad_clip": self.grad_clip > 0,
            "ema_decay": 0 <= self.ema_decay < 1,
            "min_cutoff": self.min_cutoff >= 0,
            "cutoff_log_share": 0 <= self.cutoff_log_share <= 1,
            "max_queries": self.max_queries >= 0,
            "query_groups": self.query_groups >= 1,
            "ckpt_every": self.ckpt_every >= 1,
            "log_every": self.log_every >= 1,
            "device": self.device in ("auto", "cpu", "cuda"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training config value(s) for {bad}: {self.to_dict()}")

    @property
    def total_steps(self) -> int:
        return max(1, self.n_curves // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return apply_overrides(cls(), _flatten(d))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Turn a string (CLI) or JSON value into the field's type."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}.get(tp, tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            v = tp(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}") from e
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{key}: expected int, got {value!r}")
        return v
    raise ValueError(f"{key}: cannot set a field of type {tp}")


def apply_overrides(cfg: Any, overrides: dict[str, Any], _prefix: str = "") -> Any:
    """Return cfg with dotted-key overrides applied; unknown keys raise ValueError."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    names = {f.name: f for f in fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            known = ", ".join(sorted(known_keys(cfg, _prefix)))
            raise ValueError(f"unknown config key {_prefix + key!r}; known keys: {known}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            if is_dataclass(getattr(cfg, head)):
                raise ValueError(f"{key}: is a section; set {key}.<field> instead")
            hints = typing.get_type_hints(type(cfg))
            flat[head] = _coerce(hints[head], value, _prefix + key)
    for head, sub in nested.items():
        inner = getattr(cfg, head)
        if not is_dataclass(inner):
            raise ValueError(f"{head}: is not a section; set {head}=<value>")
        flat[head] = apply_overrides(inner, sub, f"{_prefix}{head}.")
    return replace(cfg, **flat)


def known_keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out += known_keys(v, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- file (JSON/TOML) <- overrides."""
    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        text = p.read_text()
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        cfg = apply_overrides(cfg, _flatten(data))
    return apply_overrides(cfg, overrides or {})


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """['--lr=1e-3', '--model.n_layers', '4'] -> {'lr': '1e-3', 'model.n_layers': '4'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; overrides look like --key=value")
        key, eq, val = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{a}: missing value; write --{key}=VALUE")
            val = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = val
        i += 1
    return out
