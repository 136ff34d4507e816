"""NixlTransport: reads over NIXL 1.5 (UCX), the real data plane. The only module importing nixl.

Descriptor lists are prepared once: the local list when regions are registered, one remote
list per peer in add_peer, both as power-of-two chunk levels over every region (see
chunks.py for the scheme and why). A read is a pair of index arrays handed to
make_prepped_xfer, which merges chunks adjacent on both sides back into one descriptor per
run. A `direct` pull reads through a layout pair's block rows instead (read_rows), prepared
once per peer the first time they are read. Measured facts this follows (REFERENCE.md, NIXL 1.5 on these machines):
* the progress thread spins a core, so it is off and wait()/poll() drive progress;
* the passive side must call get_notifications() about every millisecond, or connection
  set-up stalls;
* ucx_error_handling_mode=peer, so a dead peer surfaces as nixlRemoteDisconnectError
  instead of a hang; every nixl exception becomes a TransferError or a FAILED status.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pdbridge.plan.block_table import (COUNT, NBYTES, OFFSET, REGION, STRIDE, BlockRows,
                                       index_bounds)
from pdbridge.plan.transfer_plan import SCRATCH, TransferPlan

from .chunks import ChunkTable, default_grain, split_runs
from .transport import (MemKind, PeerMetadata, ReadList, TransferError, XferHandle, XferState,
                        XferStatus, as_read_list, buffer_info, check_ranges)

_IDS = itertools.count(1)


def _nixl():
    # NIXL logs INFO lines to stdout by default: keep stdout for our output (`--json`).
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from nixl._api import nixl_agent, nixl_agent_config
    for handler in logging.getLogger("nixl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return nixl_agent, nixl_agent_config


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


class _Peer:
    """A remote agent: its metadata, chunk table and prepared remote list, and its regions
    then its scratch as (addr, len, device) entries (read_descs)."""

    def __init__(self, md: PeerMetadata, table: ChunkTable, dlist: Any):
        self.md, self.table, self.dlist = md, table, dlist
        self.entries = _Entries([*md.regions, md.scratch or (0, 0, 0)])
        self.sizes = [r[1] for r in md.regions]
        self.rows: dict[tuple, _PreparedRows] = {}      # BlockRows.key -> prepared lists


# Reads of at most this many runs get one descriptor per run (NixlTransport.read_descs);
# longer ones the prepared chunk lists, whose adjacent chunks NIXL merges.
DESC_MAX_RUNS = 512


# UCX's TCP transport listens on every network interface it may use: by default only the
# loopback (issue 12: it listened on the external interface). Another host is reached by
# naming its interface in UCX_NET_DEVICES (e.g. "eth0"), which always wins over this default.
DEFAULT_NET_DEVICES = "lo"

# ucx_error_handling_mode=peer (below) keeps only lanes whose transport reports a dead peer.
# UCX's shared-memory transports (sysv, posix) report none unless asked to, so UCX left them
# out and emulated same-host reads with active messages over TCP loopback ("rma_am(tcp/lo)"
# at UCX_LOG_LEVEL=info), each read waiting for the target's next progress. Asked
# (UCX_MM_ERROR_HANDLING=y), they take the reads ("rma(sysv/memory posix/memory)": the reader
# copies) and detect a dead peer by keepalive. Measured here (issue 10, paired runs of
# `pdbridge up`, 60 requests each): the ranks' pull 1.33 -> 1.11 ms, the transfer stage 2.17
# -> 1.95 ms. Hosts apart (or UCX_TLS=tcp) still use TCP. An explicit setting wins.
DEFAULT_MM_ERROR_HANDLING = "y"


class NixlTransport:
    def __init__(self, name: str, grain_nbytes: int | None = None, num_workers: int = 1):
        os.environ.setdefault("UCX_NET_DEVICES", DEFAULT_NET_DEVICES)   # read when UCX starts
        os.environ.setdefault("UCX_MM_ERROR_HANDLING", DEFAULT_MM_ERROR_HANDLING)
        nixl_agent, nixl_agent_config = _nixl()
        self.name = name
        self._grain = grain_nbytes
        try:
            self._agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
            self._agent.create_backend("UCX", {"ucx_error_handling_mode": "peer",
                                               "num_workers": str(num_workers)})
        except Exception as e:
            raise TransferError(f"cannot start NIXL agent {name!r}: {_err(e)}") from None
        self._reg = None                # registered nixlRegDList
        self._buffers = None            # the registered buffers, kept alive while registered
        self._table: ChunkTable | None = None
        self._local_dlist = None
        self._sizes: list[int] = []
        self._scratch_nbytes = 0
        self._kind = MemKind.DRAM
        self._peers: dict[str, _Peer] = {}
        self._xfers: dict[int, Any] = {}
        self._failed: dict[int, str] = {}
        self._prepared: list[PreparedReads] = []
        self._closed = False

    # ---- registration and metadata ------------------------------------------------------

    def register_regions(self, buffers: Sequence[Any], scratch: Any | None = None,
                         zones: Sequence[Sequence[int]] | None = None) -> None:
        self._check_open()
        if self._reg is not None:
            raise TransferError(f"agent {self.name!r} already registered its regions")
        infos = [buffer_info(b) for b in [*buffers, *([scratch] if scratch is not None else [])]]
        if len({i.kind for i in infos}) > 1:
            raise TransferError("regions mix host and device memory; register one kind")
        self._kind = infos[0].kind if infos else MemKind.DRAM
        self._sizes = [i.nbytes for i in infos[:len(buffers)]]
        self._scratch_nbytes = infos[-1].nbytes if scratch is not None else 0
        live = [i for i in infos if i.nbytes > 0]
        try:
            if live:
                rows = np.asarray([(i.addr, i.nbytes, i.device) for i in live], np.uint64)
                self._reg = self._agent.register_memory(rows, self._kind.value)
            sizes = (*self._sizes, self._scratch_nbytes)
            self._zones = [list(z) for z in zones] if zones else [[0] for _ in buffers]
            self._table = ChunkTable(sizes, self._grain or default_grain(sum(sizes)),
                                     tuple(map(tuple, self._zones)) + ((0,),))
            addrs = [i.addr for i in infos] + ([] if scratch is not None else [0])
            devs = [i.device for i in infos] + ([] if scratch is not None else [0])
            self._local_dlist = self._agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", self._table.rows(addrs, devs), self._kind.value)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"registering regions of {self.name!r}: {_err(e)}") from None
        self._infos = infos
        self._buffers = (list(buffers), scratch)     # registered memory outlives its users
        n = len(self._sizes)
        self._local_entries = _Entries([(i.addr, i.nbytes, i.device) for i in infos[:n]] + [
            (infos[n].addr, infos[n].nbytes, infos[n].device) if scratch is not None
            else (0, 0, 0)])

    def metadata(self) -> bytes:
        self._check_open()
        if self._table is None:
            raise TransferError(f"agent {self.name!r}: register_regions before metadata")
        n = len(self._sizes)
        s = self._infos[n] if self._scratch_nbytes else None
        return PeerMetadata(
            agent=self.name, transport="nixl",
            regions=[(i.addr, i.nbytes, i.device) for i in self._infos[:n]],
            scratch=(s.addr, s.nbytes, s.device) if s else None, mem_kind=self._kind.value,
            grain_nbytes=self._table.grain_nbytes, zones=self._zones,
            agent_md=self._agent.get_agent_metadata()).encode()

    def add_peer(self, name: str, metadata: bytes) -> None:
        """Load the peer's agent and prepare its remote list once."""
        self._check_open()
        md = PeerMetadata.decode(metadata)
        if md.agent != name or md.transport != "nixl":
            raise TransferError(f"metadata is for {md.transport} agent {md.agent!r}, "
                                f"expected nixl agent {name!r}")
        if name in self._peers:
            return
        scratch = md.scratch or (0, 0, 0)
        entries = [*md.regions, scratch]
        zones = tuple(map(tuple, md.zones or [[0]] * len(md.regions))) + ((0,),)
        table = ChunkTable(tuple(e[1] for e in entries), md.grain_nbytes, zones)
        try:
            loaded = self._agent.add_remote_agent(md.agent_md)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                raise TransferError(f"agent metadata names {loaded!r}, expected {name!r}")
            dlist = self._agent.prep_xfer_dlist(
                name, table.rows([e[0] for e in entries], [e[2] for e in entries]), md.mem_kind)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"adding peer {name!r}: {_err(e)}") from None
        self._peers[name] = _Peer(md, table, dlist)

    # ---- reads ----------------------------------------------------------------------------

    def read(self, peer: str, reads: ReadList | TransferPlan, notify: bytes | None = None,
             prefill_rank: int | None = None) -> XferHandle:
        self._check_open()
        reads = as_read_list(reads, prefill_rank)
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        check_ranges(reads, p.sizes, p.md.region_nbytes(SCRATCH),
                     self._sizes, self._scratch_nbytes, peer)
        if 0 < len(reads) <= DESC_MAX_RUNS:
            return self.read_descs(peer, reads, notify)
        src_idx, dst_idx = self.indices(peer, reads)
        return self.read_indices(peer, src_idx, dst_idx, notify, len(reads), reads.total_nbytes)

    def read_descs(self, peer: str, reads: ReadList, notify: bytes | None = None) -> XferHandle:
        """One descriptor per run, made for this read (get_xfer_descs + initialize_xfer):
        about 0.1 us a descriptor and a few us a read in NIXL, where the chunk split that
        read_indices needs costs 0.3-1 ms of numpy for a small read list (issue 10). NIXL
        merges nothing here, so long lists of adjacent runs take the chunk path (read()
        picks by DESC_MAX_RUNS); the chunk path is the reference a test compares this with.
        Ranges must have been checked (check_ranges)."""
        p = self._peers[peer]           # every run is > 0 bytes (ReadList refuses others)
        local = self._local_entries
        try:
            h = self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(_descs(local, reads.dst_region, reads.dst_offset,
                                                  reads.nbytes), self._kind.value),
                self._agent.get_xfer_descs(_descs(p.entries, reads.src_region, reads.src_offset,
                                                  reads.nbytes), p.md.mem_kind),
                peer, notif_msg=notify or b"")
        except Exception as e:
            raise TransferError(f"read from {peer}: {_err(e)}") from None
        return self._post(h, peer, len(reads), reads.total_nbytes)

    def read_rows(self, peer: str, rows: BlockRows, indices: np.ndarray, nbytes: int,
                  notify: bytes | None = None, bounds: tuple[int, int, int] | None = None
                  ) -> XferHandle:
        """Reads as index pairs (indices[0] into the peer's rows, indices[1] into ours) into
        lists prepared from `rows` once per peer (plan/block_table.py): make_prepped_xfer
        pairs them and merges the descriptors adjacent on both sides. Each row's whole extent
        was checked against its region when prepared; here only that every index is inside
        its list (from `bounds`, made with the indices when given: no array is walked on
        the transfer's path)."""
        self._check_open()
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        lists = p.rows.get(rows.key)
        if lists is None:
            lists = p.rows[rows.key] = self._prepare_rows(peer, p, rows)
        n = indices.shape[1]
        lo, hi_remote, hi_local = bounds if bounds is not None else index_bounds(indices)
        if not n or lo < 0 or hi_remote >= lists.entries[0] or hi_local >= lists.entries[1]:
            raise TransferError(f"read from {peer}: {n} index pairs, some outside the "
                                f"prepared lists of {list(lists.entries)} entries")
        try:
            h = self._agent.make_prepped_xfer("READ", lists.local, indices[1], lists.remote,
                                              indices[0], notif_msg=notify or b"")
        except Exception as e:
            raise TransferError(f"read from {peer}: {_err(e)}") from None
        return self._post(h, peer, n, nbytes)

    def _prepare_rows(self, peer: str, p: _Peer, rows: BlockRows) -> "_PreparedRows":
        """Both sides' rows checked against their regions, then prepared (compressed rows:
        addr, len, device, stride, count)."""
        lists = []
        for side, table, sizes, entries, agent, kind in (
                ("source", rows.remote, p.sizes, p.entries, peer, p.md.mem_kind),
                ("destination", rows.local, self._sizes, self._local_entries,
                 "NIXL_INIT_AGENT", self._kind.value)):
            region, offset = table[:, REGION], table[:, OFFSET]
            n, stride, count = table[:, NBYTES], table[:, STRIDE], table[:, COUNT]
            if len(table) and (region.min() < 0 or region.max() >= len(sizes)):
                raise TransferError(f"rows for {peer}: a {side} region outside its "
                                    f"{len(sizes)} regions")
            last = offset + (count - 1) * stride + n
            bad = (offset < 0) | (n <= 0) | (count < 1) | (stride < 0) | \
                (last > np.asarray(sizes, np.int64)[region])
            if bad.any():
                i = int(np.argmax(bad))
                raise TransferError(f"rows for {peer}: {side} row {i} (region {int(region[i])}, "
                                    f"offset {int(offset[i])}, {int(count[i])} x {int(n[i])} "
                                    f"bytes {int(stride[i])} apart) outside its "
                                    f"{sizes[int(region[i])]} bytes")
            out = np.empty((len(table), 5), np.uint64)
            out[:, 0] = entries.addr[region] + offset
            out[:, 1], out[:, 2], out[:, 3], out[:, 4] = n, entries.dev[region], stride, count
            try:
                lists.append(self._agent.prep_xfer_dlist(agent, out, kind))
            except Exception as e:
                for done in lists:
                    _quietly(self._agent.release_dlist_handle, done)
                raise TransferError(f"preparing rows for {peer}: {_err(e)}") from None
        return _PreparedRows(lists[0], lists[1], rows.entries)

    def indices(self, peer: str, reads: ReadList) -> tuple[np.ndarray, np.ndarray]:
        """(remote, local) chunk indices of a read list; exposed for the benchmark."""
        p = self._peers[peer]
        last_src, last_dst = len(p.md.regions), len(self._sizes)
        src_region = np.where(reads.src_region == SCRATCH, last_src, reads.src_region)
        dst_region = np.where(reads.dst_region == SCRATCH, last_dst, reads.dst_region)
        return split_runs(p.table, src_region, reads.src_offset,
                          self._table, dst_region, reads.dst_offset, reads.nbytes)

    def read_indices(self, peer: str, src_idx: np.ndarray, dst_idx: np.ndarray,
                     notify: bytes | None, num_descriptors: int, nbytes: int,
                     merge: bool = True) -> XferHandle:
        """Submit prepared index lists (from indices()) as one transfer.

        merge=False keeps NIXL from merging adjacent chunks: the benchmark uses it to issue a
        per-(layer, block, segment) plan the way established connectors do, one descriptor each.
        """
        p = self._peers[peer]
        try:
            h = self._agent.make_prepped_xfer("READ", self._local_dlist, dst_idx, p.dlist,
                                              src_idx, notif_msg=notify or b"",
                                              skip_desc_merge=not merge)
        except Exception as e:
            raise TransferError(f"read from {peer}: {_err(e)}") from None
        return self._post(h, peer, num_descriptors, nbytes)

    def write(self, peer: str, runs: ReadList, notify: bytes | None = None) -> XferHandle:
        """Push mode: the same chunk tables as a read, local and remote roles swapped."""
        self._check_open()
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        check_ranges(runs, self._sizes, self._scratch_nbytes, [r[1] for r in p.md.regions],
                     p.md.region_nbytes(SCRATCH), peer)
        last_src, last_dst = len(self._sizes), len(p.md.regions)
        src_region = np.where(runs.src_region == SCRATCH, last_src, runs.src_region)
        dst_region = np.where(runs.dst_region == SCRATCH, last_dst, runs.dst_region)
        local_idx, remote_idx = split_runs(self._table, src_region, runs.src_offset,
                                           p.table, dst_region, runs.dst_offset, runs.nbytes)
        try:
            h = self._agent.make_prepped_xfer("WRITE", self._local_dlist, local_idx, p.dlist,
                                              remote_idx, notif_msg=notify or b"")
        except Exception as e:
            raise TransferError(f"write to {peer}: {_err(e)}") from None
        return self._post(h, peer, len(runs), runs.total_nbytes)

    def _post(self, h: Any, peer: str, num_descriptors: int, nbytes: int) -> XferHandle:
        handle = XferHandle(next(_IDS), peer, num_descriptors, nbytes)
        self._xfers[handle.id] = h
        try:
            if self._agent.transfer(h) == "ERR":
                self._failed[handle.id] = "transfer was refused (ERR)"
        except Exception as e:
            self._failed[handle.id] = _err(e)
        return handle

    def prepare_reads(self, peer: str, reads: ReadList) -> "PreparedReads":
        """Lists with exactly one descriptor per run on each side, prepared now: for a read
        repeated unchanged, and for the benchmark's per-(layer, block, segment) baseline."""
        self._check_open()
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        check_ranges(reads, p.sizes, p.md.region_nbytes(SCRATCH),
                     self._sizes, self._scratch_nbytes, peer)
        remote = p.entries
        local = _Entries([(i.addr, i.nbytes, i.device) for i in self._infos[:len(self._sizes)]]
                         + [(self._infos[-1].addr, 0, self._infos[-1].device)
                            if self._scratch_nbytes else (0, 0, 0)])
        try:
            lists = [self._agent.prep_xfer_dlist(agent, _descs(entries, region, offset, reads.nbytes),
                                                 kind)
                     for agent, entries, region, offset, kind in (
                         (peer, remote, reads.src_region, reads.src_offset, p.md.mem_kind),
                         ("NIXL_INIT_AGENT", local, reads.dst_region, reads.dst_offset,
                          self._kind.value))]
        except Exception as e:
            raise TransferError(f"preparing reads from {peer}: {_err(e)}") from None
        prepared = PreparedReads(peer, lists[0], lists[1], len(reads), reads.total_nbytes)
        self._prepared.append(prepared)
        return prepared

    def read_prepared(self, prepared: "PreparedReads", notify: bytes | None = None,
                      merge: bool = True) -> XferHandle:
        idx = np.arange(prepared.num_descriptors, dtype=np.int32)
        try:
            h = self._agent.make_prepped_xfer("READ", prepared.local, idx, prepared.remote, idx,
                                              notif_msg=notify or b"", skip_desc_merge=not merge)
        except Exception as e:
            raise TransferError(f"read from {prepared.peer}: {_err(e)}") from None
        return self._post(h, prepared.peer, prepared.num_descriptors, prepared.nbytes)

    def poll(self, handle: XferHandle) -> XferStatus:
        if handle.id in self._failed:
            return XferStatus(XferState.FAILED, self._failed[handle.id])
        h = self._xfers.get(handle.id)
        if h is None:
            raise TransferError(f"handle {handle.id} is unknown or released")
        try:
            state = self._agent.check_xfer_state(h)
        except Exception as e:
            self._failed[handle.id] = _err(e)
            return XferStatus(XferState.FAILED, self._failed[handle.id])
        if state == "DONE":
            return XferStatus(XferState.DONE)
        if state == "ERR":
            self._failed[handle.id] = "NIXL reported ERR"
            return XferStatus(XferState.FAILED, self._failed[handle.id])
        return XferStatus(XferState.PENDING)

    def wait(self, handle: XferHandle, timeout_s: float) -> XferStatus:
        """Poll without sleeping: with the progress thread off, polling is the progress. Each
        poll yields the core (sched_yield: back at once when nothing else waits for it), so a
        passive side this read waits for can run on a busy machine (issue 10: two decode
        ranks spinning on two cores held off the prefill rank's poller; with the yield the
        reads of `pdbridge bench serve` took 0.92 ms instead of 1.16, paired runs)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.poll(handle)
            if status.state is XferState.DONE:
                return status
            if status.state is XferState.FAILED:
                raise TransferError(f"transfer with {handle.peer} failed: {status.reason}")
            if time.monotonic() > deadline:
                raise TransferError(f"transfer with {handle.peer} timed out after {timeout_s} s")
            os.sched_yield()

    def release(self, handle: XferHandle) -> None:
        h = self._xfers.pop(handle.id, None)
        self._failed.pop(handle.id, None)
        if h is not None:
            try:
                self._agent.release_xfer_handle(h)
            except Exception:
                pass    # an active transfer NIXL cannot cancel; its agent teardown frees it

    # ---- notifications ---------------------------------------------------------------------

    def notify(self, peer: str, message: bytes) -> None:
        self._check_open()
        if peer not in self._peers:
            raise TransferError(f"unknown peer {peer!r}; known: {sorted(self._peers)}")
        try:
            self._agent.send_notif(peer, message)
        except Exception as e:
            raise TransferError(f"notifying {peer}: {_err(e)}") from None

    def get_notifications(self) -> list[tuple[str, bytes]]:
        if self._closed:
            return []
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as e:
            raise TransferError(f"reading notifications: {_err(e)}") from None
        return [(str(peer), bytes(m)) for peer, msgs in notifs.items() for m in msgs]

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release transfers, prepared lists, peers and registrations, in that order."""
        if self._closed:
            return
        self._closed = True
        for hid in list(self._xfers):
            self.release(XferHandle(hid, "", 0, 0))
        for name, p in self._peers.items():
            for lists in p.rows.values():
                _quietly(self._agent.release_dlist_handle, lists.remote)
                _quietly(self._agent.release_dlist_handle, lists.local)
            _quietly(self._agent.release_dlist_handle, p.dlist)
            _quietly(self._agent.remove_remote_agent, name)
        for pr in self._prepared:
            _quietly(self._agent.release_dlist_handle, pr.remote)
            _quietly(self._agent.release_dlist_handle, pr.local)
        self._prepared.clear()
        self._peers.clear()
        if self._local_dlist is not None:
            _quietly(self._agent.release_dlist_handle, self._local_dlist)
        if self._reg is not None:
            _quietly(self._agent.deregister_memory, self._reg)
        self._local_dlist = self._reg = self._buffers = None

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"nixl agent {self.name!r} is closed")

    def __enter__(self) -> "NixlTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _PreparedRows:
    remote: Any             # the peer's rows, prepared
    local: Any              # ours, prepared
    entries: tuple[int, int]    # entries of each list: (remote, local)


@dataclass(frozen=True)
class PreparedReads:
    peer: str
    remote: Any             # prepared remote list, one descriptor per run
    local: Any              # prepared local list, one descriptor per run
    num_descriptors: int
    nbytes: int


class _Entries:
    """An agent's regions then its scratch as (addr, len, device), and as arrays (_descs)."""

    def __init__(self, entries: list[tuple[int, int, int]]):
        self.rows = list(entries)
        self.addr = np.asarray([e[0] for e in entries], np.int64)
        self.dev = np.asarray([e[2] for e in entries], np.int64)

    def __iter__(self):
        return iter(self.rows)


def _descs(entries: _Entries, region: np.ndarray, offset: np.ndarray,
           nbytes: np.ndarray) -> np.ndarray:
    """Nx3 (addr, len, device) for runs; region SCRATCH (-1) picks the last entry."""
    out = np.empty((len(nbytes), 3), np.uint64)
    out[:, 0] = entries.addr[region] + offset
    out[:, 1] = nbytes
    out[:, 2] = entries.dev[region]
    return out


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        pass
