"""`curvecast serve` and `curvecast export-onnx`; plugged into the root CLI by entry point.

Options override the ``CURVECAST_*`` environment; the merged settings are validated before
anything starts, the weights are verified (sha256) and the ONNX export is made or found once in
this process, then uvicorn starts the workers, which read the settings from the environment.
The API key is taken from ``CURVECAST_API_KEY`` only (command lines are visible to all users).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from serve.settings import ServeSettings, unknown_env_vars


def _settings(**overrides: Any) -> ServeSettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ServeSettings(**given)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                 for err in e.errors()]
        typer.echo("error: invalid server settings (options or CURVECAST_* variables):\n"
                   + "\n".join(lines), err=True)
        raise typer.Exit(2) from e


def _prepare_model(s: ServeSettings) -> None:
    """Verify the weights and make/find the ONNX export before any worker starts."""
    from pfn.errors import CurvecastError
    from pfn.io import load_model, resolve_model_dir
    from serve.export import ensure_onnx
    from serve.runtime import resolve_kind

    try:
        for name in dict.fromkeys([s.model, (s.early_stop_settings() or s).model]):  # once each
            model_dir = resolve_model_dir(name)
            model, cfg = load_model(model_dir)
            if resolve_kind(s.runtime) == "onnx":
                ensure_onnx(model, model_dir, str(cfg["sha256"]), s.onnx_cache_dir, s.quantize)
    except (CurvecastError, OSError) as e:
        typer.echo(f"error: refusing to start: {e}", err=True)
        raise typer.Exit(2) from e


def serve_command(
    host: Annotated[str | None, typer.Option(help="bind address [127.0.0.1]; 0.0.0.0 for all")
                    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [8000]")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes [1]")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m",
                                              help="shipped model name or model directory")
                     ] = None,
    model_name: Annotated[str | None, typer.Option(help="name served under [curvecast]")] = None,
    early_stop_model: Annotated[str | None, typer.Option(
        help="model behind /v1/early-stop: name, directory or 'served' [stage4]")] = None,
    runtime: Annotated[str | None, typer.Option(
        help="auto | onnx | torch | torch-triton [auto: onnx on CPU]")] = None,
    quantize: Annotated[bool | None, typer.Option(help="onnx int8 (see docs/serving.md)")
                        ] = None,
    threads: Annotated[int | None, typer.Option(help="intra-op threads [0: min(cores, 4)]")
                       ] = None,
    batching: Annotated[bool | None, typer.Option(help="coalesce concurrent requests [on]")
                        ] = None,
    max_batch_size: Annotated[int | None, typer.Option(
        help="query rows per coalesced forward pass [256]")] = None,
    max_wait_us: Annotated[int | None, typer.Option(
        help="longest wait for a batch to fill, µs [1000]")] = None,
    max_queue_size: Annotated[int | None, typer.Option(
        help="queued query rows before 503 [16384]")] = None,
    max_curves_per_request: Annotated[int | None, typer.Option(help="[1024]")] = None,
    max_points_per_curve: Annotated[int | None, typer.Option(help="[10000]")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="[16 MiB]")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="ONNX cache if the model dir is "
                                                   "read-only [~/.cache/curvecast]")] = None,
    log_level: Annotated[str | None, typer.Option(help="[info]")] = None,
    access_log: Annotated[bool | None, typer.Option(help="uvicorn access log [off]")] = None,
) -> None:
    """Serve the model over HTTP (see docs/serving.md; every option has a CURVECAST_ variable)."""
    s = _settings(host=host, port=port, workers=workers, model=model, model_name=model_name,
                  early_stop_model=early_stop_model, runtime=runtime, quantize=quantize,
                  threads=threads, batching=batching,
                  max_batch_size=max_batch_size, max_wait_us=max_wait_us,
                  max_queue_size=max_queue_size, max_curves_per_request=max_curves_per_request,
                  max_points_per_curve=max_points_per_curve, max_body_bytes=max_body_bytes,
                  cache_dir=cache_dir, log_level=log_level, access_log=access_log)
    for name in unknown_env_vars():
        typer.echo(f"warning: ignoring {name}: not a curvecast serve setting", err=True)
    _prepare_model(s)
    os.environ.update(s.to_env())  # the workers' create_app_from_env reads these
    import uvicorn

    uvicorn.run(
        "serve.app:create_app_from_env", factory=True, host=s.host, port=s.port,
        workers=s.workers, log_level=s.log_level, access_log=s.access_log,
        timeout_graceful_shutdown=int(s.graceful_timeout_s), proxy_headers=False,
        server_header=False,
    )


def export_onnx_command(
    model: Annotated[str, typer.Option("--model", "-m", help="shipped model name or directory")
                     ] = "default",
    out: Annotated[Path | None, typer.Option(help="write here instead of the cache")] = None,
    quantize: Annotated[bool, typer.Option(help="also write the int8 model")] = False,
) -> None:
    """Export a model to ONNX (cached next to its weights, keyed by their sha256); a model
    with a decay branch gets its second graph too (``--out F``: beside F as F.decay.onnx)."""
    from pfn.errors import CurvecastError
    from pfn.io import load_model, resolve_model_dir
    from serve.export import ensure_onnx, export_onnx, quantize_onnx

    paths = []
    try:
        model_dir = resolve_model_dir(model)
        m, cfg = load_model(model_dir)
        for decay in (False, True) if m.cfg.decay_input else (False,):
            if out is not None:
                dst = out.with_suffix(".decay.onnx") if decay else out
                path = export_onnx(m, dst, decay)
                if quantize:
                    path = quantize_onnx(path, dst.with_suffix(".int8.onnx"))
            else:
                path = ensure_onnx(m, model_dir, str(cfg["sha256"]),
                                   ServeSettings().onnx_cache_dir, quantized=quantize,
                                   decay=decay)
            paths.append(path)
    except (CurvecastError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo("\n".join(str(p) for p in paths))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("export-onnx")(export_onnx_command)


def main() -> None:
    """`python -m serve [serve|export-onnx] ...` (serve when no sub-command is given)."""
    app = typer.Typer(add_completion=False)
    register(app)
    args = sys.argv[1:]
    app(args=args if args[:1] in (["serve"], ["export-onnx"]) else ["serve", *args])
