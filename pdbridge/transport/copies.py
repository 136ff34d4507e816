"""Byte copies between registered buffers on one rank, and running a plan's local steps.

A rank's buffers are its EngineLayout regions (region id = position) plus an optional
scratch buffer (region id SCRATCH). `run_copies` executes a CopyList over them: the
prefill side's `prefill_reorder` (before the reads, for `permute`) and the decode side's
`decode_restore` (after them, for `staging` and `permute`). `execute_plan` is the decode
side of one request: one read per prefill rank, wait, restore.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pdbridge.plan.block_table import BlockReads
from pdbridge.plan.transfer_plan import SCRATCH, CopyList, TransferPlan

from .transport import ReadList, TransferError, Transport, XferHandle


def copy_bytes(dst: Any, dst_offset: int, src: Any, src_offset: int, nbytes: int) -> None:
    """dst[dst_offset : +nbytes] = src[src_offset : +nbytes] for numpy arrays or torch tensors."""
    d = dst[dst_offset:dst_offset + nbytes]
    s = src[src_offset:src_offset + nbytes]
    if isinstance(d, np.ndarray) and isinstance(s, np.ndarray):
        np.copyto(d, s)
        return
    import torch        # only torch buffers get here
    td = d if isinstance(d, torch.Tensor) else torch.from_numpy(d)
    ts = s if isinstance(s, torch.Tensor) else torch.from_numpy(s)
    td.copy_(ts, non_blocking=False)


def buffer_for(regions: Sequence[Any], scratch: Any | None, region: int) -> Any:
    if region == SCRATCH:
        if scratch is None:
            raise TransferError("a copy uses SCRATCH but no scratch buffer is registered")
        return scratch
    if not 0 <= region < len(regions):
        raise TransferError(f"region {region} does not exist ({len(regions)} regions)")
    return regions[region]


def run_copies(copies: CopyList, regions: Sequence[Any], scratch: Any | None = None) -> int:
    """Execute a CopyList on local buffers; returns bytes copied. Bounds are checked first."""
    for i in range(len(copies)):
        for region, offset in ((copies.src_region[i], copies.src_offset[i]),
                               (copies.dst_region[i], copies.dst_offset[i])):
            buf = buffer_for(regions, scratch, int(region))
            if offset < 0 or offset + copies.nbytes[i] > len(buf):
                raise TransferError(f"copy {i}: region {int(region)} bytes [{int(offset)}, "
                                    f"{int(offset + copies.nbytes[i])}) outside its {len(buf)}")
    for i in range(len(copies)):
        copy_bytes(buffer_for(regions, scratch, int(copies.dst_region[i])), int(copies.dst_offset[i]),
                   buffer_for(regions, scratch, int(copies.src_region[i])), int(copies.src_offset[i]),
                   int(copies.nbytes[i]))
    return int(np.sum(copies.nbytes))


def start_plan(transport: Transport, plan: TransferPlan, peers: Mapping[int, str],
               notify: Callable[[int], bytes | None] | None = None) -> list[XferHandle]:
    """Submit one read per prefill rank the plan reads from; `peers` maps rank -> agent name."""
    handles = []
    try:
        for rank in plan.source_ranks():
            if rank not in peers:
                raise TransferError(f"plan reads from prefill rank {rank}; no peer known for it")
            msg = notify(rank) if notify else None
            handles.append(transport.read(peers[rank], ReadList.from_plan(plan, rank), msg))
    except Exception:
        for h in handles:
            transport.release(h)
        raise
    return handles


def start_reads(transport: Transport, reads: BlockReads, peers: Mapping[int, str]
                ) -> list[XferHandle]:
    """start_plan for a request read through block rows (PlanCache.block_reads): one
    read per prefill rank, index pairs into rows the transport prepares once."""
    handles = []
    try:
        bounds = reads.bounds or [None] * len(reads.reads)
        for (rows, indices, nbytes), b in zip(reads.reads, bounds):
            if rows.prefill_rank not in peers:
                raise TransferError(f"reads from prefill rank {rows.prefill_rank}; no peer "
                                    f"known for it")
            handles.append(transport.read_rows(peers[rows.prefill_rank], rows, indices,
                                               nbytes, bounds=b))
    except Exception:
        for h in handles:
            transport.release(h)
        raise
    return handles


def wait_reads(transport: Transport, handles: Sequence[XferHandle], timeout_s: float) -> None:
    """Wait for every read, then release them all (also when one failed)."""
    try:
        for h in handles:
            transport.wait(h, timeout_s)
    finally:
        for h in handles:
            transport.release(h)


def check_staging(plan: TransferPlan, scratch: Any | None) -> None:
    """TransferError if the plan needs more staging bytes than the scratch has."""
    if plan.staging_nbytes and (scratch is None or len(scratch) < plan.staging_nbytes):
        raise TransferError(f"plan needs {plan.staging_nbytes} staging bytes; scratch has "
                            f"{0 if scratch is None else len(scratch)}")


def finish_plan(transport: Transport, plan: TransferPlan, handles: Sequence[XferHandle],
                regions: Sequence[Any], scratch: Any | None = None,
                timeout_s: float = 30.0) -> None:
    """After start_plan: wait for every read, release them all, run decode_restore."""
    wait_reads(transport, handles, timeout_s)
    run_copies(plan.decode_restore, regions, scratch)


def execute_plan(transport: Transport, plan: TransferPlan, peers: Mapping[int, str],
                 regions: Sequence[Any], scratch: Any | None = None, timeout_s: float = 30.0,
                 notify: Callable[[int], bytes | None] | None = None) -> None:
    """Decode side of one request: read from every source rank, wait, run decode_restore.

    The prefill ranks must already have run their `prefill_reorder` (permute).
    """
    check_staging(plan, scratch)
    finish_plan(transport, plan, start_plan(transport, plan, peers, notify), regions, scratch,
                timeout_s)
