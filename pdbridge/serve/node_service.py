"""NodeService: one engine in a server process, as the HTTP handlers see it.

It owns the node (PrefillNode, DecodeNode or a plain Engine for role `both`) and the
EngineLoop thread that alone touches it, and closes both in `close`. Its async methods are
what the routes of node_app call; each hands work to the loop thread and awaits the answer.

Requests join the running batch: a prefill request is queued (`PrefillNode.submit`) and
answered once its tokens are computed; a decode request gets its blocks (or waits in the
backlog for them), pulls its state, and then streams tokens from every later step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import httpx

from pdbridge.engine.llm_engine import Engine, EngineError, EngineFull, RequestHandle, StepOutput
from pdbridge.engine.pd_calls import PullResult
from pdbridge.engine.scheduler import RequestTooLarge
from pdbridge.plan import Strategy
from pdbridge.spec import CacheConfig

from . import wire
from .decode_node import (DecodeNode, OnFailure, PrepareFailed, PullFailed, PullJob,
                          StartedPull, TransferRefused, FirstPull)
from .engine_loop import EngineLoop
from .prefill_node import PrefillNode
from .tokenizer import read_files
from .transfer_params import TransferParams
from .wire import Role


log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "pdbridge-tiny"     # the embedded default model's id
MAX_EARLY_NEWS = 1024   # decode: words of computed prefills kept for requests not yet allocated


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400): too long, token ids outside the vocabulary."""


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of a node server, made once at the edge (the CLI)."""
    role: Role
    model_dir: str | None
    tp_size: int = 1
    cache: CacheConfig = CacheConfig(num_blocks=256)
    model_name: str | None = None           # None: the model directory's name
    device: str = "cpu"
    transport: str = "nixl"
    strategy: str = "auto"
    on_failure: OnFailure = OnFailure.RECOMPUTE
    lease_s: float = 30.0
    timeout_s: float = 60.0                 # engine collectives
    pull_timeout_s: float = 30.0            # one pull (handshake and reads)
    checksums: bool = False
    pull_batch: int = 16                    # decode: most queued requests in one pull round trip
    side_channel_host: str = "127.0.0.1"    # prefill: where decode ranks reach its ranks
    cpus: tuple[int, ...] | None = None     # the CPUs the ranks split (cpu_affinity); None: any
    probe_every: int = 0                    # decode: every k-th pull first times a bare read
                                            # (DecodeNode.probe_every, bench serve); 0: never
    prefill_wait_s: float = 300.0           # decode: an announced request's longest wait for
                                            # the word that its prefill was computed


class NodeService:
    def __init__(self, config: NodeConfig):
        from pdbridge.engine.model_loader import default_model_dir
        self.config = config
        self.model_dir = config.model_dir or str(default_model_dir())
        self.model_name = config.model_name or (
            os.path.basename(os.path.normpath(self.model_dir)) if config.model_dir
            else DEFAULT_MODEL_NAME)
        files = read_files(self.model_dir)
        self._tokenizer_json = files.tokenizer_json if files else None
        self._chat_template = files.chat_template if files else None
        role = config.role
        if role is Role.PREFILL:
            self.node = PrefillNode(self.model_dir, config.tp_size, config.cache,
                                    transport=config.transport, lease_s=config.lease_s,
                                    timeout_s=config.timeout_s, checksums=config.checksums,
                                    side_channel_host=config.side_channel_host,
                                    cpus=config.cpus)
            engine = self.node.engine
        elif role is Role.DECODE:
            self.node = DecodeNode(self.model_dir, config.tp_size, config.cache,
                                   transport=config.transport, strategy=config.strategy,
                                   on_failure=config.on_failure, timeout_s=config.timeout_s,
                                   pull_timeout_s=config.pull_timeout_s,
                                   checksums=config.checksums, cpus=config.cpus,
                                   probe_every=config.probe_every)
            engine = self.node.engine
        else:
            self.node = engine = Engine(self.model_dir, config.tp_size, config.cache,
                                        device=config.device, timeout_s=config.timeout_s,
                                        cpus=config.cpus)
        self.engine: Engine = engine
        self.engine_id = getattr(self.node, "engine_id", f"both-{os.getpid()}")
        layout = engine.layout
        uses_attn = engine.scheduler.uses_attention
        capacity = (layout.num_blocks - 1) * layout.block_tokens if uses_attn else 1 << 30
        self.max_model_len = min(capacity, int(engine.spec.config.get(
            "max_position_embeddings") or capacity))
        self._pending_prefills: dict[int, Callable[[TransferParams | BaseException], None]] = {}
        self._held: dict[str, TransferParams] = {}             # prefill: under a lease
        # decode: requests waiting for blocks, each (attempt, its stream)
        self._backlog: deque[tuple[Callable[[], bool], "_TokenStream"]] = deque()
        self._http = httpx.Client(timeout=config.pull_timeout_s) if role is Role.DECODE else None
        # decode: the one thread that runs transfers off the engine loop (and alone uses
        # _http and the node's rank channel while the server runs); it takes what queued
        # meanwhile as one batch (_transfer_queued)
        self._transfers = _TransferThread() if role is Role.DECODE else None
        self._queued: deque[_Queued] = deque()
        # decode: transfer jobs submitted and not yet ended; at 0 the rank channel is free
        self._jobs, self._jobs_lock = 0, threading.Lock()
        # decode: announced requests awaiting the word that their prefill was computed
        # (request id -> (allocated request, since)), and words that came before their
        # request had blocks; the handlers, the loop and transfer threads share them under
        # the lock
        self._await_lock = threading.Lock()
        self._awaiting: dict[str, tuple[_Queued, float]] = {}
        self._early_words: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self.loop = EngineLoop(self.node, engine, name=f"engine-loop-{role.value}",
                               idle=self._idle, after_step=self._after_step,
                               on_broken=self._broken)

    def close(self) -> None:
        self.loop.close()
        if self._transfers is not None:     # a running transfer ends within its deadlines
            self._transfers.close()
            while self._queued:             # allocated, never pulled: the server is closing
                self._queued.popleft().stream.fail(RuntimeError("the server was closed"))
            with self._await_lock:
                awaiting, self._awaiting = self._awaiting, {}
            for q, _ in awaiting.values():
                q.stream.fail(RuntimeError("the server was closed"))
        if self._http is not None:
            self._http.close()
        self.node.close()

    # ---- info ------------------------------------------------------------------------

    def info(self) -> wire.NodeInfo:
        """Read from the handler thread: counts may be a step old, which is all load is."""
        e, c = self.engine, self.config
        sched = e.scheduler
        held = self.node.num_held if c.role is Role.PREFILL else 0
        load = wire.NodeLoad(running=len(sched.running), waiting=len(sched.waiting) +
                             len(self._backlog), blocks_total=sched.pool.num_blocks,
                             blocks_free=sched.pool.num_free, held=held)
        broken = self.loop.broken
        return wire.NodeInfo(
            role=c.role, engine_id=self.engine_id, model=self.model_name, tp_size=c.tp_size,
            max_model_len=self.max_model_len, vocab_size=e.spec.vocab_size,
            eos_token_ids=tuple(e.eos_token_ids),
            tokenizer_json=self._tokenizer_json, chat_template=self._chat_template, load=load,
            layout_digest=e.layout.digest if c.role is Role.PREFILL else "",
            transfer_mode="pull", checksums=c.checksums, healthy=broken is None,
            error=str(broken) if broken is not None else "")

    def check_request(self, prompt_ids, max_tokens: int) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise BadRequest("prompt: empty")
        if n + max_tokens > self.max_model_len:
            raise BadRequest(f"prompt: {n} tokens + max_tokens {max_tokens} exceed the "
                             f"model's context of {self.max_model_len} tokens")
        vocab = self.engine.spec.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    # ---- prefill -----------------------------------------------------------------------

    async def prefill(self, req: wire.PrefillRequest) -> AsyncIterator[wire.PrefillEvent]:
        """The request's PrefillEvents: with req.announce, its TransferParams just before
        the step that ends its prefill (PrefillNode.submit's announce: its blocks, not yet
        computed); then, once its tokens are computed and its blocks held under a lease, the
        `computed` event (the last). An error is raised before the first event (BadRequest)
        or is the last event."""
        if len(req.prompt_ids) < 2:
            raise BadRequest("prompt: a disaggregated prompt needs at least 2 tokens")
        self.check_request(req.prompt_ids, 1)
        events = _Events()

        def submit(node: PrefillNode) -> None:
            announce = (lambda params: events.put(wire.PrefillEvent(params))) \
                if req.announce else None
            rid = node.submit(req.prompt_ids, announce)

            def finished(result):
                if isinstance(result, TransferParams):
                    node.expect_readers(result, req.decode_engine_id, req.decode_tp)
                    events.put(wire.PrefillEvent(result, computed=True))
                else:
                    events.put(wire.PrefillEvent(error=f"{type(result).__name__}: {result}"))
            self._pending_prefills[rid] = finished
        await asyncio.wrap_future(self.loop.call(submit))
        while True:
            event = await events.get()
            yield event
            if event.computed or event.error is not None:
                return

    def _after_step(self) -> None:
        if self._pending_prefills:
            for rid in list(self._pending_prefills):
                params = self.node.collect(rid)
                if params is not None:
                    self._held[params.request_id] = params
                    self._pending_prefills.pop(rid)(params)
        if self._awaiting:
            self._expire_awaiting()
        self._retry_backlog()

    def _idle(self) -> None:
        if self._awaiting:
            self._expire_awaiting()
        if self.config.role is Role.PREFILL:
            self.node.poll()
            for rel in self.node.take_released():   # a server runs for days: keep none
                self._held.pop(rel.request_id, None)
        self._retry_backlog()

    async def prepare_permute(self, req: wire.PermuteRequest) -> wire.PermuteBases:
        params = self._held_params(req.request_id)
        bases = await asyncio.wrap_future(self.loop.call(lambda n: n.prepare_permute(
            params, req.decode_engine_id, req.decode_layout, req.decode_blocks,
            req.strategies)))
        return wire.PermuteBases(bases)

    async def digest_reads(self, req: wire.DigestRequest) -> wire.ReadDigests:
        params = self._held_params(req.request_id)
        digests = await asyncio.wrap_future(self.loop.call(lambda n: n.digest_reads(
            params, req.decode_layout, req.decode_blocks)))
        return wire.ReadDigests(digests)

    def _held_params(self, request_id: str) -> TransferParams:
        params = self._held.get(request_id)
        if params is None or request_id not in self.node.leases:
            raise BadRequest(f"request_id: {request_id!r} is not held here (released or unknown)")
        return params

    # ---- decode ------------------------------------------------------------------------

    async def decode(self, req: wire.TransferRequest) -> AsyncIterator[wire.TokenEvent]:
        sampling = req.sampling.params()
        self.check_request(req.prompt_ids, sampling.max_tokens)
        stream = _TokenStream()
        t0 = time.perf_counter()

        if req.params is None:                  # nothing was prefilled: compute it here
            async for event in self.generate(wire.GenerateRequest(req.prompt_ids, req.sampling)):
                yield event
            return

        def start(node: DecodeNode) -> None:
            def attempt() -> bool:
                if stream.cancelled:
                    return True             # the client left while it waited
                waited_s = time.perf_counter() - t0
                early = req.computed and self._may_send_early(node, req)
                if early:
                    node.expect()           # the remote ranks wake while this allocates
                try:
                    handle = node.allocate(req.prompt_ids, sampling)
                except BaseException as e:
                    if early:
                        self._job_ended()   # the channel, reserved for it, is free again
                    if isinstance(e, EngineFull):
                        return False
                    stream.fail(e)
                    return True
                q = _Queued(handle, req, stream, t0, waited_s, time.perf_counter())
                if req.computed:
                    self._queue_transfer(node, q, early)
                else:                       # announced: its prefill is still computed
                    self._await_computed(node, q)
                return True
            if self._backlog or not attempt():
                self._backlog.append((attempt, stream))
        # Allocating needs no step: on this thread when the engine is idle (run_now), which
        # spares the loop thread's wakeup on the transfer's path (issue 10).
        async for event in self._run(start, stream, now=True):
            yield event

    # An announced request (TransferRequest.computed False): its blocks are allocated and its
    # ranks plan ahead (DecodeNode.plan_ahead, on the transfer thread) while the prefill
    # computes it; the word that it was computed (a line on its request body: node_app)
    # starts its transfer, whose stage counts from there. A word that it failed, or none
    # within prefill_wait_s: the failure policy. A client that leaves meanwhile: its blocks
    # are freed (_expire_awaiting).

    def _await_computed(self, node: DecodeNode, q: "_Queued") -> None:
        """On the thread holding the engine, once the announced request has its blocks."""
        rid = q.req.params.request_id
        with self._await_lock:
            word = self._early_words.pop(rid, None)
            if word is None:
                self._awaiting[rid] = (q, time.monotonic())
        if word is not None:            # computed (or failed) before the blocks came
            self._computed(node, q, *word)
        elif not node.checksums:        # with checksums the Pull needs the digests first
            with self._jobs_lock:
                self._jobs += 1
            self._transfers.submit(self._plan_ahead, node, q)

    def computed(self, word: wire.PrefillComputed) -> None:
        """The router's word that an announced request's prefill was computed (or failed):
        its transfer starts from this thread, now (_computed)."""
        t = time.perf_counter()
        with self._await_lock:
            entry = self._awaiting.pop(word.request_id, None)
            if entry is None:           # its TransferRequest has no blocks yet (or is gone)
                self._early_words[word.request_id] = (word.error, t)
                while len(self._early_words) > MAX_EARLY_NEWS:
                    self._early_words.popitem(last=False)
                return
        self._computed(self.node, entry[0], word.error, t)

    def _computed(self, node: DecodeNode, q: "_Queued", error: str | None, t: float) -> None:
        """On any thread (nothing here touches the engine): start the transfer, its stage
        counted from `t` (with the channel free, its Pull, made ahead, goes to the remote
        ranks first thing: issue 10), or hand the request to the failure policy."""
        q = dataclasses.replace(q, t0=t, waited_s=0.0, t_submit=t)
        if error is not None:           # on the loop thread (a recompute needs its steps)
            verdict = f"the prefill was not computed: {error}"
            fut = self.loop.call(lambda n: self._finish(n, q.handle, q.stream, verdict,
                                                        0.0, 0.0))
            fut.add_done_callback(lambda f: f.exception() is not None
                                  and q.stream.fail(f.exception()))
            return
        early = q.started is not None or self._may_send_early(node, q.req)
        if early and q.ahead is None:   # made ahead, its Pull goes at once: no Expect first
            node.expect()
        self._queue_transfer(node, q, early)

    def _plan_ahead(self, node: DecodeNode, q: "_Queued") -> None:
        """On the transfer thread: the ranks plan the announced request's pull while it
        waits; skipped once its word came, or while transfers wait for this thread."""
        try:
            with self._await_lock:
                if q.req.params.request_id not in self._awaiting or self._queued:
                    return
            first = node.plan_ahead([self._pull_job(node, q)])[0]
        except Exception:               # best effort: the Pull plans, and reports failures
            return
        finally:
            self._job_ended()
        if first is not None:
            with self._await_lock:      # its Pull, made: the word only sends it
                entry = self._awaiting.get(q.req.params.request_id)
                if entry is not None:
                    self._awaiting[q.req.params.request_id] = (
                        dataclasses.replace(entry[0], ahead=first), entry[1])

    def _expire_awaiting(self) -> None:
        """On the loop thread: announced requests with no word for prefill_wait_s, and those
        whose client left, are taken from the waiting."""
        wait_s, now = self.config.prefill_wait_s, time.monotonic()
        with self._await_lock:
            late = [rid for rid, (q, since) in self._awaiting.items()
                    if now - since > wait_s or q.stream.cancelled]
            entries = [self._awaiting.pop(rid)[0] for rid in late]
        for q in entries:
            if q.stream.cancelled:
                self.engine.discard(q.handle.request_id)
            else:
                self._computed(self.node, q, f"no word within {wait_s:g} s (prefill_wait_s)",
                               time.perf_counter())

    def _may_send_early(self, node: DecodeNode, req: wire.TransferRequest) -> bool:
        """Whether the request's Pull may go from this thread, now: it needs no other server
        first (checksums fetch digests; an unknown prefill layout needs a handshake) and the
        rank channel is free, which reserves it (_reserve_channel) for the request's
        transfer job."""
        return not node.checksums and node.knows_layout(req.params) and self._reserve_channel()

    def _reserve_channel(self) -> bool:
        """Whether the rank channel is free (no transfer job queued or running); if so it
        is this caller's until the transfer job it queues ends (_queue_transfer with early)
        or it gives it back (_job_ended)."""
        with self._jobs_lock:
            if self._jobs:
                return False
            self._jobs = 1
            return True

    def _job_ended(self) -> None:
        with self._jobs_lock:
            self._jobs -= 1

    def _queue_transfer(self, node: DecodeNode, q: "_Queued", early: bool) -> None:
        """The request's blocks allocated (any thread): queue its transfer for the transfer
        thread. `early` (the channel reserved for it: _may_send_early): the request's Pull
        goes to the remote decode ranks from here, now (DecodeNode.start_pull; or it went
        already, q.started), and the transfer thread, once awake, runs rank 0's part and
        collects (issue 10: the remote ranks do not wait for that thread's wakeup)."""
        if not early:
            with self._jobs_lock:
                self._jobs += 1
        elif q.started is None:
            job = self._pull_job(node, q)
            if not isinstance(job, str):
                q = dataclasses.replace(q, started=node.start_pull(job, q.ahead))
        self._queued.append(q)
        self._transfers.submit(self._transfer_queued)

    def _transfer_queued(self) -> None:
        """On the transfer thread: the part of the transfers that needs no engine
        (strategies, the prefill side's part, the ranks' pulls) for every request queued by
        now, in one batch (up to config.pull_batch; a later call takes the rest), while the
        loop thread goes on stepping; then each one's engine part (_finish) back on it."""
        try:
            self._transfer_batch()
        finally:
            self._job_ended()

    def _transfer_batch(self) -> None:
        batch: list[_Queued] = []
        while self._queued and len(batch) < self.config.pull_batch:
            batch.append(self._queued.popleft())
        if not batch:
            return                              # an earlier call took them
        now = time.perf_counter()
        try:
            verdicts = self._pull_results(self.node, batch)
        except BaseException as e:              # EngineError: a rank died, all fail
            verdicts = [e] * len(batch)
        try:
            for q, verdict in zip(batch, verdicts):
                seconds = time.perf_counter() - q.t0    # the state is in place (or it failed)
                waited_s = q.waited_s + now - q.t_submit
                fut = self.loop.call(lambda n, q=q, v=verdict, s=seconds, w=waited_s:
                                     self._finish(n, q.handle, q.stream, v, s, w))
                fut.add_done_callback(lambda f, q=q: f.exception() is not None
                                      and q.stream.fail(f.exception()))
        finally:
            # Rank 0's ReadDone notifications, after the stage's clocks (they free the
            # prefill side's blocks; nothing here waits for them).
            self.node.run_after_work()

    def _pull_results(self, node: DecodeNode, batch: list["_Queued"]) -> list:
        """Per request: the ranks' PullResults, or why the prefill side's part failed before
        any rank pulled (a string, for the failure policy), or the refusal to raise on the
        loop thread (TransferRefused, ValueError). Each rank resolves `auto` inside its
        pull; the prefill server is asked to gather (permute) only for the ranks whose plans
        need it."""
        verdicts: list = [None] * len(batch)
        jobs, where, firsts = [], [], []
        for i, q in enumerate(batch):
            if q.started is not None:           # sent already: collected before any send
                verdicts[i] = node.finish_started(q.started, defer_after_work=True)
                continue
            job = self._pull_job(node, q)
            if isinstance(job, str):
                verdicts[i] = job
            else:
                jobs.append(job)
                where.append(i)
                firsts.append(q.ahead)
        for i, out in zip(where, node.pull_results_many(jobs, defer_after_work=True,
                                                        firsts=firsts)):
            verdicts[i] = out
        return verdicts

    def _pull_job(self, node: DecodeNode, q: "_Queued") -> PullJob | str:
        """One request's PullJob (its prefill server's digests fetched when checksums are
        on), or why the prefill side's part failed."""
        params = q.req.params
        b = q.handle.blocks
        decode_blocks = (b.num_tokens, b.attn_blocks, b.state_block)

        def prepare(strategies: dict[int, Strategy]) -> dict[int, dict[int, int]]:
            try:
                return self._post(q.req.prefill_url, "/pd/prepare_permute", wire.PermuteRequest(
                    params.request_id, node.engine_id, node.layout_dict, decode_blocks,
                    strategies), wire.PermuteBases).bases
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                raise PrepareFailed(str(e)) from None
        digests = None
        if node.checksums:
            try:
                digests = self._post(q.req.prefill_url, "/pd/digest_reads", wire.DigestRequest(
                    params.request_id, node.layout_dict, decode_blocks), wire.ReadDigests).digests
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                return f"before the pull: {e}"
        return PullJob(q.handle, params, None, params.lease_s / 3, None, digests, prepare)

    def _finish(self, node: DecodeNode, handle, stream: "_TokenStream", verdict,
                seconds: float, waited_s: float) -> None:
        """On the loop thread: decode from the pulled state, recompute, or fail. `seconds`:
        the transfer stage, request received (announced: the word that its prefill was
        computed) -> pulls returned (waiting for this loop thread
        after that is the next step's, in the time to first token)."""
        try:
            if isinstance(verdict, BaseException):
                node.engine.discard(handle.request_id)      # its blocks, freed once
                raise verdict
            outcome = node.fail_transfer(handle, verdict) if isinstance(verdict, str) \
                else node.finish_pull(handle, verdict)
        except BaseException as e:          # PullFailed, TransferRefused, EngineError
            stream.fail(e)
            return
        if stream.cancelled:                # the client left during the transfer
            self.engine.discard(outcome.request_id)
            return
        stream.request_id = outcome.request_id
        probe_s, probe_nbytes = outcome.probe
        stream.first(wire.TransferStats(
            outcome.nbytes, outcome.descriptors, seconds, outcome.recomputed,
            tuple(sorted({r.strategy for r in outcome.results if r.strategy})),
            tuple(outcome.errors), queued_s=waited_s, pull_s=outcome.rank_pull_s,
            pull_parts=_pull_parts(outcome.slowest), planned_ahead=outcome.planned_ahead,
            probe=wire.Probe(probe_s, probe_nbytes) if probe_s > 0 else None))
        self.loop.watch(outcome.request_id, self._sink(stream))

    def _post(self, base: str, path: str, body, kind):
        r = self._http.post(base.rstrip("/") + path, content=wire.encode(body),
                            headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"{path} on {base}: HTTP {r.status_code} {r.text[:200]}")
        return wire.decode(r.content, kind)

    def _retry_backlog(self) -> None:
        while self._backlog and self._backlog[0][0]():
            self._backlog.popleft()

    def _broken(self, error: BaseException) -> None:
        """The engine loop stopped (a dead worker): fail what waits outside its sinks."""
        pending, self._pending_prefills = self._pending_prefills, {}
        for finished in pending.values():
            finished(error)
        backlog, self._backlog = self._backlog, deque()
        for _, stream in backlog:
            stream.fail(error)

    # ---- both --------------------------------------------------------------------------

    async def generate(self, req: wire.GenerateRequest) -> AsyncIterator[wire.TokenEvent]:
        sampling = req.sampling.params()
        self.check_request(req.prompt_ids, sampling.max_tokens)
        stream = _TokenStream()

        engine = self.engine

        def start(_) -> None:
            try:
                rid = engine.add_request(req.prompt_ids, sampling)
            except BaseException as e:
                stream.fail(e)
                return
            stream.request_id = rid
            self.loop.watch(rid, self._sink(stream))
        async for event in self._run(start, stream):
            yield event

    # ---- streams -----------------------------------------------------------------------

    def _sink(self, stream: "_TokenStream"):
        engine = self.engine

        def sink(out: StepOutput | BaseException) -> None:     # on the loop thread
            if isinstance(out, BaseException):
                stream.fail(out)
                return
            if out.finished:
                engine.take(out.request_id)
            stream.put(wire.TokenEvent(out.new_token_ids, out.finish_reason.value
                                       if out.finished and out.finish_reason else None))
        return sink

    async def _run(self, start, stream: "_TokenStream", now: bool = False
                   ) -> AsyncIterator[wire.TokenEvent]:
        """`start` on the loop thread (or, `now`, on this one if the engine is idle:
        EngineLoop.run_now), then the stream's events until its last."""
        stream.bind(asyncio.get_running_loop())
        if not (now and self.loop.run_now(start)[0]):
            await asyncio.wrap_future(self.loop.call(start))
        finished = False
        try:
            while True:
                event = await stream.get()
                finished = event.finish_reason is not None or event.error is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:            # the client went away: free the request's blocks
                self.loop.call(lambda _: self._abort(stream))

    def _abort(self, stream: "_TokenStream") -> None:
        rid = stream.request_id
        if rid is None:
            stream.cancelled = True     # in the backlog, or announced (_expire_awaiting)
            return
        self.loop.unwatch(rid)
        self.engine.discard(rid)


class _TransferThread:
    """A decode server's one transfer thread: runs the calls submitted, in order. A plain
    queue, no futures: submitting is on the transfer stage's path (issue 10). close() runs
    none of those still queued and returns once the running one ended."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="transfer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> None:
        self._calls.put((fn, args))

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            if self._closing:
                continue
            fn, args = call
            try:
                fn(*args)
            except BaseException:       # each call reports its own failures; not this one
                log.exception("transfer thread: %s failed", getattr(fn, "__name__", fn))

    def close(self) -> None:
        self._closing = True
        self._calls.put(None)
        self._thread.join()


@dataclass(frozen=True)
class _Queued:
    """Decode: a request with its blocks, waiting for the transfer thread (or, announced,
    for the word that its prefill was computed)."""
    handle: RequestHandle
    req: wire.TransferRequest
    stream: "_TokenStream"
    t0: float               # received
    waited_s: float         # received -> allocated (the engine loop); announced: 0
    t_submit: float         # queued for the transfer thread
    started: StartedPull | None = None  # its Pull already sent to the remote ranks
    ahead: FirstPull | None = None     # announced: its Pull, made while planned ahead


class _Events:
    """Events from the loop thread to one awaiting handler, in order."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self):
        return await self._queue.get()


class _TokenStream:
    """TokenEvents from the loop thread to one handler, in order."""

    def __init__(self):
        self.request_id: int | None = None
        self.cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._transfer: wire.TransferStats | None = None

    def bind(self, loop) -> None:
        self._loop = loop

    def first(self, stats: wire.TransferStats) -> None:
        self._transfer = stats

    def put(self, event: wire.TokenEvent) -> None:
        if self._transfer is not None:
            event = wire.TokenEvent(event.token_ids, event.finish_reason, event.error,
                                    self._transfer)
            self._transfer = None
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def fail(self, error: BaseException) -> None:
        kind = "bad_request" if isinstance(error, (RequestTooLarge, BadRequest)) else \
            "transfer_failed" if isinstance(error, PullFailed) else \
            "refused" if isinstance(error, TransferRefused) else "engine_error"
        self.put(wire.TokenEvent(error=f"{kind}: {error}"))

    async def get(self) -> wire.TokenEvent:
        return await self._queue.get()


def _pull_parts(result: PullResult | None) -> wire.PullParts | None:
    """A rank's PullPhases on the wire, with what they leave out of its seconds as other_s."""
    ph = result.phases if result is not None else None
    if ph is None:
        return None
    parts = (ph.plan_s, ph.peers_s, ph.read_s, ph.verify_s, ph.notify_s)
    return wire.PullParts(*parts, other_s=max(0.0, result.seconds - sum(parts)))
