"""The one exception the routes turn into a 4xx/5xx answer: an HTTP status and a one-line reason."""
from __future__ import annotations

from ..errors import FeatxError


class ServiceError(FeatxError):
    """A request the service refuses: `status` (404 unknown head, 409 busy, 422 bad input, 503 not ready...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
