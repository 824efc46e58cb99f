"""The FastAPI application factory: routes under /v1, problem+json errors, the reaper alongside."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from service.api.problems import document_problems, install_problem_handlers
from service.api.routes import artifacts, catalog, dashboard, events, health, jobs, prometheus, teachers
from service.api.telemetry import HttpMetricsMiddleware, HttpStats
from service.config import Settings, get_settings
from service.db import get_engine
from service.dispatch import Reaper
from service.logs import clean_request_id, request_id
from service.ratelimit import limiter_for
from service.storage import store_from_settings

API_PREFIX = "/v1"


def install_request_ids(app: FastAPI) -> None:
    """Every request runs under an X-Request-ID (the client's, or a new one), echoed in the answer."""

    @app.middleware("http")
    async def request_ids(request: Request, call_next: Any) -> Any:
        rid = clean_request_id(request.headers.get("x-request-id"))
        token = request_id.set(rid)
        try:
            response = await call_next(request)
        finally:
            request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        return response


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for `settings` (default: from the environment); `uvicorn --factory` calls it bare."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_state_dirs()
        reaper = Reaper(get_engine(settings.database_url), settings) if settings.reaper_in_api else None
        if reaper is not None:
            reaper.start()
        app.state.reaper = reaper
        try:
            yield
        finally:
            if reaper is not None:
                reaper.stop()
                reaper.join(timeout=settings.reap_seconds + 2 * settings.broker_timeout_seconds)

    app = FastAPI(
        title="ITRD distillation service",
        version="0.1.0",
        description="Train teachers and distil students with ITRD (Miles et al., BMVC 2022) as jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store_from_settings(settings)
    app.state.submit_limiter = limiter_for(settings.broker_url, settings.submit_rate_per_minute)
    install_problem_handlers(app)
    document_problems(app)
    for router in (jobs.router, events.router, artifacts.router, teachers.router, catalog.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(prometheus.router)
    app.include_router(dashboard.router)
    install_request_ids(app)
    app.state.http_stats = HttpStats()
    app.add_middleware(HttpMetricsMiddleware, stats=app.state.http_stats)
    return app
