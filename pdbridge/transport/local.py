"""LocalTransport: agents in one process reading each other's buffers with plain copies.

The embedded default (prefill and decode in one process) and the test double for
NixlTransport: the same checks (unknown peer, runs outside a region), the same
notifications, and a FAILED status when the peer has closed, as NIXL reports a
disconnected peer. Reads complete at submission; poll() only reports.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Sequence

import numpy as np

from pdbridge.plan.block_table import BlockRows
from pdbridge.plan.transfer_plan import TransferPlan

from .copies import buffer_for, copy_bytes
from .transport import (PeerMetadata, ReadList, TransferError, XferHandle, XferState, XferStatus,
                        as_read_list, buffer_info, check_ranges)

_AGENTS: dict[str, "LocalTransport"] = {}     # the in-process registry: open agents by name
_LOCK = threading.Lock()
_IDS = itertools.count(1)


class LocalTransport:
    def __init__(self, name: str):
        with _LOCK:
            if name in _AGENTS:
                raise TransferError(f"a local agent named {name!r} is already open")
            _AGENTS[name] = self
        self.name = name
        self._regions: list[Any] = []
        self._scratch: Any | None = None
        self._peers: dict[str, PeerMetadata] = {}
        self._status: dict[int, XferStatus] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self._closed = False

    # ---- registration and metadata ------------------------------------------------------

    def register_regions(self, buffers: Sequence[Any], scratch: Any | None = None,
                         zones: Sequence[Sequence[int]] | None = None) -> None:
        self._check_open()
        for b in [*buffers, *([scratch] if scratch is not None else [])]:
            buffer_info(b)          # validates type and contiguity
        self._regions, self._scratch = list(buffers), scratch

    def metadata(self) -> bytes:
        infos = [buffer_info(b) for b in self._regions]
        s = buffer_info(self._scratch) if self._scratch is not None else None
        return PeerMetadata(
            agent=self.name, transport="local",
            regions=[(i.addr, i.nbytes, i.device) for i in infos],
            scratch=(s.addr, s.nbytes, s.device) if s else None,
            mem_kind=infos[0].kind.value if infos else "DRAM").encode()

    def add_peer(self, name: str, metadata: bytes) -> None:
        self._check_open()
        md = PeerMetadata.decode(metadata)
        if md.agent != name or md.transport != "local":
            raise TransferError(f"metadata is for {md.transport} agent {md.agent!r}, "
                                f"expected local agent {name!r}")
        self._peers[name] = md

    # ---- reads ----------------------------------------------------------------------------

    def read(self, peer: str, reads: ReadList | TransferPlan, notify: bytes | None = None,
             prefill_rank: int | None = None) -> XferHandle:
        self._check_open()
        reads = as_read_list(reads, prefill_rank)
        md = self._peers.get(peer)
        if md is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        check_ranges(reads, [r[1] for r in md.regions], md.region_nbytes(-1),
                     [len(b) for b in self._regions],
                     len(self._scratch) if self._scratch is not None else 0, peer)
        handle = XferHandle(next(_IDS), peer, len(reads), reads.total_nbytes)
        remote = _AGENTS.get(peer)
        if remote is None or remote._closed:
            self._status[handle.id] = XferStatus(XferState.FAILED, f"peer {peer!r} is gone")
            return handle
        for i in range(len(reads)):
            copy_bytes(buffer_for(self._regions, self._scratch, int(reads.dst_region[i])),
                       int(reads.dst_offset[i]),
                       buffer_for(remote._regions, remote._scratch, int(reads.src_region[i])),
                       int(reads.src_offset[i]), int(reads.nbytes[i]))
        if notify is not None:
            remote._deliver(self.name, notify)
        self._status[handle.id] = XferStatus(XferState.DONE)
        return handle

    def read_rows(self, peer: str, rows: BlockRows, indices: np.ndarray, nbytes: int,
                  notify: bytes | None = None, bounds: tuple[int, int, int] | None = None
                  ) -> XferHandle:
        """NixlTransport.read_rows by its reference: the index pairs expanded to runs
        (BlockRows.runs), read as any read list (ranges checked)."""
        try:
            runs = rows.runs(indices)
        except (IndexError, ValueError) as e:
            raise TransferError(f"read from {peer}: index pairs outside the rows: {e}") from None
        return self.read(peer, ReadList(runs.src_region, runs.src_offset, runs.dst_region,
                                        runs.dst_offset, runs.nbytes), notify)

    def write(self, peer: str, runs: ReadList, notify: bytes | None = None) -> XferHandle:
        self._check_open()
        md = self._peers.get(peer)
        if md is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        check_ranges(runs, [len(b) for b in self._regions],
                     len(self._scratch) if self._scratch is not None else 0,
                     [r[1] for r in md.regions], md.region_nbytes(-1), peer)
        handle = XferHandle(next(_IDS), peer, len(runs), runs.total_nbytes)
        remote = _AGENTS.get(peer)
        if remote is None or remote._closed:
            self._status[handle.id] = XferStatus(XferState.FAILED, f"peer {peer!r} is gone")
            return handle
        for i in range(len(runs)):
            copy_bytes(buffer_for(remote._regions, remote._scratch, int(runs.dst_region[i])),
                       int(runs.dst_offset[i]),
                       buffer_for(self._regions, self._scratch, int(runs.src_region[i])),
                       int(runs.src_offset[i]), int(runs.nbytes[i]))
        if notify is not None:
            remote._deliver(self.name, notify)
        self._status[handle.id] = XferStatus(XferState.DONE)
        return handle

    def poll(self, handle: XferHandle) -> XferStatus:
        if handle.id not in self._status:
            raise TransferError(f"handle {handle.id} is unknown or released")
        return self._status[handle.id]

    def wait(self, handle: XferHandle, timeout_s: float) -> XferStatus:
        deadline = time.monotonic() + timeout_s
        status = self.poll(handle)
        while status.state is XferState.PENDING and time.monotonic() < deadline:
            time.sleep(0.0001)
            status = self.poll(handle)
        if status.state is XferState.FAILED:
            raise TransferError(f"read from {handle.peer} failed: {status.reason}")
        if status.state is XferState.PENDING:
            raise TransferError(f"read from {handle.peer} timed out after {timeout_s} s")
        return status

    def release(self, handle: XferHandle) -> None:
        self._status.pop(handle.id, None)

    # ---- notifications ---------------------------------------------------------------------

    def notify(self, peer: str, message: bytes) -> None:
        self._check_open()
        if peer not in self._peers:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        remote = _AGENTS.get(peer)
        if remote is None or remote._closed:
            raise TransferError(f"peer {peer!r} is gone")
        remote._deliver(self.name, message)

    def _deliver(self, sender: str, message: bytes) -> None:
        with _LOCK:
            self._inbox.append((sender, bytes(message)))

    def get_notifications(self) -> list[tuple[str, bytes]]:
        with _LOCK:
            out, self._inbox = self._inbox, []
        return out

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._status.clear()
        self._peers.clear()
        self._regions, self._scratch = [], None
        with _LOCK:
            if _AGENTS.get(self.name) is self:
                del _AGENTS[self.name]

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"local agent {self.name!r} is closed")

    def __enter__(self) -> "LocalTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
