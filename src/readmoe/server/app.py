"""The FastAPI app: OpenAI routes, API-key check, health, metrics, OpenAI-shaped errors.

The key is checked by a plain ASGI middleware before anything reads the body, so a bad key
is a 401 whatever the body holds. /health and /metrics stay open (probes and scrapers carry
no key, as with vLLM). The engine loop starts and stops with the app's lifespan.
"""

from __future__ import annotations

import contextlib
import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from readmoe.serve.launch import ServedEngine
from readmoe.server.bridge import EngineLoop
from readmoe.server.config import ServerConfig
from readmoe.server.errors import SERVER, APIError, validation_error
from readmoe.server.metrics import ServerMetrics
from readmoe.server.routes import OpenAIRoutes

log = logging.getLogger("readmoe.server")


class APIKeyMiddleware:
    """401 for /v1 requests without ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str, metrics: ServerMetrics) -> None:
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(),
                                                                         self.key):
                message = ("incorrect API key provided" if header else
                           "missing API key: send the header 'Authorization: Bearer <key>'")
                self.metrics.rejected.labels("401").inc()
                error = APIError(401, message, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(served: ServedEngine, config: ServerConfig, model_name: str) -> FastAPI:
    """The app serving ``served.engine`` as ``model_name``; its engine loop (``app.state.loop``)
    runs while the app's lifespan does."""
    loop = EngineLoop(served.engine, config.max_queue, retry_after_s=config.retry_after_s)
    metrics = ServerMetrics(lambda: loop.state)
    loop.metrics = metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loop.start()
        yield
        loop.stop(timeout=config.grace_s + 5)

    app = FastAPI(title="readmoe", summary="OpenAI-compatible server for ReadME models",
                  lifespan=lifespan)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, key=config.api_key, metrics=metrics)

    def respond(error: APIError) -> JSONResponse:
        metrics.rejected.labels(str(error.status)).inc()
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail), code="http_error",
                                headers=exc.headers))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return respond(APIError(500, f"internal error ({type(exc).__name__}: {exc})",
                                kind=SERVER, code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not loop.alive:
            return JSONResponse({"status": "engine stopped", "failure": loop.failure}, 503)
        if loop.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok", "failure": loop.failure})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(OpenAIRoutes(loop, served, config, model_name).router)
    app.state.loop = loop
    return app
