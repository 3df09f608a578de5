"""Server settings: pydantic-settings with the ``CURVECAST_`` prefix, validated at start-up.

Every field can be set by environment variable (``CURVECAST_MAX_WAIT_US=500``) or by the
matching ``curvecast serve`` option (``--max-wait-us 500``); options win.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CURVECAST_"
RuntimeKind = Literal["auto", "onnx", "torch", "torch-triton"]

# Absolute ceilings, also written into the OpenAPI schema (protocol.py); settings may only
# lower them.
HARD_MAX_CURVES = 10_000
HARD_MAX_POINTS = 100_000
HARD_MAX_QUERY = 10_000

log = logging.getLogger("curvecast.serve")


class ServeSettings(BaseSettings):
    """Everything `curvecast serve` can be told; see docs/serving.md."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1,
                      description="bind address (0.0.0.0: all interfaces)")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port")
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes")
    model: str = Field(default="default", min_length=1,
                       description="shipped model name or model directory")
    early_stop_model: str = Field(
        default="stage4", min_length=1,
        description="model behind /v1/early-stop: shipped name or model directory, or "
        "'served' for the served model (default: stage4, pfn.io.DECISION_MODEL, whose "
        "rankings do best in the early-stopping replay)")
    model_name: str = Field(default="curvecast", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                            description="name the model is served under (/v2/models/{name})")
    runtime: RuntimeKind = Field(default="auto",
                                 description="auto: onnx on CPU, torch-triton on CUDA")
    quantize: bool = Field(default=False, description="onnx: int8 dynamic quantisation")
    threads: int = Field(default=0, ge=0, le=256,
                         description="intra-op threads; 0 = min(cores, 4)")
    spin: bool = Field(default=False,
                       description="onnxruntime thread spinning (off: the CPU is shared)")
    cache_dir: Path | None = Field(default=None,
                                   description="ONNX cache when the model dir is read-only; "
                                   "default $XDG_CACHE_HOME/curvecast")
    batching: bool = Field(default=True,
                           description="coalesce concurrent requests into one forward pass")
    max_batch_size: int = Field(default=256, ge=1, le=1_000_000,
                                description="most query rows (curves x query epochs) that "
                                "concurrent requests are coalesced into")
    max_wait_us: int = Field(default=1000, ge=0, le=10_000_000,
                             description="longest a request waits for others to join it (µs)")
    max_queue_size: int = Field(default=16_384, ge=1, le=10_000_000,
                                description="query rows waiting beyond this: 503 + Retry-After")
    max_curves_per_request: int = Field(default=1024, ge=1, le=HARD_MAX_CURVES)
    max_points_per_curve: int = Field(default=10_000, ge=1, le=HARD_MAX_POINTS)
    max_query_epochs: int = Field(default=1000, ge=1, le=HARD_MAX_QUERY,
                                  description="most query epochs per curve")
    max_rows_per_request: int = Field(default=16_384, ge=1, le=1_000_000,
                                      description="most query rows (curves x query epochs) per "
                                      "request; bounds the memory of one request")
    max_body_bytes: int = Field(default=16 * 2**20, ge=1024, le=2**30,
                                description="request body cap (bytes)")
    max_plot_curves: int = Field(default=16, ge=1, le=256,
                                 description="most curves in one fan chart")
    api_key: SecretStr | None = Field(default=None,
                                      description="require this key (Bearer or X-API-Key)")
    graceful_timeout_s: float = Field(default=25.0, gt=0, le=3600,
                                      description="SIGTERM: time to finish in-flight requests")
    retry_after_s: int = Field(default=1, ge=1, le=3600,
                               description="Retry-After of 503 answers (s)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(default=False,
                             description="uvicorn access log (costs throughput)")
    warmup: bool = Field(default=True,
                         description="run warm-up batches before reporting ready")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.max_queue_size < self.max_rows_per_request:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be >= max_rows_per_request "
                f"({self.max_rows_per_request}), or a full-size request could never be queued"
            )
        if self.api_key is not None and len(self.api_key.get_secret_value()) < 16:
            raise ValueError("api_key: use at least 16 characters (e.g. `openssl rand -hex 32`)")
        return self

    def early_stop_settings(self) -> ServeSettings | None:
        """These settings for the /v1/early-stop model; None when that is the served model."""
        if self.early_stop_model in ("served", self.model):
            return None
        return self.model_copy(update={"model": self.early_stop_model,
                                       "model_name": f"{self.model_name}-early-stop"[:64]})

    @property
    def n_threads(self) -> int:
        return self.threads or min(os.cpu_count() or 1, 4)

    @property
    def onnx_cache_dir(self) -> Path:
        from serve.export import default_cache_dir

        return self.cache_dir if self.cache_dir is not None else default_cache_dir()

    def to_env(self) -> dict[str, str]:
        """These settings as CURVECAST_* variables (how worker processes receive them)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) \
                else str(value)
        return env


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    """CURVECAST_* variables that are no server setting (typos; other tools' variables)."""
    env = os.environ if environ is None else environ
    known = {ENV_PREFIX + f.upper() for f in ServeSettings.model_fields}
    return sorted(k for k in env if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
