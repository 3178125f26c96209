"""The one exception the routes turn into a 4xx/5xx answer: an HTTP status and a one-line reason; and the check of
the JSON embeddings that several routes take."""
from __future__ import annotations

import numpy as np

from ..errors import FeatxError


class ServiceError(FeatxError):
    """A request the service refuses: `status` (404 unknown head, 409 busy, 422 bad input, 503 not ready...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def embeddings_json(body: dict, width: int, expected: str) -> np.ndarray:
    """JSON {"embeddings": [[...], ...]} as float32 rows of `width` values; `expected` names whose width it is
    (e.g. "the head expects") in the 422 for another shape."""
    try:
        X = np.asarray(body["embeddings"], dtype=np.float32)
    except KeyError:
        raise ServiceError(422, 'JSON body: expected {"embeddings": [[...], ...]}') from None
    except (TypeError, ValueError):
        raise ServiceError(422, "embeddings: expected a list of equal-length lists of numbers") from None
    if X.ndim != 2 or X.shape[1] != width or len(X) == 0:
        raise ServiceError(422, f"embeddings of shape {X.shape}: {expected} (rows, {width})")
    if not np.isfinite(X).all():
        raise ServiceError(422, "embeddings: NaN or infinite values")
    return X
