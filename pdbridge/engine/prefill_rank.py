"""PrefillRank: a prefill TP rank's side of P/D disaggregation.

It serves its metadata (handshake) to decode ranks, collects their ReadDone / LeaseRenew
notifications for the node's next poll, gathers permuted bytes into its scratch when asked,
digests what decode ranks read (checksums), and in push mode writes each layer's bytes into
the decode ranks (pd_push.PushSender). Its metadata server and poller thread close in close().
"""
from __future__ import annotations

import threading
import time
from typing import Any

from pdbridge.plan import CopyList, RequestBlocks, Strategy, plan_transfer
from pdbridge.transport.copies import run_copies
from pdbridge.transport.handshake import MetadataServer, RankMetadata
from pdbridge.transport.messages import RegionAddr, encode
from pdbridge.transport.transport import buffer_info

from . import checksums
from .pd_calls import (ArmPush, DigestReads, ForgetRequest, Notifications, PDRankInfo,
                       PDSetup, PollNotifications, PreparePermute, ReadDigests, ScratchBases)
from .pd_push import PushSender
from .pd_rank import RankBase
from .scratch_allocator import ScratchAllocator

# Notifications waiting for the node's next poll, at most (issue 12: a flood of 60 KB
# messages grew a prefill process by 1 GB). Beyond it a message is dropped and counted; a
# dropped ReadDone only delays its blocks' release until the lease expires.
MAX_INBOX_NBYTES = 8 << 20


class PrefillRank(RankBase):
    def __init__(self, worker: Any, call: PDSetup):
        super().__init__(worker, call)
        self.scratch_alloc = ScratchAllocator(0 if self.scratch is None else len(self.scratch))
        self._inbox: list[tuple[float, bytes]] = []
        self._inbox_nbytes, self.inbox_dropped = 0, 0
        self._lock = threading.Lock()
        self.push = PushSender(self.rank, self.engine_id, self.layout, self.transport,
                               self._agent_lock, self._layout, self.caches.region_buffers)
        regions = tuple(RegionAddr(buffer_info(b).addr, buffer_info(b).nbytes)
                        for b in self.caches.region_buffers)
        scratch = None if self.scratch is None else RegionAddr(self.scratch.ctypes.data,
                                                               len(self.scratch))
        meta = RankMetadata(self.engine_id, self.rank, self.layout, self.transport.metadata(),
                            regions, scratch)
        self.server = MetadataServer(meta, bind=f"tcp://{call.side_channel_host}:*",
                                     on_notification=lambda m: self._keep(encode(m)),
                                     key=self.key)
        self._start_poller(self._keep)

    def info(self) -> PDRankInfo:
        info = super().info()
        info.endpoint = self.server.endpoint
        return info

    # ---- notifications -------------------------------------------------------------------

    def _keep(self, message: bytes) -> None:
        with self._lock:
            if self._inbox_nbytes + len(message) > MAX_INBOX_NBYTES:
                self.inbox_dropped += 1
                return
            self._inbox_nbytes += len(message)
            self._inbox.append((time.monotonic(), message))

    def poll_notifications(self, call: PollNotifications) -> Notifications:
        with self._lock:
            out, self._inbox, self._inbox_nbytes = self._inbox, [], 0
        now = time.monotonic()
        return Notifications(self.rank, [m for _, m in out], [now - t for t, _ in out])

    # ---- push mode (pd_push.py) ----------------------------------------------------------

    def arm_push(self, call: ArmPush) -> None:
        self.push.arm(call)

    def layer_hook(self):
        """The model's per-layer callback for the coming forward, if a push is armed."""
        if not self.push.armed:
            return None
        buffers = self.caches.region_buffers
        if not (buffers and getattr(buffers[0], "is_cuda", False)):
            return self.push.after_layer
        import torch

        def after_layer(layer: int) -> None:
            torch.cuda.current_stream().synchronize()   # the layer's cache writes have landed
            self.push.after_layer(layer)
        return after_layer

    def finish_push(self, error: str = "") -> None:
        self.push.finish(error)

    # ---- permute, checksums ------------------------------------------------------------

    def prepare_permute(self, call: PreparePermute) -> ScratchBases:
        """Gather, for every decode rank that chose permute, its bytes from this rank.

        The decode ranks' choice is taken as given, never re-decided here: with `auto` this
        side's cost model may differ from theirs (calibrated elsewhere), and a rank whose
        plan reads a scratch nobody filled fails its pull."""
        decode = self._layout(call.decode_layout)
        pblocks, dblocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        bases = {}
        for j, strategy in sorted(call.strategies.items()):
            if strategy is not Strategy.PERMUTE:
                continue
            plan = plan_transfer(self.layout, decode, j, pblocks, dblocks, Strategy.PERMUTE)
            copies = plan.prefill_reorder.get(self.rank)
            if copies is None or not len(copies):
                continue
            base = self.scratch_alloc.allocate(call.request_id, plan.prefill_scratch_nbytes[self.rank])
            run_copies(_shift(copies, dst=base), self.caches.region_buffers, self.scratch)
            bases[j] = base
        return ScratchBases(self.rank, bases)

    def digest_reads(self, call: DigestReads) -> ReadDigests:
        """The digest of the source bytes each decode rank reads from this rank. Reported,
        not raised: a decode rank left without one fails its checksum."""
        decode = self._layout(call.decode_layout)
        pblocks, dblocks = RequestBlocks(*call.prefill_blocks), RequestBlocks(*call.decode_blocks)
        digests = {}
        try:
            for j in range(decode.tp_size):
                plan = checksums.checksum_plan(self.layout, decode, j, pblocks, dblocks)
                if len(plan.reads_from(self.rank)):
                    digests[j] = checksums.source_digest(plan, self.rank, self.caches.region_buffers)
        except Exception as e:
            return ReadDigests(self.rank, {}, f"{type(e).__name__}: {e}")
        return ReadDigests(self.rank, digests)

    def forget(self, call: ForgetRequest) -> None:
        self.scratch_alloc.free(call.request_id)

    def close(self) -> None:
        self.server.close()         # no notification arrives after this
        super().close()


def _shift(copies: CopyList, dst: int) -> CopyList:
    return CopyList(copies.src_region, copies.src_offset, copies.dst_region,
                    copies.dst_offset + dst, copies.nbytes)
