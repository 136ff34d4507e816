"""CostModel: a plan's expected time, to let `auto` pick a strategy.

Defaults come from the NIXL 1.5 measurements in REFERENCE.md ("NIXL 1.5 on these machines"):
large same-host READs run at 13-14 GB/s (13.5 here); small non-adjacent descriptors are bound
by one system call each, 1.4 GB/s at 4 KiB, i.e. ~2.9 us per descriptor (3 us here); a
single-thread numpy copy reaches 14.3 GB/s on 1 GiB, less on the small strided copies a
restore makes (10 GB/s here). Each local copy also costs its call: 12 restore copies of a
small request took 95 us through transport/copies.run_copies (8 us a copy), more than the 11
descriptors they saved. All fields are configurable: calibrate on the real transport.

A plan that needs its prefill ranks to prepare (permute: they gather into scratch before the
decode rank reads) also costs a round trip to the prefill side before any read starts: one
call to the prefill server and its engine loop, 2-4 ms measured here over HTTP at TP 1 -> 2
(issue 10; `pdbridge bench serve`), against 0.2 ms for the whole read of a small request. So
`auto` takes permute only where the descriptors it saves are worth more than that.
"""
from __future__ import annotations

from dataclasses import dataclass

from .transfer_plan import TransferPlan


@dataclass(frozen=True)
class CostModel:
    descriptor_us: float = 3.0      # fixed cost per transfer descriptor
    transfer_gbps: float = 13.5     # bytes moved by the transport, GB/s
    copy_gbps: float = 10.0         # local copies (prefill reorder, decode restore), GB/s
    copy_us: float = 8.0            # fixed cost per local copy call (run_copies)
    prepare_us: float = 2000.0      # the round trip to the prefill side a prepared plan needs

    def __post_init__(self):
        for name in ("descriptor_us", "transfer_gbps", "copy_gbps", "copy_us", "prepare_us"):
            v = getattr(self, name)
            if not v >= 0 or (name.endswith("gbps") and v == 0):
                raise ValueError(f"CostModel.{name} must be positive, got {v!r}")

    def plan_us(self, plan: TransferPlan) -> float:
        """Expected microseconds for the decode rank's reads plus the local copies around them."""
        copies = [plan.decode_restore, *plan.prefill_reorder.values()]
        copy_nbytes = sum(int(c.nbytes.sum()) for c in copies)
        copy_count = sum(len(c) for c in copies)
        prepared = any(len(c) for c in plan.prefill_reorder.values())
        return (plan.num_descriptors * self.descriptor_us
                + plan.total_nbytes / (self.transfer_gbps * 1e3)
                + copy_nbytes / (self.copy_gbps * 1e3) + copy_count * self.copy_us
                + (self.prepare_us if prepared else 0.0))
