"""One transfer case run end to end on a transport: tagged prefill buffers, planned reads,
and the decode check against the oracle's per-coordinate values (pdbridge.plan.reference).

Used in-process with LocalTransport and, through `prefill_main` / `decode_main`, by spawned
prefill and decode processes over NIXL. Prefill ranks hold one scratch buffer split into one
slice per decode rank (each plan's permute scratch starts at 0; `shift_scratch` moves it).
"""
from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass

import numpy as np

from pdbridge.plan import SCRATCH, CopyList, RequestBlocks, TransferPlan, plan_transfer
from pdbridge.plan.reference import coord_value, held_elements
from pdbridge.spec import CacheConfig, EngineLayout, load_model_spec
from pdbridge.transport.copies import execute_plan, run_copies

TIMEOUT_S = 60.0


def tiny_config(dtype: str = "bfloat16") -> dict:
    # 12 Mamba heads, 2 B/C groups, 2 KV heads for 12 query heads: shards for TP 1..4,
    # replicated B/C and KV heads at TP 3 and 4, bf16 conv for 2-byte-granular runs.
    return dict(model_type="nemotron_h", hidden_size=48, vocab_size=64,
                hybrid_override_pattern="M*-M", num_attention_heads=12, num_key_value_heads=2,
                head_dim=8, mamba_num_heads=12, mamba_head_dim=4, ssm_state_size=4, n_groups=2,
                conv_kernel=4, dtype=dtype)


@dataclass(frozen=True)
class Case:
    prefill_tp: int
    decode_tp: int
    strategy: str = "direct"
    conv_layout: str = "DS"
    num_tokens: int = 21
    num_blocks: int = 8

    def layouts(self) -> tuple[EngineLayout, EngineLayout]:
        spec = load_model_spec(tiny_config())
        cache = CacheConfig(num_blocks=self.num_blocks, block_tokens=4, kernel_block_tokens=4,
                            conv_layout=self.conv_layout)
        return EngineLayout(spec, self.prefill_tp, cache), EngineLayout(spec, self.decode_tp, cache)

    def blocks(self) -> tuple[RequestBlocks, RequestBlocks]:
        n = -(-self.num_tokens // 4)
        # Different, non-monotonic block ids on the two sides.
        pb = RequestBlocks(self.num_tokens, tuple(range(n))[::-1], self.num_blocks - 1)
        db = RequestBlocks(self.num_tokens, tuple(range(1, n + 1)), 0)
        return pb, db

    def plans(self) -> list[TransferPlan]:
        p, d = self.layouts()
        pb, db = self.blocks()
        return [plan_transfer(p, d, j, pb, db, self.strategy) for j in range(self.decode_tp)]

    def label(self) -> str:
        return f"P{self.prefill_tp}->D{self.decode_tp}-{self.strategy}-{self.conv_layout}"


def shift_scratch(plan: TransferPlan, prefill_rank: int, base: int) -> TransferPlan:
    """The plan with prefill rank `prefill_rank`'s permute scratch moved to start at `base`."""
    moved = (plan.src_rank == prefill_rank) & (plan.src_region == SCRATCH)
    reorder = dict(plan.prefill_reorder)
    if prefill_rank in reorder:
        c = reorder[prefill_rank]
        reorder[prefill_rank] = CopyList(c.src_region, c.src_offset, c.dst_region,
                                         c.dst_offset + base, c.nbytes)
    return dataclasses.replace(plan, src_offset=np.where(moved, plan.src_offset + base,
                                                         plan.src_offset),
                               prefill_reorder=reorder)


def scratch_bases(plans: list[TransferPlan], prefill_rank: int) -> tuple[list[int], int]:
    sizes = [pl.prefill_scratch_nbytes.get(prefill_rank, 0) for pl in plans]
    return [int(x) for x in np.cumsum([0] + sizes[:-1])], int(sum(sizes))


def prefill_buffers(case: Case, rank: int, seed: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """Random regions with every element of the request tagged; reorders run into scratch."""
    layout = case.layouts()[0]
    pb = case.blocks()[0]
    rng = np.random.default_rng(seed + rank)
    bufs = [rng.integers(0, 256, r.nbytes, dtype=np.uint8) for r in layout.rank(rank).regions]
    for e in held_elements(layout, rank, pb):
        bufs[e.region][e.offset:e.offset + e.itemsize] = np.frombuffer(
            coord_value(e.coord, e.itemsize), np.uint8)
    plans = case.plans()
    bases, total = scratch_bases(plans, rank)
    scratch = np.zeros(max(total, 1), np.uint8)
    for plan, base in zip(plans, bases):
        plan = shift_scratch(plan, rank, base)
        if rank in plan.prefill_reorder:
            run_copies(plan.prefill_reorder[rank], bufs, scratch)
    return bufs, scratch


def decode_plan(case: Case, rank: int) -> TransferPlan:
    plans = case.plans()
    plan = plans[rank]
    for p in range(case.prefill_tp):
        plan = shift_scratch(plan, p, scratch_bases(plans, p)[0][rank])
    return plan


def decode_buffers(case: Case, rank: int, plan: TransferPlan) -> tuple[list[np.ndarray], np.ndarray]:
    layout = case.layouts()[1]
    bufs = [np.zeros(r.nbytes, np.uint8) for r in layout.rank(rank).regions]
    return bufs, np.zeros(max(plan.staging_nbytes, 1), np.uint8)


def decode_errors(case: Case, rank: int, bufs: list[np.ndarray]) -> list[str]:
    """Elements of the decode shard that do not hold their coordinate's value."""
    layout = case.layouts()[1]
    db = case.blocks()[1]
    bad = []
    for e in held_elements(layout, rank, db):
        got = bufs[e.region][e.offset:e.offset + e.itemsize].tobytes()
        if got != coord_value(e.coord, e.itemsize):
            bad.append(f"D{rank} {e.coord}")
    return bad


def run_local(case: Case) -> list[str]:
    """The whole case in one process over LocalTransport; returns the errors."""
    from pdbridge.transport.local import LocalTransport
    tag = f"{case.label()}-{id(case)}"
    agents, errors = [], []
    try:
        prefill = []
        for p in range(case.prefill_tp):
            t = LocalTransport(f"P{p}-{tag}")
            t.register_regions(*prefill_buffers(case, p))
            agents.append(t)
            prefill.append(t)
        for j in range(case.decode_tp):
            t = LocalTransport(f"D{j}-{tag}")
            agents.append(t)
            plan = decode_plan(case, j)
            bufs, staging = decode_buffers(case, j, plan)
            t.register_regions(bufs, staging)
            peers = {}
            for p, pt in enumerate(prefill):
                t.add_peer(pt.name, pt.metadata())
                peers[p] = pt.name
            execute_plan(t, plan, peers, bufs, staging, notify=lambda p: f"D{j}".encode())
            errors += decode_errors(case, j, bufs)
        for p, pt in enumerate(prefill):
            readers = {f"D{j}".encode() for j, pl in enumerate(case.plans()) if p in pl.source_ranks()}
            got = {m for _, m in pt.get_notifications()}
            if got != readers:
                errors.append(f"P{p} notifications {sorted(got)} != expected {sorted(readers)}")
    finally:
        for t in agents:
            t.close()
    return errors


# ---- process entry points (multiprocessing spawn) -----------------------------------------

def prefill_main(case: Case, rank: int, conn) -> None:
    """Serve reads until every decode rank that reads from this rank has notified."""
    from pdbridge.transport.nixl import NixlTransport
    import time
    t = None
    try:
        bufs, scratch = prefill_buffers(case, rank)
        t = NixlTransport(f"P{rank}")
        t.register_regions(bufs, scratch)
        conn.send(("metadata", t.metadata()))
        readers = {f"D{j}".encode() for j, pl in enumerate(case.plans()) if rank in pl.source_ranks()}
        got: set[bytes] = set()
        deadline = time.monotonic() + TIMEOUT_S
        while got != readers and time.monotonic() < deadline:
            got |= {m for _, m in t.get_notifications()}
            time.sleep(0.001)      # the passive side must poll for connections to progress
        conn.send(("done", [] if got == readers else
                   [f"P{rank} notifications {sorted(got)} != expected {sorted(readers)}"]))
    except Exception:
        conn.send(("done", [f"P{rank}: {traceback.format_exc()}"]))
    finally:
        if t is not None:
            t.close()


def decode_main(case: Case, rank: int, conn) -> None:
    from pdbridge.transport.nixl import NixlTransport
    t = None
    try:
        plan = decode_plan(case, rank)
        bufs, staging = decode_buffers(case, rank, plan)
        t = NixlTransport(f"D{rank}")
        t.register_regions(bufs, staging)
        kind, prefill_md = conn.recv()            # list of metadata, one per prefill rank
        peers = {}
        for p in plan.source_ranks():      # a prefill rank no one else reads may have exited
            t.add_peer(f"P{p}", prefill_md[p])
            peers[p] = f"P{p}"
        execute_plan(t, plan, peers, bufs, staging, timeout_s=TIMEOUT_S,
                     notify=lambda p: f"D{rank}".encode())
        conn.send(("done", decode_errors(case, rank, bufs)))
    except Exception:
        conn.send(("done", [f"D{rank}: {traceback.format_exc()}"]))
    finally:
        if t is not None:
            t.close()
