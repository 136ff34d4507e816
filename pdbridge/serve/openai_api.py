"""The OpenAI-compatible front: `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
streaming as server-sent events, OpenAI-style error bodies. Mounted by the router (over
prefill + decode servers) and by `pdbridge serve --role both` (over its own engine): both give
it a `Backend`, which turns token ids and sampling into a stream of TokenEvents.

Request fields are checked here, before anything reaches an engine; a bad one is HTTP 400
naming the field (`error.param`) and what is allowed.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import wire
from .metrics import ServeMetrics
from .tokenizer import TextStream, Tokenizer, TokenizerError

MAX_STOP_STRINGS = 16
MAX_PROMPTS = 64


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


# Node stream errors are "<kind>: <message>" (node_service._TokenStream.fail).
_ERROR_STATUS = {"bad_request": 400, "transfer_failed": 502, "engine_error": 500,
                 "refused": 500, "unavailable": 503}


def stream_error(text: str) -> ApiError:
    kind = text.split(":", 1)[0]
    status = _ERROR_STATUS.get(kind, 500)
    return ApiError(status, text, kind="invalid_request_error" if status == 400 else "server_error",
                    code=kind)


class Backend(Protocol):
    model: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer | None

    def stream(self, prompt_ids: tuple[int, ...], sampling: wire.Sampling
               ) -> AsyncIterator[wire.TokenEvent]: ...


@dataclass
class Job:
    """One prompt of a request, as parsed."""
    prompt_ids: tuple[int, ...]
    sampling: wire.Sampling
    stop: tuple[str, ...]


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


# ---- parsing ---------------------------------------------------------------------------------

def _int(body: dict, name: str, default, low: int | None = None, allow_none=False):
    v = body.get(name, default)
    if v is None and (allow_none or default is None):
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"want an integer, got {json.dumps(v)}")
    if low is not None and v < low:
        raise bad(name, f"must be >= {low}, got {v}")
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"want a number, got {json.dumps(v)}")
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"want true or false, got {json.dumps(v)}")
    return v


def parse_sampling(body: dict, max_tokens_default: int) -> tuple[wire.Sampling, tuple[str, ...]]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int({name: max_tokens}, name, max_tokens_default, low=1) \
        if max_tokens is not None else max_tokens_default
    temperature = _float(body, "temperature", 1.0)
    if not temperature >= 0:
        raise bad("temperature", f"must be >= 0, got {temperature}")
    top_p = _float(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {top_p}")
    top_k = _int(body, "top_k", 0, low=-1)
    seed = _int(body, "seed", None, allow_none=True)
    n = _int(body, "n", 1)
    if n != 1:
        raise bad("n", f"only n=1 is supported, got {n}")
    for name in ("logprobs", "top_logprobs", "best_of", "suffix"):
        if body.get(name) not in (None, False, 1 if name == "best_of" else None):
            raise bad(name, "is not supported")
    if body.get("echo"):
        raise bad("echo", "is not supported")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", "want a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    sampling = wire.Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=max(top_k, 0), seed=seed,
                             ignore_eos=_bool(body, "ignore_eos", False))
    try:
        sampling.params()               # every range check the engine makes, made now
    except ValueError as e:
        raise bad(str(e).split(" ", 1)[0], str(e)) from None
    return sampling, stops


def _is_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_prompts(body: dict, tokenizer: Tokenizer | None) -> list[tuple[int, ...]]:
    """`prompt` as text, token ids, or a list of either."""
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "missing (want text, a list of token ids, or a list of those)")
    if isinstance(p, str) or _is_ids(p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
        items = p
    else:
        raise bad("prompt", "want text, a list of token ids, or a non-empty list of those")
    if len(items) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(items)}")
    out = []
    for x in items:
        if isinstance(x, str):
            if tokenizer is None:
                raise bad("prompt", "the model has no tokenizer.json: send token ids")
            x = tokenizer.encode(x)
        if not x:
            raise bad("prompt", "empty")
        out.append(tuple(x))
    return out


def parse_messages(body: dict, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "want a non-empty list of {role, content}")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("messages", f"message {i}: want an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):       # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise bad("messages", f"message {i}: only text content is supported")
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(content, str):
            raise bad("messages", f"message {i}: want string content")
        clean.append({"role": m["role"], "content": content})
    if tokenizer is None:
        raise bad("messages", "the model has no tokenizer.json")
    try:
        text = tokenizer.apply_chat_template(clean)
    except TokenizerError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise bad("messages", "the chat template rendered an empty prompt")
    return ids


def check_model(body: dict, backend: Backend) -> None:
    m = body.get("model")
    if m is not None and m != backend.model:
        raise ApiError(400, f"model: {m!r} is not served here; available: {backend.model!r}",
                       "model", code="model_not_found")


def check_prompt(prompt_ids, sampling: wire.Sampling, backend: Backend) -> None:
    """Token ids in the vocabulary, prompt + max_tokens within the context."""
    bad_ids = [t for t in prompt_ids if not 0 <= t < backend.vocab_size]
    if bad_ids:
        raise bad("prompt", f"token ids {bad_ids[:5]} are outside the vocabulary "
                  f"[0, {backend.vocab_size})")
    n, limit = len(prompt_ids), backend.max_model_len
    if n >= limit:
        raise bad("prompt", f"{n} tokens; the model's context is {limit} tokens")
    if n + sampling.max_tokens > limit:
        raise bad("max_tokens", f"{n} prompt tokens + max_tokens {sampling.max_tokens} exceed "
                  f"the model's context of {limit} tokens")


# ---- running -------------------------------------------------------------------------------

_FINISH = {"length": "length", "eos": "stop", "stop_token": "stop"}


class Front:
    def __init__(self, backend: Backend, metrics: ServeMetrics):
        self.backend, self.metrics = backend, metrics

    async def run(self, job: Job) -> AsyncIterator[tuple[str, tuple[int, ...], str | None]]:
        """(text delta, new token ids, finish_reason or None) as the tokens arrive; ApiError
        if the backend fails."""
        m = self.metrics
        text = TextStream(self.backend.tokenizer, job.stop) if self.backend.tokenizer else None
        t0 = last = time.perf_counter()
        first = True
        events = self.backend.stream(job.prompt_ids, job.sampling)
        try:
            async for ev in events:
                if ev.transfer is not None:
                    m.observe_transfer(ev.transfer)
                    if ev.transfer.recomputed:
                        m.recomputed.inc()
                        m.failures.labels("transfer_recomputed").inc()
                if ev.error is not None:
                    err = stream_error(ev.error)
                    m.failures.labels(err.code or "error").inc()
                    raise err
                if ev.token_ids:
                    now = time.perf_counter()
                    (m.ttft if first else m.itl).observe(now - (t0 if first else last))
                    first, last = False, now
                    m.generated_tokens.inc(len(ev.token_ids))
                delta = text.add(ev.token_ids) if text is not None else ""
                if text is not None and text.stopped:
                    yield delta, ev.token_ids, "stop"
                    return
                if ev.finish_reason is not None:
                    if ev.finish_reason not in _FINISH:
                        m.failures.labels(ev.finish_reason).inc()
                        raise ApiError(500, f"the request ended with {ev.finish_reason!r} "
                                       "(NaN/Inf logits: bad weights or overflow)",
                                       kind="server_error", code=ev.finish_reason)
                    yield delta + (text.finish() if text is not None else ""), ev.token_ids, \
                        _FINISH[ev.finish_reason]
                    return
                yield delta, ev.token_ids, None
            raise ApiError(502, "the token stream ended without a finish reason",
                           kind="server_error", code="unavailable")
        finally:
            await events.aclose()           # a stop string: the backend frees the request

    async def collect(self, job: Job) -> Result:
        out = Result()
        async for delta, ids, finish in self.run(job):
            out.text += delta
            out.token_ids.extend(ids)
            out.finish_reason = finish or out.finish_reason
        return out


def _ids(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def mount(app: FastAPI, backend: Backend, metrics: ServeMetrics) -> None:
    """The /v1 routes on `app`."""
    front = Front(backend, metrics)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def guarded(handler, request: Request):
        metrics.in_flight.inc()
        try:
            return await handler(await body_of(request))
        except ApiError as e:
            metrics.requests.labels("bad_request" if e.status == 400 else "error").inc()
            return e.response()
        finally:
            metrics.in_flight.dec()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": backend.model, "object": "model", "created": int(time.time()),
            "owned_by": "pdbridge", "max_model_len": backend.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await guarded(_completions, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await guarded(_chat, request)

    async def _completions(body: dict):
        check_model(body, backend)
        prompts = parse_prompts(body, backend.tokenizer)
        sampling, stop = parse_sampling(body, 16)
        for p in prompts:
            check_prompt(p, sampling, backend)
        jobs = [Job(p, sampling, stop) for p in prompts]
        rid, created = _ids("cmpl"), int(time.time())
        if _bool(body, "stream", False):
            if len(jobs) != 1:
                raise bad("prompt", "streaming takes one prompt")
            return _sse(front, jobs[0], rid, created, backend.model, chat=False,
                        usage=_include_usage(body), metrics=metrics)
        results = await asyncio.gather(*(front.collect(j) for j in jobs))
        metrics.requests.labels("ok").inc()
        return {"id": rid, "object": "text_completion", "created": created,
                "model": backend.model,
                "choices": [{"index": i, "text": r.text, "token_ids": r.token_ids,
                             "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(results)],
                "usage": _usage(sum(len(j.prompt_ids) for j in jobs),
                                sum(len(r.token_ids) for r in results))}

    async def _chat(body: dict):
        check_model(body, backend)
        ids = parse_messages(body, backend.tokenizer)
        sampling, stop = parse_sampling(body, max(1, backend.max_model_len - len(ids)))
        check_prompt(ids, sampling, backend)
        job = Job(ids, sampling, stop)
        rid, created = _ids("chatcmpl"), int(time.time())
        if _bool(body, "stream", False):
            return _sse(front, job, rid, created, backend.model, chat=True,
                        usage=_include_usage(body), metrics=metrics)
        r = await front.collect(job)
        metrics.requests.labels("ok").inc()
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": backend.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "token_ids": r.token_ids, "logprobs": None,
                             "finish_reason": r.finish_reason}],
                "usage": _usage(len(ids), len(r.token_ids))}


def _include_usage(body: dict) -> bool:
    opts = body.get("stream_options") or {}
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _sse(front: Front, job: Job, rid: str, created: int, model: str, *, chat: bool,
         usage: bool, metrics: ServeMetrics) -> StreamingResponse:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, ids, finish, first=False) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "token_ids": list(ids), "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "token_ids": list(ids), "logprobs": None,
                      "finish_reason": finish}
        return _event({"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [choice]})

    async def events():
        n = 0
        first = True
        try:
            async for delta, ids, finish in front.run(job):
                n += len(ids)
                yield chunk(delta, ids, finish, first)
                first = False
            if usage:
                yield _event({"id": rid, "object": obj, "created": created, "model": model,
                              "choices": [], "usage": _usage(len(job.prompt_ids), n)})
            metrics.requests.labels("ok").inc()
        except ApiError as e:
            metrics.requests.labels("error").inc()
            yield _event(e.body())
        yield b"data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def metrics_route(app: FastAPI, metrics: ServeMetrics, refresh=None) -> None:
    @app.get("/metrics")
    async def render():
        if refresh is not None:
            await refresh()
        return Response(metrics.render(), media_type=metrics.content_type)
