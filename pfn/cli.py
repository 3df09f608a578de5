"""The `curvecast` command line. `train` and `serve` plug in by the `curvecast.cli` entry points."""

from __future__ import annotations

import csv
import io
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer

from pfn.errors import CurvecastError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Bayesian learning-curve extrapolation with a PFN.")

ModelOpt = Annotated[str | None, typer.Option("--model", "-m",
                                              help="shipped model name or model directory")]


def _fail(e: Exception, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(code)


def _read_input(src: str) -> str:
    return sys.stdin.read() if src == "-" else Path(src).read_text()


def _csv_to_request(text: str, horizon: float | None, direction: str) -> dict[str, Any]:
    """CSV rows `curve,epoch,value` (a header row is required) -> the JSON request form."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"epoch", "value"} <= set(rows[0]):
        raise CurvecastError("CSV: need a header with columns epoch,value (and optional curve)")
    if horizon is None:
        raise CurvecastError("CSV: pass --horizon (the runs' final epoch)")
    curves: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = curves.setdefault(r.get("curve", "0"), {"epochs": [], "values": [],
                                                   "horizon": horizon, "direction": direction})
        c["epochs"].append(float(r["epoch"]))
        c["values"].append(float(r["value"]) if r["value"] not in ("", "nan", "NaN")
                           else float("nan"))
    return {"curves": list(curves.values())}


@app.command()
def predict(
    src: Annotated[str, typer.Argument(help="JSON or CSV file, or - for stdin")] = "-",
    model: ModelOpt = None,
    horizon: Annotated[float | None, typer.Option(help="CSV input: the runs' horizon")] = None,
    direction: Annotated[str, typer.Option(help="CSV input: max or min")] = "max",
) -> None:
    """Posterior summaries for curves (the JSON schema of POST /v1/predict; see README)."""
    from pfn.predictor import Predictor
    from pfn.summary import predict_json

    try:
        text = _read_input(src)
        if src.endswith(".csv") or (src == "-" and not text.lstrip().startswith("{")):
            req = _csv_to_request(text, horizon, direction)
        else:
            req = json.loads(text)
        out = predict_json(Predictor.load(model), req)
    except (CurvecastError, OSError, json.JSONDecodeError) as e:
        raise _fail(e) from e
    typer.echo(json.dumps(out, indent=1))


@app.command()
def plot(
    src: Annotated[str, typer.Argument(help="JSON request file (as for predict), or -")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG path")] = Path("fan.png"),
    model: ModelOpt = None,
    points: Annotated[int, typer.Option(help="query epochs per curve")] = 60,
) -> None:
    """A fan chart (observed points, median, 50%/90% bands) for one or more curves."""
    import numpy as np

    from pfn.plot import fan_chart
    from pfn.predictor import Predictor
    from pfn.summary import curves_from_json

    try:
        curves = curves_from_json(json.loads(_read_input(src)))
        for c in curves:
            last = float(np.asarray(c.epochs, dtype=float)[-1])
            c.query_epochs = np.linspace(last, c.horizon, points)[1:] if last < c.horizon \
                else np.array([c.horizon])
        posts = Predictor.load(model).predict(curves)
        fan_chart(curves, posts, str(out))
    except (CurvecastError, OSError, json.JSONDecodeError) as e:
        raise _fail(e) from e
    typer.echo(f"wrote {out}")


@app.command("sample-prior")
def sample_prior(
    n: Annotated[int, typer.Option("--n", min=1, help="number of curves")],
    out: Annotated[Path, typer.Option("--out", help=".npz file (real_curves.npz format)")],
    prior: Annotated[str, typer.Option(help="lcpfn, domhan, or bases joined by '+'")] = "lcpfn",
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    chunk: Annotated[int, typer.Option(min=1, help="curves per sampling call")] = 100_000,
) -> None:
    """Sample prior curves into an .npz file in the format of real_curves.npz."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from prior import get_prior

    try:
        p = get_prior(prior)
    except ValueError as e:
        raise _fail(e) from e
    g = torch.Generator().manual_seed(seed)
    m = p.n_epochs
    ys, ys_clean, sig = [], [], []
    with tqdm(total=n, unit="curve", file=sys.stderr) as bar:
        for s in range(0, n, chunk):
            b = p.sample(min(chunk, n - s), g)
            ys.append(b.y.numpy())
            ys_clean.append(b.f.numpy())
            sig.append(b.sigma.numpy())
            bar.update(len(b))
    y = np.concatenate(ys)
    cfg = json.dumps({"prior": p.name, "seed": seed})
    np.savez_compressed(
        out, y=y, y_raw=y, y_clean=np.concatenate(ys_clean), sigma=np.concatenate(sig),
        x=np.broadcast_to(np.arange(1, m + 1, dtype=np.float32), y.shape).copy(),
        lengths=np.full(n, m, np.int32), source=np.full(n, "prior"),
        task=np.full(n, p.name), metric=np.full(n, "prior_value"),
        metric_direction=np.full(n, "max"), x_unit=np.full(n, "epoch"),
        config=np.full(n, cfg), budget=np.full(n, m, np.int32), complete=np.ones(n, bool),
        truncated_nonfinite=np.zeros(n, bool), norm_zero=np.zeros(n, np.float32),
        norm_one=np.ones(n, np.float32),
    )
    typer.echo(f"wrote {n} curves to {out}")


@app.command("eval")
def eval_command(
    model: ModelOpt = None,
    prior_curves: Annotated[int, typer.Option(help="prior curves per cutoff (0: skip)")] = 1000,
    curves: Annotated[list[Path] | None, typer.Option("--curves",
                      help="curve file(s) in the real_curves.npz format")] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter",
                       help="'all' and/or 'nonflat' (repeatable)")] = None,
    max_curves: Annotated[int | None, typer.Option(help="random subset per file")] = None,
    reference: Annotated[str | None, typer.Option(help="add a reference method: mcmc")] = None,
    reference_curves: Annotated[int, typer.Option(help="prior curves for the reference")] = 100,
    mcmc_settings: Annotated[str, typer.Option(
        help="MCMC settings: default (annealed, ~0.3 s/curve), paper (emcee-like MCMC-PP), "
             "gold (slow, careful), quick (a smoke test)")] = "default",
    seed: Annotated[int, typer.Option(help="seed for prior curves and subsets")] = 0,
    decay_sources: Annotated[str, typer.Option(
        help="comma-separated sources of the curve files whose runs decay their learning rate "
             "before the horizon: their curves are sent with lr_decay=true")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON rows")] = False,
) -> None:
    """Evaluate a model and the baselines on prior curves and on curve files."""
    from pfn import evaluate as ev
    from pfn.predictor import Predictor

    try:
        methods = {"pfn": ev.pfn_method(Predictor.load(model)), **ev.baselines()}
        rows: list[ev.Row] = []
        if prior_curves:
            rows += ev.evaluate_prior(methods, prior_curves, seed=seed)
        diags: list[dict[str, float]] = []
        if reference == "mcmc":
            ref_rows, diags = ev.evaluate_reference(methods["pfn"], reference_curves, seed=seed,
                                                      settings=mcmc_settings)
            rows += ref_rows
        elif reference is not None:
            raise CurvecastError(f"--reference: unknown {reference!r}; use mcmc")
        for path in curves or []:
            for f in filter_ or ["all"]:
                rows += ev.evaluate_file(methods, path, f, max_curves=max_curves, seed=seed,
                                         decay_sources=[s for s in decay_sources.split(",")
                                                        if s])
    except (CurvecastError, OSError) as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(json.dumps({**ev.rows_json(rows), "mcmc_diagnostics": diags}, indent=1))
        return
    typer.echo(ev.markdown_table(rows))
    if diags:
        ratio = [r for r in rows if r.source == "prior/mcmc-subset"]
        speed = {r.cutoff: r.ms_per_curve for r in ratio if r.method == "mcmc"}
        pfn_ms = {r.cutoff: r.ms_per_curve for r in ratio if r.method == "pfn"}
        typer.echo("\nMCMC vs PFN wall time per curve: " + ", ".join(
            f"cutoff {c}: {speed[c] / pfn_ms[c]:,.0f}x" for c in speed))
        typer.echo("MCMC diagnostics: " + json.dumps(diags))


def _load_plugins() -> None:
    for ep in entry_points(group="curvecast.cli"):
        try:
            register = ep.load()
        except ImportError as e:  # a plugin whose optional dependencies are missing
            typer.echo(f"warning: `curvecast {ep.name}` unavailable: {e}", err=True)
            continue
        register(app)


def main() -> None:
    _load_plugins()
    app()


if __name__ == "__main__":
    main()
