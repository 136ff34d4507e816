"""The HTTP face of one node (`pdbridge serve`): FastAPI routes over a NodeService.

Every node: `GET /health`, `GET /pd/info` (NodeInfo), `GET /metrics`.
Prefill: `POST /pd/prefill`, `/pd/prepare_permute`, `/pd/digest_reads`.
Decode: `POST /pd/decode` (newline-delimited TokenEvents).
Both: `POST /pd/generate`, and the OpenAI routes (`/v1/...`) over its own engine.
"""
from __future__ import annotations

from typing import AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import wire
from .metrics import ServeMetrics
from .node_service import BadRequest, NodeService
from .openai_api import metrics_route, mount
from .tokenizer import Tokenizer, TokenizerFiles
from .wire import Role

NDJSON = "application/x-ndjson"


def _error(status: int, message: str, field: str | None = None) -> Response:
    return Response(wire.encode(wire.ErrorBody(message, field)), status_code=status,
                    media_type="application/json")


async def _body(request: Request, kind: type):
    try:
        return wire.decode(await request.body(), kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"{kind.__name__}: {e}") from None


class LocalBackend:
    """The OpenAI front's Backend over this process's own engine (role both)."""

    def __init__(self, service: NodeService):
        info = service.info()
        self.service = service
        self.model, self.max_model_len = info.model, info.max_model_len
        self.vocab_size = info.vocab_size
        self.tokenizer = Tokenizer(TokenizerFiles(info.tokenizer_json, info.chat_template)) \
            if info.tokenizer_json else None

    async def stream(self, prompt_ids, sampling: wire.Sampling) -> AsyncIterator[wire.TokenEvent]:
        try:
            async for ev in self.service.generate(wire.GenerateRequest(prompt_ids, sampling)):
                yield ev
        except BadRequest as e:
            yield wire.TokenEvent(error=f"bad_request: {e}")


def build_app(service: NodeService) -> FastAPI:
    app = FastAPI(title=f"pdbridge {service.config.role.value} server", docs_url=None,
                  redoc_url=None)
    role = service.config.role
    metrics = ServeMetrics()

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return _error(400, str(e), str(e).split(":", 1)[0])

    @app.get("/health")
    async def health():
        broken = service.loop.broken
        if broken is not None:
            return JSONResponse({"status": "error", "error": str(broken)}, status_code=503)
        return {"status": "ok", "role": role.value}

    @app.get("/pd/info")
    async def info():
        return Response(wire.encode(service.info()), media_type="application/json")

    async def refresh():
        metrics.observe_load(service.engine_id, service.info().load)
    metrics_route(app, metrics, refresh)

    if role is Role.PREFILL:
        @app.post("/pd/prefill")
        async def prefill(request: Request):
            req = await _body(request, wire.PrefillRequest)
            with metrics.prefill_seconds.time():
                params = await service.prefill(req)
            return Response(wire.encode(params), media_type="application/json")

        @app.post("/pd/prepare_permute")
        async def prepare_permute(request: Request):
            out = await service.prepare_permute(await _body(request, wire.PermuteRequest))
            return Response(wire.encode(out), media_type="application/json")

        @app.post("/pd/digest_reads")
        async def digest_reads(request: Request):
            out = await service.digest_reads(await _body(request, wire.DigestRequest))
            return Response(wire.encode(out), media_type="application/json")

    if role is Role.DECODE:
        @app.post("/pd/decode")
        async def decode(request: Request):
            req = await _body(request, wire.TransferRequest)
            return await _ndjson(service.decode(req))

    if role is Role.BOTH:
        @app.post("/pd/generate")
        async def generate(request: Request):
            req = await _body(request, wire.GenerateRequest)
            return await _ndjson(service.generate(req))
        mount(app, LocalBackend(service), metrics)
    return app


async def _ndjson(events: AsyncIterator[wire.TokenEvent]) -> StreamingResponse:
    """The first event is awaited here, so a bad request is HTTP 400, not a 200 stream."""
    first = await events.__anext__()

    async def lines():
        try:
            yield wire.event_line(first)
            if first.finish_reason is None and first.error is None:
                async for ev in events:
                    yield wire.event_line(ev)
        finally:
            await events.aclose()
    return StreamingResponse(lines(), media_type=NDJSON)
