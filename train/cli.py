"""`curvecast train`: plugs into the root CLI by entry point (see pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from train.config import TAILS_CURVES, TAILS_SEED, load_config, parse_cli_overrides

HELP = """Pretrain a PFN on prior curves sampled on the fly.

Overrides use dotted keys: --lr=3e-4 --model.n_layers=4 (unknown keys are rejected).
Re-running with the same config resumes from out_dir/checkpoint.safetensors.
Multi-process: torchrun --nproc_per_node=N -m train --config FILE.
"""


def train_command(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="JSON or TOML config file")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many more steps")] = None,
    export: Annotated[Path | None, typer.Option(help="export the model here when done")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    from train.loop import Trainer

    try:
        cfg = load_config(config, parse_cli_overrides(list(ctx.args)))
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    with Trainer(cfg) as tr:
        last = tr.run(max_steps=max_steps, progress=progress)
        if export is not None and tr.dist.main:
            digest = tr.export(export)
            typer.echo(f"exported {export} sha256={digest}")
    if tr.dist.main:
        typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in last.items()))


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="training out_dir holding the checkpoint")],
    out: Annotated[Path, typer.Argument(help="model directory to write")],
) -> None:
    """Export a run's latest checkpoint as a model directory (safetensors + config.json)."""
    from train.checkpoint import CKPT_NAME
    from train.export import export_checkpoint

    if not (run_dir / CKPT_NAME).is_file():
        typer.echo(f"error: run_dir: no {CKPT_NAME} in {run_dir}; pass a training run's out_dir",
                   err=True)
        raise typer.Exit(2)
    typer.echo(f"{out} sha256={export_checkpoint(run_dir, out)}")


def refit_tails_command(
    model: Annotated[str, typer.Argument(help="a shipped model's name or a model directory")],
    out: Annotated[Path, typer.Argument(help="model directory to write")],
    curves: Annotated[int, typer.Option(help="prior curves to fit the tails on")] = TAILS_CURVES,
    seed: Annotated[int, typer.Option(help="seed of those curves")] = TAILS_SEED,
) -> None:
    """Copy a model with its output distribution's tails refitted on its prior (pfn.bar)."""
    from train.export import refit_tails

    try:
        digest, rec = refit_tails(model, out, curves, seed)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"{out} sha256={digest} tails {rec['before'][0]:.4g}/{rec['before'][1]:.4g} -> "
               f"{rec['left']:.4g}/{rec['right']:.4g}")


def register(app: Any) -> None:
    app.command("export-run")(export_command)
    app.command("refit-tails")(refit_tails_command)
    app.command(
        "train",
        help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train_command)


def main() -> None:
    app = typer.Typer(add_completion=False)
    app.callback()(lambda: None)  # keep "train" a sub-command, as under `curvecast`
    register(app)
    args = sys.argv[1:]
    app(args=args if args[:1] in (["train"], ["export-run"], ["refit-tails"]) else ["train", *args])
