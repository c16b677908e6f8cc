"""The FastAPI application: the routers over one `ChatService`, error handlers and middleware."""

from __future__ import annotations

from fastapi import FastAPI

from ..config import ServeSettings
from . import chat_routes, feedback_routes, openai_routes, ops_routes
from .guard import Guard
from .responses import install_error_handlers
from .service import Backend, ChatService


def build_api(backend: Backend, settings: ServeSettings) -> FastAPI:
    svc = ChatService(backend, settings)
    app = FastAPI(title="selflearn chat", version="1", docs_url="/docs", redoc_url=None)
    # This order is the order of the OpenAPI document's paths.
    for module in (ops_routes, chat_routes, openai_routes, feedback_routes):
        app.include_router(module.router(svc))
    install_error_handlers(app)
    if settings.dashboard_dir:
        from fastapi.staticfiles import StaticFiles

        app.mount("/dashboard", StaticFiles(directory=settings.dashboard_dir, html=True), name="dashboard")
    app.add_middleware(Guard, settings=settings, metrics=svc.metrics, api_key=svc.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["X-Model-Checkpoint", "Retry-After", "X-Response-Id"], max_age=600)
    return app
