"""PrefillNode: a prefill engine (TP = p worker processes) serving its caches to decoders.

It computes the first N-1 prompt tokens of each request, keeps the blocks under a lease, and
frees them exactly once: when every expected decode rank has said it is done reading, or
when the lease expires (DESIGN.md section 5). In push mode (`prefill(..., push_to=target)`)
its ranks write each layer's bytes into the decode blocks while the last prefill step runs
(engine/pd_push.py), and the blocks are freed as soon as that step has ended: nobody reads them.
"""
from __future__ import annotations

import itertools
import os
import secrets
import time
from collections import deque
from typing import Callable

from pdbridge.engine.llm_engine import Engine, RequestHandle
from pdbridge.engine.pd_calls import (ArmPush, DigestReads, ForgetRequest, PDSetup,
                                     PollNotifications, PreparePermute, PushTarget)
from pdbridge.engine.pd_rank import reads_need_progress
from pdbridge.plan import Strategy, check_push_strategy
from pdbridge.spec import CacheConfig, EngineLayout
from pdbridge.transport.bookkeeping import LeaseTable, Release
from pdbridge.transport.messages import LeaseRenew, ProtocolError, ReadDone, decode
from pdbridge.transport.side_channel_key import SideChannelKey, load_key

from .transfer_params import BlockTable, TransferParams

_ENGINE_IDS = itertools.count()
MAX_LEASE_FACTOR = 10       # default cap of a renewed lease, in lease lengths
MAX_RELEASED = 1024         # releases kept for inspection (`released`); older ones are counted


def request_id(engine_id: str) -> str:
    """Unguessable: a request id is what a ReadDone or LeaseRenew names (issue 12: predictable
    ids let a forged ReadDone free a live request's blocks)."""
    return f"{engine_id}:{secrets.token_hex(16)}"


class PrefillNode:
    def __init__(self, model_dir: str | None, tp_size: int, cache_config: CacheConfig, *,
                 transport: str = "nixl", engine_id: str | None = None, lease_s: float = 30.0,
                 scratch_nbytes: int | None = None, timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_lease_s: float | None = None,
                 key: SideChannelKey | None = None, checksums: bool = False,
                 side_channel_host: str = "127.0.0.1", max_released: int = MAX_RELEASED,
                 cpus: tuple[int, ...] | None = None):
        self.clock = clock                  # lease times: tests drive a fake clock
        self.key = key or load_key()        # the side channel's secret (side_channel_key.py)
        self.checksums = checksums          # digest what decode ranks read (digest_reads)
        self.engine_id = engine_id or f"prefill{next(_ENGINE_IDS)}"
        self.engine = Engine(model_dir, tp_size, cache_config, timeout_s=timeout_s, cpus=cpus)
        self.layout: EngineLayout = self.engine.layout
        # Renewals extend a lease up to max_lease_s after prefill, never further (issue 12:
        # forged renewals pinned blocks without limit).
        self.leases: LeaseTable[RequestHandle] = LeaseTable(
            lease_s, max_lease_s if max_lease_s is not None else MAX_LEASE_FACTOR * lease_s)
        nbytes = scratch_nbytes if scratch_nbytes is not None else default_scratch_nbytes(self.layout)
        infos = self.engine.call(PDSetup("prefill", self.engine_id, transport, nbytes, timeout_s,
                                         secret=self.key.secret,
                                         side_channel_host=side_channel_host,
                                         hot_polling=reads_need_progress(side_channel_host,
                                                                         dict(os.environ))))
        self.endpoints = [i.endpoint for i in sorted(infos, key=lambda i: i.rank)]
        # The latest releases, oldest first: bounded, as a node serves for days.
        self._released: deque[Release[RequestHandle]] = deque(maxlen=max_released)
        self.num_released = 0
        self.pushed = 0                     # requests pushed (and freed at once)
        self._announced: dict[int, str] = {}    # engine request id -> its announced id

    def prefill(self, prompt_ids, push_to: PushTarget | None = None) -> TransferParams:
        """Compute tokens 0..N-2 and keep their blocks until the decode side has read them;
        with `push_to`, write them into the decode blocks layer by layer instead."""
        if push_to is not None:
            _check_prompt(prompt_ids)
            return self._prefill_push(prompt_ids, push_to)
        rid = self.submit(prompt_ids)
        while (params := self.collect(rid)) is None:
            self.engine.step()
        return params

    def submit(self, prompt_ids, announce: Callable[[TransferParams], None] | None = None
               ) -> int:
        """Queue a prompt's prefill without running it (the caller steps the engine, as a
        server's engine loop does, batching it with others); returns the engine's request
        id for `collect`. `announce(params)` is called on the stepping thread just before
        the step that ends the prefill, with the TransferParams collect will give (its
        blocks are final then): for a decode engine to plan its reads while that step
        computes. Nothing may be read before collect has put the blocks under a lease."""
        _check_prompt(prompt_ids)
        before_last_step = None
        if announce is not None:
            def before_last_step(handle: RequestHandle) -> None:
                rid = self._announced.setdefault(handle.request_id, request_id(self.engine_id))
                announce(self._params(rid, handle))
        return self.engine.add_prefill(prompt_ids, before_last_step)

    def collect(self, engine_request_id: int) -> TransferParams | None:
        """A submitted prefill's TransferParams once its tokens are computed (its blocks
        are then under a lease), else None."""
        handle = self.engine.prefilled_handle(engine_request_id)
        if handle is None:
            return None
        rid = self._announced.pop(engine_request_id, None) or request_id(self.engine_id)
        self.leases.register(rid, handle, self.clock())
        return self._params(rid, handle)

    def _prefill_push(self, prompt_ids, target: PushTarget) -> TransferParams:
        check_push_strategy(target.strategy)     # here: a raising worker call ends a rank

        def arm(h: RequestHandle) -> None:
            b = h.blocks
            self.engine.call(ArmPush((b.num_tokens, b.attn_blocks, b.state_block), target))
        handle = self.engine.prefill_for_transfer(prompt_ids, before_last_step=arm)
        # Every rank wrote, waited and sent PushDone inside the last step: free once, now.
        self.engine.release(handle)
        self.pushed += 1
        return self._params(f"{self.engine_id}:{handle.request_id}", handle)

    def _params(self, rid: str, handle: RequestHandle) -> TransferParams:
        b = handle.blocks
        return TransferParams(self.engine_id, rid,
                              BlockTable(b.num_tokens, tuple(b.attn_blocks), b.state_block),
                              self.layout.digest, self.endpoints, self.leases.lease_s)

    def expect_readers(self, params: TransferParams, decode_engine_id: str, decode_tp: int) -> None:
        """Name the decode ranks that will read the request (known once the router chose)."""
        self._account(self.leases.expect(params.request_id,
                                         [(decode_engine_id, j) for j in range(decode_tp)]))

    def prepare_permute(self, params: TransferParams, decode_engine_id: str,
                        decode_layout: dict, decode_blocks,
                        strategies: dict[int, Strategy]) -> dict[int, dict[int, int]]:
        """Every prefill rank gathers the bytes that the decode ranks which chose permute
        (`strategies`: decode rank -> concrete strategy, DecodeNode.choose_strategies) read;
        returns prefill rank -> decode rank -> base."""
        if Strategy.AUTO in strategies.values():    # checked here: a raising call ends a rank
            raise ValueError("prepare_permute needs each decode rank's concrete strategy "
                             "(DecodeNode.choose_strategies), not auto")
        out = self.engine.call(PreparePermute(params.request_id, decode_engine_id, decode_layout,
                                              params.prefill_blocks, decode_blocks,
                                              dict(strategies)))
        return {sb.rank: dict(sb.bases) for sb in out}

    def digest_reads(self, params: TransferParams, decode_layout: dict,
                     decode_blocks) -> dict[int, dict[int, int]]:
        """Prefill rank -> decode rank -> xxh3_64 of the bytes that decode rank reads from
        it (engine/checksums.py), for DecodeNode.pull to compare after its reads."""
        if not self.checksums:
            raise ValueError("digest_reads on a prefill node with checksums=False")
        out = self.engine.call(DigestReads(params.request_id, decode_layout,
                                           params.prefill_blocks, decode_blocks))
        return {d.rank: dict(d.digests) for d in out}

    @property
    def released(self) -> list[Release[RequestHandle]]:
        """The latest releases (at most max_released), oldest first."""
        return list(self._released)

    def take_released(self) -> list[Release[RequestHandle]]:
        """The releases since the last take (a server forgets what it has handled)."""
        out = list(self._released)
        self._released.clear()
        return out

    def poll(self) -> list[Release[RequestHandle]]:
        """Apply the decode ranks' notifications and lease expiries; free released blocks.
        Returns `released`."""
        # Taken before the ranks answer, `now - age` is never later than the real arrival: a
        # renewal that arrived in time is never mistaken for a late one.
        now = self.clock()
        arrived = sorted((now - age, blob) for batch in self.engine.call(PollNotifications())
                         for age, blob in zip(batch.ages_s, batch.messages))
        for t, blob in arrived:             # in arrival order, each at its arrival time
            try:
                msg = decode(blob)
            except ProtocolError:
                continue                        # a malformed notification frees nothing
            if isinstance(msg, (ReadDone, LeaseRenew)):
                self._account(self.leases.apply(msg, t))
        for rel in self.leases.expire(now):
            self._account(rel)
        return self.released

    def _account(self, rel: Release[RequestHandle] | None) -> None:
        if rel is None:
            return
        self.engine.release(rel.blocks)
        self.engine.call(ForgetRequest(rel.request_id))
        self._released.append(rel)
        self.num_released += 1

    @property
    def num_held(self) -> int:
        """Requests whose blocks are still held for readers."""
        return len(self.leases)

    def close(self) -> None:
        self.engine.close()


def _check_prompt(prompt_ids) -> None:
    if len(prompt_ids) < 2:
        raise ValueError("a disaggregated prompt needs at least 2 tokens (N-1 prefilled here, "
                         "the last one computed by the decode engine)")


def default_scratch_nbytes(layout: EngineLayout, requests: int = 4) -> int:
    """Room for the permuted state of a few requests: the largest rank's state bytes per
    request, twice (replicated units can be read by several decode ranks)."""
    per_request = max(layout.rank(k).state_nbytes_per_request(layout.num_blocks)
                      for k in range(layout.tp_size))
    return max(1 << 20, 2 * requests * per_request)
