"""Push mode, both sides of one TP rank: the prefill rank writes each decode rank's bytes
layer by layer while the prefill forward runs, the decode rank waits for every writer's
PushDone before the request decodes.

The plan is the pull plan (plan_transfer for decode rank j, computed alike on both sides);
direction is data: its reads of this prefill rank become this rank's writes, cut by the
layer after which their source bytes are final (plan.push_batches). A write is posted as
soon as its layer has run; whatever is left (and the waiting) happens when the forward ends.
A failure is reported, never raised: a raising worker call ends the rank's process.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pdbridge.plan import RequestBlocks, TransferPlan, plan_transfer, push_batches
from pdbridge.spec import EngineLayout
from pdbridge.transport.compat import check_compatible
from pdbridge.transport.handshake import peer_name
from pdbridge.transport.messages import PushDone, encode
from pdbridge.transport.transport import ReadList, XferHandle

from . import checksums
from .pd_calls import ArmPush, AwaitPush, PullResult


@dataclass
class _Job:
    """One request's writes from this prefill rank into one decode rank."""
    push_id: str
    decode_rank: int
    peer: str
    timeout_s: float
    batches: list[tuple[int, ReadList]]         # (after layer, runs), in layer order
    handles: list[XferHandle] = field(default_factory=list)
    error: str = ""
    nbytes: int = 0
    plan: TransferPlan | None = None            # kept only with checksums on


def _runs(plan: TransferPlan, idx: np.ndarray) -> ReadList:
    return ReadList(plan.src_region[idx].astype(np.int32), plan.src_offset[idx].astype(np.int64),
                    plan.dst_region[idx].astype(np.int32), plan.dst_offset[idx].astype(np.int64),
                    plan.nbytes[idx].astype(np.int64))


class PushSender:
    """A prefill rank's side: ArmPush before the last prefill step, after_layer(l) during
    its forward, finish() after it."""

    def __init__(self, rank: int, engine_id: str, layout: EngineLayout, transport: Any,
                 lock: threading.Lock, layout_of: Callable[[dict], EngineLayout],
                 buffers: list | None = None):
        self.rank, self.engine_id, self.layout = rank, engine_id, layout
        self.buffers = buffers or []            # this rank's cache regions (checksums)
        self.transport, self._lock, self._layout_of = transport, lock, layout_of
        self._peers: set[str] = set()
        self._checked: set[str] = set()         # decode layout digests found compatible
        self.jobs: list[_Job] = []

    @property
    def armed(self) -> bool:
        return bool(self.jobs)

    def arm(self, call: ArmPush) -> None:
        t = call.target
        for j, agent in enumerate(t.agents):
            job = _Job(t.push_id, j, peer_name(t.decode_engine_id, j), t.timeout_s, [])
            try:
                self._add_peer(job.peer, agent)
                plan = self._plan(call, j)
                job.plan = plan if t.checksums else None
                job.batches = [(b.after_layer, _runs(plan, b.runs))
                               for b in push_batches(plan, self.layout, self.rank)]
            except Exception as e:
                job.error = f"{type(e).__name__}: {e}"
            if job.batches or job.error:
                self.jobs.append(job)

    def _plan(self, call: ArmPush, j: int) -> TransferPlan:
        t = call.target
        decode = self._layout_of(t.decode_layout)       # rebuilt once, its digest checked
        if decode.digest not in self._checked:
            check_compatible(self.layout, decode, t.strategy)
            self._checked.add(decode.digest)
        return plan_transfer(self.layout, decode, j, RequestBlocks(*call.prefill_blocks),
                             RequestBlocks(*t.decode_blocks), t.strategy)

    def _add_peer(self, name: str, agent: bytes) -> None:
        if name not in self._peers:
            with self._lock:
                self.transport.add_peer(name, agent)
            self._peers.add(name)

    def after_layer(self, layer: int) -> None:
        """Layer `layer` of the forward has run: post every batch final by now."""
        for job in self.jobs:
            while job.batches and job.batches[0][0] <= layer and not job.error:
                self._post(job, job.batches.pop(0)[1])

    def _post(self, job: _Job, runs: ReadList) -> None:
        try:
            with self._lock:
                job.handles.append(self.transport.write(job.peer, runs))
            job.nbytes += runs.total_nbytes
        except Exception as e:
            job.error = f"{type(e).__name__}: {e}"

    def finish(self, error: str = "") -> list[PushDone]:
        """Post what is left, wait for every write, release it, and tell each decode rank
        (`error`: the forward failed, so whatever was written is not the state)."""
        sent, jobs = [], self.jobs
        for job in jobs:
            job.error = job.error or error
        self.after_layer(1 << 30)
        self.jobs = []
        for job in jobs:
            self._wait(job)
            msg = PushDone(job.push_id, self.engine_id, self.rank, job.decode_rank,
                           not job.error, job.error, job.nbytes, self._digest(job))
            try:
                with self._lock:
                    self.transport.notify(job.peer, encode(msg))
                sent.append(msg)
            except Exception:
                pass        # the decode rank is gone, or never known: it times out
        return sent

    def _digest(self, job: _Job) -> int | None:
        """The source bytes written, digested once every write ended (checksums on)."""
        if job.plan is None or job.error:
            return None
        return checksums.source_digest(job.plan, self.rank, self.buffers)

    def _wait(self, job: _Job) -> None:
        deadline = time.monotonic() + job.timeout_s
        for h in job.handles:
            try:
                if not job.error:
                    with self._lock:
                        self.transport.wait(h, max(0.0, deadline - time.monotonic()))
            except Exception as e:
                job.error = f"{type(e).__name__}: {e}"
            finally:
                with self._lock:
                    self.transport.release(h)


class PushInbox:
    """A decode rank's side: PushDone messages by push id, and the wait for all writers."""

    def __init__(self, rank: int, layout: EngineLayout, layout_of: Callable[[dict], EngineLayout],
                 buffers: list | None = None):
        self.rank, self.layout, self._layout_of = rank, layout, layout_of
        self.buffers = buffers or []            # this rank's cache regions (checksums)
        self._done: dict[str, dict[int, PushDone]] = {}
        self._closed: set[str] = set()          # answered push ids: late messages are dropped
        self._cond = threading.Condition()

    def add(self, msg: PushDone) -> None:
        with self._cond:
            if msg.push_id in self._closed or msg.decode_rank != self.rank:
                return
            self._done.setdefault(msg.push_id, {})[msg.prefill_rank] = msg
            self._cond.notify_all()

    def await_push(self, call: AwaitPush) -> PullResult:
        t0 = time.perf_counter()
        try:
            plan = plan_transfer(self._layout_of(call.prefill_layout), self.layout, self.rank,
                                 RequestBlocks(*call.prefill_blocks),
                                 RequestBlocks(*call.decode_blocks), "direct")
        except Exception as e:
            self._close(call.push_id)
            return PullResult(self.rank, False, f"{type(e).__name__}: {e}", "direct")
        sources = plan.source_ranks()
        got = self._wait(call.push_id, sources, call.timeout_s)
        missing = [r for r in sources if r not in got]
        failed = [f"prefill rank {r}: {got[r].detail}" for r in sources if r in got and not got[r].ok]
        short = [r for r in sources if r in got and got[r].ok
                 and got[r].nbytes != int(plan.nbytes[plan.src_rank == r].sum())]
        if call.checksums and not failed and not missing and not short:
            failed = self._check(plan, got)
        detail = "; ".join(failed + (
            [f"no PushDone from prefill ranks {missing} within {call.timeout_s:g} s"] if missing
            else []) + ([f"prefill ranks {short} wrote other byte counts than planned"] if short
                        else []))
        result = PullResult(self.rank, not detail, detail, plan.strategy.value, sources,
                            plan.total_nbytes, plan.num_descriptors)
        result.seconds = time.perf_counter() - t0
        return result

    def _check(self, plan: TransferPlan, got: dict[int, PushDone]) -> list[str]:
        try:
            checksums.verify(plan, self.buffers, {r: m.digest for r, m in got.items()
                                                  if m.digest is not None})
        except checksums.ChecksumMismatch as e:
            return [f"{type(e).__name__}: {e}"]
        return []

    def _wait(self, push_id: str, sources: list[int], timeout_s: float) -> dict[int, PushDone]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = self._done.get(push_id, {})
                left = deadline - time.monotonic()
                if all(r in got for r in sources) or left <= 0:
                    self._closed.add(push_id)
                    return self._done.pop(push_id, {})
                self._cond.wait(min(left, 0.05))

    def _close(self, push_id: str) -> None:
        with self._cond:
            self._closed.add(push_id)
            self._done.pop(push_id, None)
