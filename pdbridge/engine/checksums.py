"""Transfer checksums: one xxh3_64 per (prefill rank, decode rank) of the bytes a transfer moves.

Both sides digest the same byte mapping, run by run in plan order: the `direct` plan of the
decode rank (plan_transfer), which both sides compute alike from the two layouts and block
tables. The prefill rank digests each run's source range in its cache; the decode rank, once
its reads and local copies have ended, each run's destination range in its cache. `staging`
and `permute` only reroute the small state runs of that same mapping (through a scratch
buffer, plan/strategies.py), so the final destination ranges, which are what the request
decodes from, are compared whatever strategy moved them, and a scratch corrupted on the way
is caught too. KV and every recurrent state (conv, SSM) are in the plan, hence digested.

The digest is streamed over the ranges (no copy of the request's bytes on the host; device
buffers are copied one run at a time).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import xxhash

from pdbridge.plan import RequestBlocks, Strategy, TransferPlan, plan_transfer
from pdbridge.spec import EngineLayout

ALGORITHM = "xxh3_64"


class ChecksumMismatch(RuntimeError):
    """The bytes a decode rank received differ from what the prefill rank digested."""


def checksum_plan(prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                  prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks,
                  plan: TransferPlan | None = None) -> TransferPlan:
    """The plan whose runs are digested: `plan` itself when it is direct (no second plan)."""
    if plan is not None and plan.strategy is Strategy.DIRECT:
        return plan
    return plan_transfer(prefill, decode, decode_rank, prefill_blocks, decode_blocks,
                         Strategy.DIRECT)


def _host_bytes(buf: Any) -> tuple[Any, bool]:
    """(a uint8 view of `buf` on the host, or `buf` itself when it lives on a device; on host?)."""
    if isinstance(buf, np.ndarray):
        return buf, True
    if buf.device.type == "cpu":
        return buf.numpy(), True        # a view, no copy
    return buf, False


def digest_ranges(buffers: Sequence[Any], region: np.ndarray, offset: np.ndarray,
                  nbytes: np.ndarray) -> int:
    """xxh3_64 of the concatenation of buffers[region[i]][offset[i] : +nbytes[i]], in order."""
    h = xxhash.xxh3_64()
    views = [_host_bytes(b) for b in buffers]
    for g, a, n in zip(region.tolist(), offset.tolist(), nbytes.tolist()):
        view, on_host = views[g]
        if not 0 <= a <= a + n <= len(view):
            raise ChecksumMismatch(f"range [{a}, {a + n}) outside region {g} ({len(view)} bytes)")
        piece = view[a:a + n]
        h.update(memoryview(piece if on_host else piece.cpu().numpy()))
    return h.intdigest()


def source_digest(plan: TransferPlan, prefill_rank: int, buffers: Sequence[Any]) -> int:
    """Prefill side: the source ranges `plan` reads from this rank."""
    idx = plan.reads_from(prefill_rank)
    return digest_ranges(buffers, plan.src_region[idx], plan.src_offset[idx], plan.nbytes[idx])


def dest_digest(plan: TransferPlan, prefill_rank: int, buffers: Sequence[Any]) -> int:
    """Decode side: where the runs from `prefill_rank` ended in this rank's cache."""
    idx = plan.reads_from(prefill_rank)
    return digest_ranges(buffers, plan.dst_region[idx], plan.dst_offset[idx], plan.nbytes[idx])


def verify(plan: TransferPlan, buffers: Sequence[Any], expected: dict[int, int]) -> None:
    """Raise ChecksumMismatch naming every (prefill rank, decode rank) whose bytes differ
    (`expected`: prefill rank -> its digest for this decode rank; a missing one is a mismatch)."""
    bad = []
    for p in plan.source_ranks():
        got = dest_digest(plan, p, buffers)
        want = expected.get(p)
        if want is None:
            bad.append(f"prefill rank {p} -> decode rank {plan.decode_rank}: no checksum sent")
        elif want != got:
            bad.append(f"prefill rank {p} -> decode rank {plan.decode_rank}: expected "
                       f"{want:#018x}, received {got:#018x}")
    if bad:
        raise ChecksumMismatch(f"{ALGORITHM} checksum mismatch: " + "; ".join(bad))
