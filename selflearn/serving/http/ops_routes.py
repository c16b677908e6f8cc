"""Routes for operators and probes: /healthz, /readyz, /status, /metrics, and /api/rounds (the
one-machine driver's run state, when `settings.state_file` names it)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .responses import ApiError
from .service import ChatService


def router(svc: ChatService) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz")
    async def healthz():
        return {"ok": True}

    @r.get("/readyz")
    async def readyz():
        try:
            weights = (await svc.status(max_age=0.5)).weights
        except Exception as err:  # the model deployment is down or not reachable
            return JSONResponse({"ready": False, "reason": f"model unavailable: {type(err).__name__}"}, 503)
        body = {"ready": weights.ready, "checkpoint": weights.checkpoint, "degraded": weights.degraded,
                "degraded_reason": weights.degraded_reason, "loading": weights.loading}
        headers = {"X-Model-Checkpoint": weights.checkpoint} if weights.checkpoint else None
        return JSONResponse(body, 200 if weights.ready else 503, headers=headers)

    @r.get("/status")
    async def status():
        st = await svc.status(max_age=0)
        return JSONResponse({"model": st.to_json(),
                             "ingress": {"inflight": svc.inflight, "feedback_uri": svc.feedback.uri}},
                            headers={"X-Model-Checkpoint": st.weights.checkpoint or ""})

    @r.get("/metrics")
    async def metrics():
        try:
            await svc.status(max_age=0)
        except Exception:  # the model's figures go blank; the ingress's own still count
            svc.metrics.engine.status = None
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if svc.settings.state_file:
        _rounds_route(r, svc.settings.state_file)
    return r


def _rounds_route(r: APIRouter, state_file: str) -> None:
    @r.get("/api/rounds")
    async def rounds():
        try:
            doc = await asyncio.to_thread(lambda: json.loads(open(state_file).read()))
        except FileNotFoundError:
            raise ApiError(404, "no run state yet", code="not_found") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ApiError(503, f"run state unreadable: {err}", "server_error") from None
        return JSONResponse(doc)
