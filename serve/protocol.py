"""The HTTP API's request and response schemas (pydantic; ``extra="forbid"``, bounded).

``/v1/predict`` carries the JSON format of ``pfn.summary`` (shared with `curvecast predict`);
the bounds here are absolute ceilings written into the OpenAPI spec, and the server's settings
(``max_curves_per_request``, ...) may lower them. ``/v2/...`` follows the Open Inference
Protocol v2 (KServe / Triton) on the raw model tensors.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from serve.settings import HARD_MAX_CURVES, HARD_MAX_POINTS, HARD_MAX_QUERY

MAX_ABS = 1e12  # = pfn.summary.MAX_ABS_VALUE (not imported: this module must stay torch-free)
DEFAULT_QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]  # = pfn.summary.DEFAULT_QUANTILES

Number = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS, le=MAX_ABS)]
Epoch = Annotated[float, Field(allow_inf_nan=False, gt=0, le=1e9)]
Quantile = Annotated[float, Field(allow_inf_nan=False, gt=0, lt=1)]


def _value(v: float) -> float:
    if not (math.isnan(v) or abs(v) <= MAX_ABS):
        raise ValueError(f"must be finite with |x| <= {MAX_ABS:g}, got {v}; null (or NaN) marks "
                         "a missing observation")
    return v


# An observed value; null (or NaN) marks a missing observation, dropped with its epoch.
Value = Annotated[float, AfterValidator(_value)] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurveBase(_Strict):
    """One partial learning curve."""

    epochs: list[Epoch] = Field(min_length=1, max_length=HARD_MAX_POINTS,
                                description="observed epochs: positive, strictly increasing, "
                                "<= horizon")
    values: list[Value] = Field(min_length=1, max_length=HARD_MAX_POINTS,
                                description="one value per epoch (null: missing)")
    horizon: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1e9)] = Field(
        description="the run's final epoch (its budget)")
    query_epochs: list[Epoch] | None = Field(default=None, min_length=1,
                                             max_length=HARD_MAX_QUERY,
                                             description="epochs to predict; default [horizon]")
    direction: Literal["max", "min"] = Field(default="max",
                                             description="max: accuracy; min: loss")
    bounds: tuple[Number | None, Number | None] | None = Field(
        default=None, description="[lo, hi] range of the metric; null sides are estimated")
    lr_decay: bool = Field(default=False, description="the run's learning rate decays before "
                           "the horizon (a schedule tied to the budget: cosine, linear, step); "
                           "false: constant or unknown")


class CurveIn(CurveBase):
    """One partial learning curve and what to report about it."""

    quantiles: list[Quantile] | None = Field(default=None, max_length=99,
                                             description="replace the request's quantiles")
    thresholds: list[Number] | None = Field(default=None, max_length=64,
                                            description="report P(value > t) for each t")
    density_at: list[Number] | None = Field(default=None, max_length=64,
                                            description="report CDF and log-density at each v")


class PredictRequest(_Strict):
    curves: list[CurveIn] = Field(min_length=1, max_length=HARD_MAX_CURVES)
    quantiles: list[Quantile] = Field(default_factory=lambda: list(DEFAULT_QUANTILES),
                                      max_length=99)


class CurvePrediction(BaseModel):
    """Per query epoch; dict keys are repr(float) of the requested numbers ("0.05")."""

    query_epochs: list[float]
    mean: list[float]
    std: list[float]
    quantiles: dict[str, list[float]]
    prob_greater: dict[str, list[float]]
    cdf: dict[str, list[float]]
    log_density: dict[str, list[float | None]] = Field(
        description="null where the density underflows (log p = -inf)")


class ModelRef(BaseModel):
    name: str
    sha256: str
    runtime: str


class PredictResponse(BaseModel):
    predictions: list[CurvePrediction]
    model: ModelRef


# --- early stopping ------------------------------------------------------------------------


class StopRuleIn(_Strict):
    """See pfn.early_stop: stop when P(improve) <= delta at every remaining epoch
    ("all_epochs"), at the horizon ("final_epoch"), or when the expected final improvement per
    remaining epoch is <= min_gain_per_epoch ("expected_improvement")."""

    kind: Literal["all_epochs", "final_epoch", "expected_improvement"] = "all_epochs"
    delta: Annotated[float, Field(allow_inf_nan=False, ge=0, lt=1)] = Field(
        default=0.05, description="stop when P(improve) <= delta")
    min_epochs: int = Field(default=2, ge=1, le=1_000_000,
                            description="never stop before this many")
    min_gain_per_epoch: Annotated[float, Field(allow_inf_nan=False, ge=0, le=MAX_ABS)] | None \
        = Field(default=None, description="expected_improvement only: metric units per epoch")
    min_delta: Annotated[float, Field(allow_inf_nan=False, ge=0, le=MAX_ABS)] = Field(
        default=0.0, description="improvements smaller than this (metric units) do not count")


class EarlyStopRequest(_Strict):
    curves: list[CurveBase] = Field(min_length=1, max_length=HARD_MAX_CURVES)
    incumbents: list[Number | None] = Field(
        min_length=1, max_length=HARD_MAX_CURVES,
        description="best value seen so far in the study, one per curve (null: none yet)")
    rule: StopRuleIn = Field(default_factory=lambda: StopRuleIn())
    quantiles: list[Quantile] = Field(default_factory=lambda: [0.05, 0.5, 0.95], max_length=99)


class DecisionOut(BaseModel):
    stop: bool
    prob_improve: float
    prob_improve_final: float
    final_mean: float
    final_quantiles: dict[str, float]
    expected_remaining_epochs: float
    expected_improvement: float | None
    reason: str


class EarlyStopResponse(BaseModel):
    decisions: list[DecisionOut]
    model: ModelRef


# --- models, health, errors --------------------------------------------------------------------


class ModelCard(BaseModel):
    name: str
    sha256: str
    config: dict[str, Any]
    runtime: dict[str, Any]
    ready: bool
    routes: list[str] = Field(description="the routes this model answers")


class ModelsResponse(BaseModel):
    models: list[ModelCard]


class Health(BaseModel):
    status: str
    detail: str | None = None


class ErrorDetail(BaseModel):
    type: str = Field(description="error class, e.g. CurveError, ValidationError, QueueFull")
    message: str = Field(description="what is wrong and how to fix it")
    field: str | None = Field(default=None,
                              description="the offending field, e.g. curves[3].epochs")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- Open Inference Protocol v2 ------------------------------------------------------------


class InferInput(_Strict):
    name: Literal["t_ctx", "y_ctx", "ctx_mask", "t_qry"]
    shape: list[Annotated[int, Field(ge=0, le=1 << 20)]] = Field(min_length=2, max_length=2)
    datatype: Literal["FP32", "BOOL"]
    data: list[float | bool] = Field(max_length=1 << 22, description="row-major, flat")
    parameters: dict[str, Any] | None = None


class InferOutputRequest(_Strict):
    name: Literal["logits"]
    parameters: dict[str, Any] | None = None


class InferRequest(_Strict):
    id: str | None = Field(default=None, max_length=256)
    inputs: list[InferInput] = Field(min_length=4, max_length=4)
    outputs: list[InferOutputRequest] | None = Field(default=None, max_length=1)
    parameters: dict[str, Any] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferOutput]


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
