"""The HTTP face of one node (`pdbridge serve`): FastAPI routes over a NodeService.

Every node: `GET /health`, `GET /pd/info` (NodeInfo), `GET /metrics`.
Prefill: `POST /pd/prefill` (TransferParams; announced: newline-delimited PrefillEvents),
`/pd/prepare_permute`, `/pd/digest_reads`.
Decode: `POST /pd/decode` (newline-delimited TokenEvents; an announced request's body goes on
with its PrefillComputed line).
Both: `POST /pd/generate`, and the OpenAI routes (`/v1/...`) over its own engine.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Callable

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
    return _decoded(await request.body(), kind)


def _decoded(body: bytes, kind: type):
    try:
        return wire.decode(body, kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise BadRequest(f"{kind.__name__}: {e}") from None


async def _lines(request: Request) -> AsyncIterator[bytes]:
    """The request body's newline-separated lines, each as soon as it is whole (the last
    one needs no newline)."""
    buf = b""
    async for chunk in request.stream():
        buf += chunk
        while (i := buf.find(b"\n")) >= 0:
            line, buf = buf[:i], buf[i + 1:]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


async def _word(service: NodeService, request_id: str, lines: AsyncIterator[bytes]) -> None:
    """An announced request's PrefillComputed line, handed to the service; a body that ends
    without one (the router left) or a malformed one is a failed prefill (failure policy)."""
    error = "the router's request ended before the word that the prefill was computed"
    try:
        line = await anext(lines, None)
        if line is not None:
            word = wire.decode(line, wire.PrefillComputed)
            if word.request_id == request_id:
                service.computed(word)
                return
            error = f"the word names request {word.request_id!r}, not {request_id!r}"
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        error = f"PrefillComputed: {e}"
    except Exception as e:          # the connection broke (ClientDisconnect)
        error = f"{error} ({type(e).__name__})"
    service.computed(wire.PrefillComputed(request_id, error))


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
            t0 = time.perf_counter()

            async def events():
                async for event in service.prefill(req):
                    if event.computed:
                        metrics.prefill_seconds.observe(time.perf_counter() - t0)
                    yield event
            if req.announce:
                return await _ndjson(events(), lambda e: e.computed or e.error is not None)
            async for last in events():
                pass
            if last.error is not None:
                return _error(503, f"the prefill failed: {last.error}")
            return Response(wire.encode(last.params), media_type="application/json")

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
            # One TransferRequest line; an announced one (computed False) is followed, on the
            # same request body, by the PrefillComputed line once the prefill ended, which
            # starts its transfer (read here while its answer waits for the first token).
            lines = _lines(request)
            req = _decoded(await anext(lines, b""), wire.TransferRequest)
            if not req.computed and req.params is not None:
                word_task = asyncio.create_task(_word(service, req.params.request_id, lines))
                request.state.word_task = word_task     # held while the request lives
            return await _ndjson(service.decode(req))

    if role is Role.BOTH:
        @app.post("/pd/generate")
        async def generate(request: Request):
            req = await _body(request, wire.GenerateRequest)
            return await _ndjson(service.generate(req))
        mount(app, LocalBackend(service), metrics)
    return app


def _token_ends(event: wire.TokenEvent) -> bool:
    return event.finish_reason is not None or event.error is not None


async def _ndjson(events: AsyncIterator, last: Callable[[Any], bool] = _token_ends
                  ) -> StreamingResponse:
    """The first event is awaited here, so a bad request is HTTP 400, not a 200 stream;
    `last(event)`: the stream ends with it."""
    first = await events.__anext__()

    async def lines():
        try:
            yield wire.event_line(first)
            if not last(first):
                async for ev in events:
                    yield wire.event_line(ev)
        finally:
            await events.aclose()
    return StreamingResponse(lines(), media_type=NDJSON)
