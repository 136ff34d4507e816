"""The Transport interface: how a decode rank pulls bytes out of a prefill rank's caches.

A transport owns one agent (one process-side endpoint). It registers that rank's cache
regions (the byte buffers EngineLayout.rank(r).regions describes, in that order) plus an
optional scratch buffer (region id SCRATCH), exports opaque metadata bytes that the
handshake carries to peers, and reads lists of (src region, src offset) -> (dst region,
dst offset, nbytes) runs from a peer into its own regions. Completion notifications carry
caller bytes to the peer that was read from (DESIGN.md section 5, step 3).

Two implementations: LocalTransport (in-process copies, the embedded default and the test
double) and NixlTransport (NIXL over UCX). Invalid requests (unknown peer, a run outside a
region, a misaligned run) raise TransferError at submission; failures while a read is in
flight (peer gone) are reported by poll() as XferState.FAILED with a reason, and wait()
raises. Nothing fails silently.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import msgspec
import numpy as np

from pdbridge.plan.block_table import BlockRows
from pdbridge.plan.transfer_plan import SCRATCH, TransferPlan


class TransferError(RuntimeError):
    """A read that cannot be submitted or did not complete; the message says why."""


class XferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class MemKind(enum.Enum):
    DRAM = "DRAM"       # host memory: numpy arrays, CPU torch tensors
    VRAM = "VRAM"       # device memory: CUDA torch tensors


@dataclass(frozen=True)
class XferStatus:
    state: XferState
    reason: str = ""    # why, when FAILED


@dataclass(frozen=True)
class XferHandle:
    """One submitted read; the transport that issued it owns its resources."""
    id: int
    peer: str
    num_descriptors: int     # descriptors as submitted (before any transport-side merging)
    nbytes: int


@dataclass(frozen=True)
class BufferInfo:
    """Where a registered byte buffer lives."""
    addr: int
    nbytes: int
    device: int         # CUDA device index; 0 for host memory
    kind: MemKind


def buffer_info(buf: Any) -> BufferInfo:
    """Address and size of a contiguous uint8 numpy array or torch tensor."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise TransferError(f"buffers must be contiguous 1-D uint8 arrays, got "
                                f"dtype={buf.dtype} shape={buf.shape}")
        return BufferInfo(buf.ctypes.data, buf.nbytes, 0, MemKind.DRAM)
    if type(buf).__module__.startswith("torch"):
        if buf.dim() != 1 or buf.element_size() != 1 or not buf.is_contiguous():
            raise TransferError(f"buffers must be contiguous 1-D uint8 tensors, got "
                                f"dtype={buf.dtype} shape={tuple(buf.shape)}")
        cuda = buf.device.type == "cuda"
        return BufferInfo(buf.data_ptr(), buf.numel(), (buf.device.index or 0) if cuda else 0,
                          MemKind.VRAM if cuda else MemKind.DRAM)
    raise TransferError(f"unsupported buffer type {type(buf).__name__}; "
                        f"allowed: numpy uint8 array, torch uint8 tensor")


@dataclass(frozen=True)
class ReadList:
    """Runs to read from one peer: src region/offset on the peer, dst region/offset here.
    A write (push mode) takes the same runs the other way round: src here, dst on the peer.

    Region ids index the registered regions; SCRATCH names the scratch buffer of that side.
    """
    src_region: np.ndarray      # int32
    src_offset: np.ndarray      # int64, bytes
    dst_region: np.ndarray      # int32
    dst_offset: np.ndarray      # int64, bytes
    nbytes: np.ndarray          # int64

    def __post_init__(self):
        n = len(self.nbytes)
        for f in ("src_region", "src_offset", "dst_region", "dst_offset"):
            if len(getattr(self, f)) != n:
                raise TransferError(f"ReadList.{f} has {len(getattr(self, f))} entries, "
                                    f"nbytes has {n}")
        if n and int(np.min(self.nbytes)) <= 0:
            raise TransferError("ReadList.nbytes must be > 0 for every run")

    def __len__(self) -> int:
        return len(self.nbytes)

    @property
    def total_nbytes(self) -> int:
        return int(np.sum(self.nbytes))

    @staticmethod
    def from_plan(plan: TransferPlan, prefill_rank: int) -> "ReadList":
        """The reads of `plan` served by one prefill rank."""
        if plan.source_ranks() == [prefill_rank]:   # one source rank: the plan's own arrays
            pick = lambda a, dt: a.astype(dt, copy=False)      # noqa: E731
        else:
            i = plan.reads_from(prefill_rank)
            pick = lambda a, dt: a[i].astype(dt, copy=False)   # noqa: E731
        return ReadList(pick(plan.src_region, np.int32), pick(plan.src_offset, np.int64),
                        pick(plan.dst_region, np.int32), pick(plan.dst_offset, np.int64),
                        pick(plan.nbytes, np.int64))


class PeerMetadata(msgspec.Struct, frozen=True):
    """What a peer needs to read from an agent: its name and every region's place and size."""
    agent: str
    transport: str                          # "local" | "nixl": refuse cross-kind pairs
    regions: list[tuple[int, int, int]]     # (addr, nbytes, device) per region, in order
    scratch: tuple[int, int, int] | None    # the scratch buffer, if registered
    mem_kind: str                           # MemKind value of every region
    grain_nbytes: int = 0                   # NIXL: chunk grain of the prepared lists
    zones: list[list[int]] = []             # NIXL: chunk-grid origins per region (chunks.py)
    agent_md: bytes = b""                   # NIXL agent metadata blob

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def decode(blob: bytes) -> "PeerMetadata":
        try:
            return msgspec.msgpack.decode(blob, type=PeerMetadata)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise TransferError(f"malformed transport metadata: {e}") from None

    def region_nbytes(self, region: int) -> int:
        if region == SCRATCH:
            return self.scratch[1] if self.scratch else 0
        return self.regions[region][1]


def check_ranges(reads: ReadList, src_sizes: Sequence[int], src_scratch: int,
                 dst_sizes: Sequence[int], dst_scratch: int, peer: str) -> None:
    """Raise TransferError naming the first run outside its source or destination region."""
    for side, region, offset, sizes, scratch in (
            ("source", reads.src_region, reads.src_offset, src_sizes, src_scratch),
            ("destination", reads.dst_region, reads.dst_offset, dst_sizes, dst_scratch)):
        if not len(region):
            continue
        if region.min() < SCRATCH or region.max() >= len(sizes):
            i = int(np.argmax((region < SCRATCH) | (region >= len(sizes))))
            raise TransferError(f"read {i} from {peer}: {side} region {int(region[i])} does not "
                                f"exist ({len(sizes)} regions, SCRATCH={SCRATCH})")
        lengths = np.array([*sizes, scratch], np.int64)     # SCRATCH (-1) -> the last entry
        end = offset + reads.nbytes
        if offset.min() < 0 or (end > lengths[region]).any():
            i = int(np.argmax((offset < 0) | (end > lengths[region])))
            raise TransferError(f"read {i} from {peer}: {side} region {int(region[i])} bytes "
                                f"[{int(offset[i])}, {int(end[i])}) outside its "
                                f"{int(lengths[region[i]])} bytes")


class Transport(Protocol):
    """One agent's data plane. Handles are released by close() if not before."""

    name: str

    def register_regions(self, buffers: Sequence[Any], scratch: Any | None = None,
                         zones: Sequence[Sequence[int]] | None = None) -> None:
        """Register this rank's regions (region id = position) and an optional scratch buffer.

        `zones` (optional, per region) are offsets where runs tend to start alike on every
        engine (chunks.layout_zones); a hint for NixlTransport's index scheme, never needed
        for correctness."""

    def metadata(self) -> bytes:
        """Opaque bytes a peer passes to add_peer (the handshake carries them)."""

    def add_peer(self, name: str, metadata: bytes) -> None:
        """Learn a peer (its regions) so that read() can target it."""

    def read(self, peer: str, reads: ReadList | TransferPlan, notify: bytes | None = None,
             prefill_rank: int | None = None) -> XferHandle:
        """Start reading `reads` from `peer`; `notify` is delivered to the peer on success."""

    def read_rows(self, peer: str, rows: BlockRows, indices: np.ndarray, nbytes: int,
                  notify: bytes | None = None, bounds: tuple[int, int, int] | None = None
                  ) -> XferHandle:
        """Start reading the entries of `rows` that `indices` pairs (row 0 the peer's, row 1
        ours; plan/block_table.py), `nbytes` in all. `bounds`: the indices' least, and
        greatest of each row, where the caller has them (BlockReads.bounds)."""

    def write(self, peer: str, runs: ReadList, notify: bytes | None = None) -> XferHandle:
        """Start writing `runs` into `peer` (push mode): src region/offset HERE, dst
        region/offset on the peer, the direction of a read reversed; `notify` is delivered
        to the peer once the bytes are there."""

    def poll(self, handle: XferHandle) -> XferStatus:
        """Progress and report a read or write without blocking."""

    def wait(self, handle: XferHandle, timeout_s: float) -> XferStatus:
        """Block until DONE; raise TransferError on FAILED or timeout."""

    def release(self, handle: XferHandle) -> None:
        """Free a finished read's resources (close() frees any left)."""

    def notify(self, peer: str, message: bytes) -> None:
        """Send a standalone notification to a peer."""

    def get_notifications(self) -> list[tuple[str, bytes]]:
        """(peer, message) received since the last call; also drives passive progress."""

    def close(self) -> None:
        """Release every handle, list and registration; idempotent."""


def as_read_list(reads: ReadList | TransferPlan, prefill_rank: int | None) -> ReadList:
    if isinstance(reads, ReadList):
        return reads
    if prefill_rank is None:
        ranks = reads.source_ranks()
        if len(ranks) != 1:
            raise TransferError(f"plan reads from prefill ranks {ranks}: pass prefill_rank")
        prefill_rank = ranks[0]
    return ReadList.from_plan(reads, prefill_rank)
