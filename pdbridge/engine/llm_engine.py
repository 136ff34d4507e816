"""Engine: requests in, tokens out. Rank 0 lives here and drives ranks 1..t-1 (nano-vllm style).

Besides monolithic generation it has the two hooks of P/D disaggregation (DESIGN.md section 5):
* prefill-only: compute a prompt's first N-1 tokens, keep the blocks (`prefill_for_transfer`),
  free them when the decode side is done (`release`);
* imported: allocate a request's blocks first so a transport can fill them
  (`add_request(..., imported=True)`), then after `state_arrived` compute the last prompt token
  as an ordinary decode step (query_len 1, context_len N-1, batched with other decodes).
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pdbridge.plan.transfer_plan import RequestBlocks
from pdbridge.spec import CacheConfig, EngineLayout

from .block_pool import BlockPool
from .messages import Describe, Shutdown, Step, WorkerCall, encode
from .model_loader import default_model_dir, eos_token_ids, load_model_shard
from .rank_group import RankGroup, Rendezvous
from .request import FinishReason, Request, RequestStatus, SamplingParams
from .sampling import make_generator, sample, stop_reason
from .scheduler import EngineFull, ScheduledChunk, Scheduler, SchedulerConfig
from .worker import ModelLoader, Worker, WorkerArgs, worker_main


class EngineError(RuntimeError):
    """A worker died or a collective failed; the engine cannot continue."""


@dataclass(frozen=True)
class RequestHandle:
    """A request whose blocks another engine reads from (prefill-only) or writes into
    (imported): its id here and the blocks, as the transfer planner takes them."""
    request_id: int
    blocks: RequestBlocks


@dataclass(frozen=True)
class StepOutput:
    request_id: int
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class GenerateOutput:
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_ids: tuple[int, ...] = field(default=())


SHUTDOWN_S = 3.0        # per stage of close(): Shutdown, then SIGTERM, then SIGKILL


def _stop_processes(procs, grace_s: float) -> None:
    """Wait grace_s for the processes to exit, then SIGTERM, then SIGKILL (SHUTDOWN_S each)."""
    for wait_s, signal_them in ((grace_s, "terminate"), (SHUTDOWN_S, "kill"), (SHUTDOWN_S, None)):
        deadline = time.monotonic() + wait_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.exitcode is None]
        if not alive or signal_them is None:
            return
        for p in alive:
            getattr(p, signal_them)()


WORKER_ENV = "PDBRIDGE_TP_WORKER"     # read by pdbridge/__init__.py in the spawned process


@contextlib.contextmanager
def _spawning_workers():
    """Mark the processes spawned meanwhile as TP workers (they inherit the environment), so
    they ignore Ctrl-C from their first import of pdbridge on. This process's own SIGINT is
    left alone: a Ctrl-C during start-up reaches it and ends the engine (no lost interrupt)."""
    previous = os.environ.get(WORKER_ENV)
    os.environ[WORKER_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(WORKER_ENV, None)
        else:
            os.environ[WORKER_ENV] = previous


def rank_process_context():
    """The multiprocessing context TP ranks start in: forked from one server process per
    engine process (`forkserver`), started with the first TP engine. That server imported
    torch and the worker once (`rank_preload`), so a rank starts in tens of ms instead of
    3-6 s of imports each. Its environment is this process's at that first start (inside
    `_spawning_workers`)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pdbridge.engine.rank_preload"])
    return ctx


class Engine:
    def __init__(self, model_dir: str | None = None, tp_size: int = 1,
                 cache_config: CacheConfig | None = None, *, device: str = "cpu",
                 dtype: str | None = None, scheduler: SchedulerConfig = SchedulerConfig(),
                 loader: ModelLoader = load_model_shard, timeout_s: float = 120.0,
                 worker_threads: int = 1, start_timeout_s: float = 300.0,
                 cpus: tuple[int, ...] | None = None):
        """cpus: the CPUs this engine's ranks split, one part each (cpu_affinity.rank_cpus);
        ranks 1..t-1 pin themselves to theirs, rank 0 (this process) is pinned by the caller,
        before it starts any thread (`pdbridge serve` does); None: no pinning.
        worker_threads: torch's intra-op threads on every rank, rank 0 included (it sets
        this process's)."""
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
        self.tp_size = tp_size
        # Start-up (spawn, import torch, load the shard) is not bounded by the collectives'
        # timeout: on a loaded machine it takes seconds, and a worker that dies is reported at
        # once anyway (_join_group watches them).
        self.start_timeout_s = max(start_timeout_s, timeout_s)
        if model_dir is None and loader is load_model_shard:
            model_dir = default_model_dir()     # resolved once, before any worker starts
        self.args = WorkerArgs(model_dir, tp_size, cache_config or CacheConfig(), device, dtype,
                               loader, timeout_s, worker_threads,
                               tuple(cpus) if cpus else None)
        self._procs: list[mp.process.BaseProcess] = []
        self._group: RankGroup | None = None
        self._closed = False
        self._desynced = False      # a TP call was cut short: the ranks are out of step
        self._rendezvous: Rendezvous | None = None
        try:
            self.worker = self._start_ranks()
            self._check_ranks()
        except BaseException:
            self.close()
            raise
        self.layout: EngineLayout = self.worker.layout
        self.spec = self.worker.spec
        self.eos_token_ids = eos_token_ids(self.spec)
        has_attn = any(t.paged for t in self.layout.tensors)
        has_state = any(not t.paged for t in self.layout.tensors)
        self.scheduler = Scheduler(BlockPool(self.layout.num_blocks), self.layout.block_tokens,
                                   has_attn, has_state, scheduler)
        self._requests: dict[int, Request] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._ids = itertools.count()
        self._before_last_step: dict[int, Callable[[RequestHandle], None]] = {}

    @property
    def caches(self):
        """Rank 0's PagedCaches."""
        return self.worker.caches

    # ---- ranks -----------------------------------------------------------------------

    def _start_ranks(self) -> Worker:
        # Rank 0 computes with as many threads as every other rank (worker_main). Left to
        # torch, it took one per CPU it may use: a prefill server's rank 0 on both CPUs of
        # this 2-CPU VM, stalled by whatever else ran on either (paired runs of `pdbridge up`,
        # 1 client: prefill 27.4 -> 24.2 ms, TTFT 63.8 -> 60.4 ms with one thread).
        torch.set_num_threads(self.args.num_threads)
        if self.tp_size == 1:
            from pdbridge.model.comm import SingleComm
            return Worker(0, self.args, SingleComm())
        self._rendezvous = Rendezvous()
        ctx = rank_process_context()
        with _spawning_workers():
            for r in range(1, self.tp_size):
                p = ctx.Process(target=worker_main,
                                args=(r, self.args, self._rendezvous.path, os.getpid()),
                                name=f"pdbridge-tp{r}", daemon=True)
                p.start()
                self._procs.append(p)
        self._group = self._join_group()
        return Worker(0, self.args, self._group.comm)

    def _join_group(self) -> RankGroup:
        """Rank 0's rendezvous, watching the workers so one that dies at start-up is reported
        at once instead of after the rendezvous timeout."""
        box: dict = {}

        def join():
            try:
                box["group"] = RankGroup(self._rendezvous.path, 0, self.tp_size,
                                         torch.device(self.args.device), self.args.timeout_s,
                                         self.start_timeout_s)
            except BaseException as e:      # reported below
                box["error"] = e
        t = threading.Thread(target=join, daemon=True, name="pdbridge-rendezvous")
        t.start()
        until = time.monotonic() + self.start_timeout_s
        while t.is_alive():
            t.join(0.2)
            self._raise_if_dead()
            if time.monotonic() > until:
                raise EngineError(f"TP workers did not join within {self.start_timeout_s:g} s "
                                  f"(start_timeout_s)")
        if "error" in box:
            raise EngineError(f"TP rendezvous failed: {box['error']}") from box["error"]
        return box["group"]

    def _check_ranks(self) -> None:
        infos = self.call(Describe(), deadline_s=self.start_timeout_s)   # workers may still load
        digests = {i.layout_digest for i in infos}
        if len(digests) != 1:
            raise EngineError(f"ranks disagree on the cache layout: {digests}")

    def check_alive(self) -> None:
        """EngineError if the engine is closed or one of its TP worker processes has exited."""
        if self._closed:
            raise EngineError("the engine is closed")
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        for r, p in enumerate(self._procs, start=1):
            if p.exitcode is not None:
                raise EngineError(f"TP worker rank {r} (pid {p.pid}) exited with code "
                                  f"{p.exitcode}; see its traceback above")

    def call(self, msg: WorkerCall, deadline_s: float | None = None):
        """Run one call on every rank. Returns rank 0's result, or every rank's for `collect`
        calls (decoded as rank 0's result type). `deadline_s` bounds the wait for the other
        ranks to take the call (default: the engine's timeout_s)."""
        if self._closed:
            raise EngineError("the engine is closed")
        if self._group is None:
            result = self.worker.handle(msg)
            return [result] if msg.collect else result
        self._raise_if_dead()
        if self._desynced:
            raise EngineError("the engine's TP group failed earlier (see the first error); "
                              "close it and start a new engine")
        # Until the call returns, the ranks are inside it: any exception from here on (a
        # timeout, a dead rank, Ctrl-C) leaves them where no next call can meet them.
        self._desynced = True
        try:
            self._group.broadcast_bytes(encode(msg), deadline_s)
            result = self.worker.handle(msg)
            if msg.collect:
                import msgspec
                blobs = self._group.gather_bytes(encode(result), deadline_s)
                result = [msgspec.msgpack.decode(b, type=type(result)) for b in blobs]
        except RuntimeError as e:           # CollectiveTimeout, or gloo's own errors
            self._wait_for_exit(2.0)
            self._raise_if_dead()
            raise EngineError(f"{type(msg).__name__}: collective failed: {e}") from e
        self._desynced = False
        return result

    def _wait_for_exit(self, seconds: float) -> None:
        for p in self._procs:
            p.join(seconds / max(1, len(self._procs)))

    def close(self) -> None:
        """Stop the workers: Shutdown when the group is in step, then SIGTERM, then SIGKILL
        (which also ends a SIGSTOPped rank), each within SHUTDOWN_S: a bounded exit, always."""
        if self._closed:
            return
        asked = False               # whether the workers were told to exit (then: a grace)
        if (self._group is not None and not self._desynced
                and all(p.exitcode is None for p in self._procs)):
            try:
                self._group.broadcast_bytes(encode(Shutdown()), deadline_s=SHUTDOWN_S)
                asked = True
            except Exception:
                pass
        self._closed = True
        worker = getattr(self, "worker", None)
        if worker is not None and worker.pd is not None:      # rank 0's own P/D agent
            worker.pd.close()
            worker.pd = None
        # Not told (out of step, or still starting): nothing to wait for, signal them at once.
        _stop_processes(self._procs, SHUTDOWN_S if asked else 0.0)
        self._procs, self._group = [], None
        if self._rendezvous is not None:
            self._rendezvous.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    # ---- requests --------------------------------------------------------------------

    def add_request(self, prompt_ids, sampling: SamplingParams | None = None, *,
                    imported: bool = False) -> int | RequestHandle:
        """Queue a prompt; returns its request id. With `imported=True` the blocks for the
        first N-1 tokens are allocated now and returned (a RequestHandle) for a transport to
        fill; call `state_arrived(request_id)` once they hold the prefill engine's state."""
        req = self._new_request(prompt_ids, sampling or SamplingParams(), imported=imported)
        if imported:
            self.scheduler.add_imported(req)
        else:
            self.scheduler.add(req)
        self._register(req)
        return self._handle(req, req.num_prompt_tokens - 1) if imported else req.request_id

    def state_arrived(self, request_id: int) -> None:
        """The imported request's first N-1 tokens are in its blocks: decode from here."""
        self.scheduler.state_arrived(self._requests[request_id])

    def add_prefill(self, prompt_ids,
                    before_last_step: Callable[[RequestHandle], None] | None = None) -> int:
        """Queue a prefill-only request: tokens 0..N-2 are computed, the blocks are kept
        (`prefilled_handle` says when). `before_last_step`: see prefill_for_transfer."""
        req = self._new_request(prompt_ids, SamplingParams(max_tokens=1))
        req.compute_target = req.num_prompt_tokens - 1
        self.scheduler.add(req)
        self._register(req)
        if before_last_step is not None:
            self._before_last_step[req.request_id] = before_last_step
        return req.request_id

    def prefill_for_transfer(self, prompt_ids,
                             before_last_step: Callable[[RequestHandle], None] | None = None
                             ) -> RequestHandle:
        """Compute the first N-1 prompt tokens (running other requests' steps meanwhile) and
        hand back the blocks holding them; `release` frees them. `before_last_step` is called
        with the final blocks just before the step that ends the prefill (push mode arms the
        ranks' layer-by-layer writes there)."""
        rid = self.add_prefill(prompt_ids, before_last_step)
        while (handle := self.prefilled_handle(rid)) is None:
            self.step()
        return handle

    def prefilled_handle(self, request_id: int) -> RequestHandle | None:
        """The blocks of a prefill-only request (add_prefill) once its tokens are computed;
        None while it is still queued or running."""
        req = self._requests[request_id]
        if req.status is not RequestStatus.PREFILLED:
            return None
        return self._handle(req, req.compute_target)

    def release(self, handle: RequestHandle | int) -> None:
        """Free a prefilled request's blocks (the decode side has read them)."""
        rid = handle.request_id if isinstance(handle, RequestHandle) else handle
        self.scheduler.release(self._requests.pop(rid))
        self._generators.pop(rid, None)

    def abort(self, request_id: int) -> None:
        """Drop a request wherever it is and free its blocks (e.g. a failed transfer)."""
        req = self._requests.pop(request_id)
        self._generators.pop(request_id, None)
        if req.status is RequestStatus.PREFILLED:
            self.scheduler.release(req)
        elif req.status is not RequestStatus.FINISHED:
            self.scheduler.finish(req)

    def discard(self, request_id: int) -> None:
        """Forget a request whatever its state (a client went away): abort it if it is
        unfinished, take it if finished; an unknown id is ignored."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if req.status is RequestStatus.FINISHED:
            self.take(request_id)
        else:
            self.abort(request_id)

    def request(self, request_id: int) -> Request:
        return self._requests[request_id]

    def _new_request(self, prompt_ids, sampling: SamplingParams, imported: bool = False) -> Request:
        ids = tuple(map(int, prompt_ids))
        vocab = self.spec.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):     # C loops: a decode server
            bad = [t for t in ids if not 0 <= t < vocab]    # allocates on its handler's path
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return Request(next(self._ids), ids, sampling, imported=imported)

    def _register(self, req: Request) -> None:
        self._requests[req.request_id] = req
        self._generators[req.request_id] = make_generator(req.sampling)

    def _handle(self, req: Request, num_tokens: int) -> RequestHandle:
        # A model without state regions has no state block; 0 then names nothing.
        state = req.state_block if req.state_block is not None else 0
        return RequestHandle(req.request_id, RequestBlocks(num_tokens, tuple(req.attn_blocks), state))

    # ---- stepping --------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[StepOutput]:
        """One batch: every running decode plus prefill chunks; returns sampled tokens."""
        chunks = self.scheduler.schedule()
        if not chunks:
            self._raise_if_stuck()
            return []
        for c in chunks:
            req = c.request
            if req.compute_target == c.context_len + c.query_len and \
                    req.request_id in self._before_last_step:
                self._before_last_step.pop(req.request_id)(self._handle(req, req.compute_target))
        logits = self.call(_step_call(chunks))
        outputs = []
        for i, c in enumerate(chunks):
            out = self._advance(c, logits[i])
            if out is not None:
                outputs.append(out)
        return outputs

    def _raise_if_stuck(self) -> None:
        """Queued requests, nothing running or arriving: only a release can free blocks."""
        if self.scheduler.waiting and not self.scheduler.running:
            req = self.scheduler.waiting[0]
            raise EngineFull(f"request {req.request_id} needs "
                             f"{self.scheduler.worst_case_blocks(req)} blocks; "
                             f"{self.scheduler.pool.num_free} are free, the rest are held by "
                             f"prefilled requests awaiting release")

    def take(self, request_id: int) -> Request:
        """Remove a finished request from the engine and return it (its tokens, reason)."""
        req = self._requests[request_id]
        if req.status is not RequestStatus.FINISHED:
            raise ValueError(f"request {request_id} is {req.status.value}, not finished")
        self._generators.pop(request_id, None)
        return self._requests.pop(request_id)

    def _advance(self, chunk: ScheduledChunk, logits: torch.Tensor) -> StepOutput | None:
        req = chunk.request
        req.num_computed_tokens += chunk.query_len
        if req.num_pending_tokens:
            return None                                 # mid-prefill chunk
        if req.compute_target is not None:
            self.scheduler.keep(req)                    # prefill-only: blocks stay
            return None
        if not bool(torch.isfinite(logits).all()):     # never sample a token from NaN/Inf
            req.finish_reason = FinishReason.NONFINITE
            self.scheduler.finish(req)
            return StepOutput(req.request_id, (), True, FinishReason.NONFINITE)
        req.output_ids.append(sample(logits, req.sampling, self._generators[req.request_id]))
        reason = stop_reason(req, self.eos_token_ids)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.finish(req)
        return StepOutput(req.request_id, (req.output_ids[-1],), reason is not None, reason)

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerateOutput]:
        """Run prompts (lists of token ids) to completion, batched; outputs in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = [self.add_request(p, s) for p, s in zip(prompts, params)]
        reqs = [self._requests[i] for i in ids]
        while not all(r.is_finished for r in reqs):
            if not self.scheduler.has_work:
                raise EngineError("requests are unfinished but nothing can be scheduled")
            self.step()
        for i in ids:
            self._requests.pop(i)
            self._generators.pop(i)
        return [GenerateOutput(list(r.output_ids), r.finish_reason, r.prompt_ids) for r in reqs]


def _step_call(chunks: list[ScheduledChunk]) -> Step:
    ids, pos = [], []
    for c in chunks:
        ids += c.request.token_ids(c.context_len, c.context_len + c.query_len)
        pos += range(c.context_len, c.context_len + c.query_len)
    return Step(ids, pos, [c.query_len for c in chunks], [c.context_len for c in chunks],
                [list(c.request.attn_blocks) for c in chunks],
                [c.request.state_block if c.request.state_block is not None else 0 for c in chunks])
