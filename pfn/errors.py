"""One user-error hierarchy. Everything here is the caller's fault and is safe to show them.

The HTTP layer maps ``CurvecastError`` (a ``ValueError``) to 4xx; anything else is a bug (500).
"""

from __future__ import annotations


class CurvecastError(ValueError):
    """Base class of user errors: bad input, unknown model, corrupted weights."""

    status_code = 400  # HTTP status the server answers with


class CurveError(CurvecastError):
    """A curve of a request is invalid; names the curve index, the field and the fix."""

    status_code = 422

    def __init__(self, index: int | None, field: str, problem: str, fix: str) -> None:
        self.index = index
        self.field = field
        self.problem = problem
        self.fix = fix
        where = f"curves[{index}].{field}" if index is not None else field
        super().__init__(f"{where}: {problem}; {fix}")


class ModelNotFoundError(CurvecastError):
    status_code = 404


class WeightsIntegrityError(CurvecastError):
    """Weights whose sha256 does not match their config, or that do not fit the config."""

    status_code = 500
