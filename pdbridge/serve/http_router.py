"""`pdbridge router`: the OpenAI-compatible endpoint over prefill and decode servers.

Per request: the least-loaded decode server is chosen first (the prefill engine must know
whose ranks will read), then the least-loaded prefill server computes the prompt's first N-1
tokens. It announces the request's TransferParams just before its last prefill step; they go
to the decode server at once with the prompt and sampling (it allocates, and its ranks plan
their reads, while that step computes), and the word that the prefill was computed follows
on the same request body (PrefillComputed); the decode server then pulls the state and
streams tokens back through here. With `announce=False` (`pdbridge router --no-announce`) the params go to the decode
server only once computed, in one call.

Every upstream call has a deadline: a dead, stopped or unreachable server is an error
response (HTTP 502/503 or an error event in a stream), never a hang.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

import httpx
import msgspec
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from . import wire
from .metrics import ServeMetrics
from .openai_api import metrics_route, mount
from .tokenizer import Tokenizer, TokenizerFiles
from .transfer_params import TransferParams
from .wire import Role


MAX_CONNECTIONS = 4096      # per upstream pool; httpx's default of 100 deadlocked at 200 requests


class RouterConfigError(ValueError):
    """The servers named do not make one deployment (roles, models)."""


@dataclass
class Upstream:
    url: str
    info: wire.NodeInfo
    in_flight: int = 0


class PDBackend:
    """The Backend of the OpenAI front over HTTP prefill + decode servers."""

    def __init__(self, prefill_urls: list[str], decode_urls: list[str], *,
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0,
                 announce: bool = True):
        if not prefill_urls or not decode_urls:
            raise RouterConfigError("--prefill and --decode each need at least one URL")
        self._urls = ([u.rstrip("/") for u in prefill_urls], [u.rstrip("/") for u in decode_urls])
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.announce = announce        # decode servers hear of a prefill before it ends
        self.client: httpx.AsyncClient | None = None
        self.prefills: list[Upstream] = []
        self.decodes: list[Upstream] = []
        self.model, self.max_model_len, self.vocab_size, self.tokenizer = "", 0, 0, None

    async def start(self, wait_s: float = 600.0) -> None:
        """Fetch every server's NodeInfo (waiting up to wait_s for servers still starting);
        refuse servers of the wrong role or of another model."""
        # Two pools: a request holds a prefill connection while it waits for blocks that
        # only its predecessors' decode calls free, so decode calls never queue behind it.
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
        self.decode_client = httpx.AsyncClient(timeout=self._timeout, limits=limits)
        deadline = time.monotonic() + wait_s
        pre, dec = self._urls
        infos = await asyncio.gather(*(self._wait_info(u, deadline) for u in pre + dec))
        self.prefills = [Upstream(u, i) for u, i in zip(pre, infos[:len(pre)])]
        self.decodes = [Upstream(u, i) for u, i in zip(dec, infos[len(pre):])]
        for want, ups in ((Role.PREFILL, self.prefills), (Role.DECODE, self.decodes)):
            for up in ups:
                if up.info.role is not want:
                    raise RouterConfigError(f"--{want.value} {up.url}: that server's role is "
                                            f"{up.info.role.value!r}, not {want.value!r}")
        models = {up.info.model for up in self.prefills + self.decodes}
        if len(models) != 1:
            raise RouterConfigError("the servers serve different models: " + ", ".join(
                f"{up.url}={up.info.model}" for up in self.prefills + self.decodes))
        toks = {up.info.tokenizer_json for up in self.prefills + self.decodes}
        if len(toks) != 1:
            raise RouterConfigError("the servers' tokenizers differ (tokenizer.json)")
        first = self.prefills[0].info
        self.model = first.model
        self.max_model_len = min(up.info.max_model_len for up in self.prefills + self.decodes)
        self.vocab_size = first.vocab_size
        self.tokenizer = Tokenizer(TokenizerFiles(first.tokenizer_json, first.chat_template)) \
            if first.tokenizer_json else None

    async def _wait_info(self, url: str, deadline: float) -> wire.NodeInfo:
        while True:
            try:
                r = await self.client.get(url + "/pd/info")
                if r.status_code == 200:
                    return wire.decode(r.content, wire.NodeInfo)
                error = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise RouterConfigError(f"{url}: not a pdbridge server ({e})") from None
            if time.monotonic() > deadline:
                raise RouterConfigError(f"{url}: no answer from /pd/info ({error})")
            await asyncio.sleep(0.25)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            await self.decode_client.aclose()

    async def loads(self) -> dict[str, wire.NodeLoad]:
        """Each reachable server's load, for /metrics and /health."""
        async def one(up: Upstream):
            try:
                r = await self.client.get(up.url + "/pd/info", timeout=2.0)
                up.info = wire.decode(r.content, wire.NodeInfo)
                return up.url, up.info
            except (httpx.HTTPError, msgspec.ValidationError, msgspec.DecodeError):
                return up.url, None
        out = await asyncio.gather(*(one(u) for u in self.prefills + self.decodes))
        return dict(out)

    @staticmethod
    def _least_loaded(ups: list[Upstream]) -> Upstream:
        return min(ups, key=lambda u: u.in_flight)

    async def stream(self, prompt_ids: tuple[int, ...], sampling: wire.Sampling
                     ) -> AsyncIterator[wire.TokenEvent]:
        dec = self._least_loaded(self.decodes)
        dec.in_flight += 1
        try:
            if len(prompt_ids) < 2:     # nothing to prefill: the decode server computes it
                events = self._decode(dec, wire.encode(wire.TransferRequest(prompt_ids, sampling)))
            else:
                events = self._disaggregated(prompt_ids, sampling, dec)
            async for ev in events:
                yield ev
        finally:
            dec.in_flight -= 1

    async def _disaggregated(self, prompt_ids, sampling: wire.Sampling, dec: Upstream
                             ) -> AsyncIterator[wire.TokenEvent]:
        """The prefill server's events go on to the decode server: announced params at once
        (TransferRequest.computed False), then, on the same request body, the word that they
        were computed (or why not: the decode server's failure policy takes it);
        unannounced params once computed. The decode server's tokens come back through
        here."""
        pre = self._least_loaded(self.prefills)
        pre.in_flight += 1
        events = self._prefill(pre, prompt_ids, dec)
        try:
            first = await anext(events)
            if first.error is not None:
                yield wire.TokenEvent(error=first.error)
                return
            req = wire.TransferRequest(prompt_ids, sampling, first.params, pre.url,
                                       computed=first.computed)
            if first.computed:
                pre.in_flight -= 1
                pre = None
                body = wire.encode(req)
            else:
                async def body():
                    nonlocal pre
                    yield wire.event_line(req)
                    last = await anext(events, None)
                    pre.in_flight -= 1
                    pre = None
                    error = "unavailable: the prefill server ended its answer early" \
                        if last is None else last.error if not last.computed else None
                    yield wire.event_line(wire.PrefillComputed(first.params.request_id, error))
            async for ev in self._decode(dec, body if first.computed else body()):
                yield ev
        finally:
            await events.aclose()
            if pre is not None:
                pre.in_flight -= 1

    async def _prefill(self, pre: Upstream, prompt_ids, dec: Upstream
                       ) -> AsyncIterator[wire.PrefillEvent]:
        """The prefill server's PrefillEvents (announced, then computed; unannounced: the
        computed one alone); a failure is an error event, the last."""
        body = wire.encode(wire.PrefillRequest(prompt_ids, dec.info.engine_id, dec.info.tp_size,
                                               announce=self.announce))
        if self.announce:
            async with aclosing(_events(self.client, "prefill", pre.url, "/pd/prefill", body,
                                        wire.PrefillEvent, lambda e: e.computed)) as events:
                async for ev in events:
                    yield ev
            return
        try:
            r = await self.client.post(pre.url + "/pd/prefill", content=body,
                                       headers={"content-type": "application/json"})
        except httpx.HTTPError as e:
            yield wire.PrefillEvent(error=f"unavailable: prefill server {pre.url}: "
                                          f"{type(e).__name__}: {e}")
            return
        if r.status_code != 200:
            yield wire.PrefillEvent(error=_upstream_error("prefill", pre.url, r))
        else:
            yield wire.PrefillEvent(wire.decode(r.content, TransferParams), computed=True)

    async def _decode(self, dec: Upstream, body) -> AsyncIterator[wire.TokenEvent]:
        """The decode server's TokenEvents; `body`: bytes, or an async iterator of them (an
        announced request's lines, the second sent once its prefill ended)."""
        async with aclosing(_events(self.decode_client, "decode", dec.url, "/pd/decode", body,
                                    wire.TokenEvent, lambda e: e.finish_reason is not None)
                            ) as events:
            async for ev in events:     # closed with this one: a client that leaves ends it
                yield ev


async def _events(client: httpx.AsyncClient, role: str, base: str, path: str, body, kind,
                  last) -> AsyncIterator:
    """An upstream's newline-delimited `kind` events up to the one that is `last` or an
    error; a failure (HTTP status, connection, an answer that ends early) is an error event
    of `kind`, the last."""
    try:
        async with client.stream("POST", base + path, content=body,
                                 headers={"content-type": "application/json"}) as r:
            if r.status_code != 200:
                await r.aread()
                yield kind(error=_upstream_error(role, base, r))
                return
            async for line in r.aiter_lines():
                if line:
                    ev = wire.decode(line.encode(), kind)
                    yield ev
                    if last(ev) or ev.error is not None:
                        return
        yield kind(error=f"unavailable: {role} server {base} ended its answer early")
    except httpx.HTTPError as e:
        yield kind(error=f"unavailable: {role} server {base}: {type(e).__name__}: {e}")


def _upstream_error(role: str, url: str, r: httpx.Response) -> str:
    try:
        detail = wire.decode(r.content, wire.ErrorBody).error
    except (msgspec.ValidationError, msgspec.DecodeError):
        detail = r.text[:300]
    kind = "bad_request" if r.status_code == 400 else "unavailable"
    return f"{kind}: {role} server {url}: HTTP {r.status_code}: {detail}"


def build_router_app(backend: PDBackend) -> FastAPI:
    """The router's app; `backend.start()` must have run (the CLI awaits it first)."""
    app = FastAPI(title="pdbridge router", docs_url=None, redoc_url=None)
    metrics = ServeMetrics()

    @app.get("/health")
    async def health():
        loads = await backend.loads()
        down = [u for u, info in loads.items() if info is None or not info.healthy]
        body = {"status": "ok" if not down else "degraded", "down": down,
                "prefill": [u.url for u in backend.prefills],
                "decode": [u.url for u in backend.decodes]}
        return JSONResponse(body, status_code=200 if not down else 503)

    async def refresh():
        for url, info in (await backend.loads()).items():
            if info is not None:
                metrics.observe_load(url, info.load)
    metrics_route(app, metrics, refresh)
    mount(app, backend, metrics)
    return app
