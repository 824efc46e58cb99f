"""The HTTP API: a FastAPI app (`create_app`) with routes by resource under /v1."""

from service.api.app import create_app

__all__ = ["create_app"]
