"""Input checks for plan_transfer: one ValueError naming the field that is wrong.

Physical dim order may differ between the engines (SD vs DS conv, attention layouts): the
planner works by dim name. Everything else about a tensor must match.
"""
from __future__ import annotations

from pdbridge.spec import BLOCK, TOKEN, EngineLayout, StateTensor

from .transfer_plan import RequestBlocks


def check_geometry(prefill: EngineLayout, decode: EngineLayout) -> None:
    p_tensors, d_tensors = prefill.tensors, decode.tensors
    p_keys, d_keys = [t.key for t in p_tensors], [t.key for t in d_tensors]
    if p_keys != d_keys:
        extra = sorted(set(p_keys) ^ set(d_keys))[:3]
        raise ValueError(f"tensors differ between prefill and decode (e.g. {extra}; check "
                         f"kv_packed and the model)")
    for p, d in zip(p_tensors, d_tensors):
        for name, pv, dv in _tensor_fields(p, d):
            if pv != dv:
                raise ValueError(f"layer {p.layer} tensor {p.name!r}: {name} differs: "
                                 f"prefill {pv!r}, decode {dv!r}")


def _tensor_fields(p: StateTensor, d: StateTensor):
    yield "dtype", p.dtype, d.dtype
    yield "paged", p.paged, d.paged
    yield "sharded_dim", p.sharded_dim, d.sharded_dim
    yield "segments", p.segments, d.segments
    yield "dims", _dim_extents(p), _dim_extents(d)


def _dim_extents(t: StateTensor) -> dict[str, int]:
    return {x.name: x.extent for x in t.dims if x.name not in (BLOCK, TOKEN, t.sharded_dim)}


def check_request(prefill: EngineLayout, decode: EngineLayout, decode_rank: int,
                  prefill_blocks: RequestBlocks, decode_blocks: RequestBlocks) -> None:
    if not 0 <= decode_rank < decode.tp_size:
        raise ValueError(f"decode_rank={decode_rank} is outside decode tp_size {decode.tp_size}")
    if prefill_blocks.num_tokens != decode_blocks.num_tokens:
        raise ValueError(f"num_tokens differs: prefill {prefill_blocks.num_tokens}, "
                         f"decode {decode_blocks.num_tokens}")
    for side, layout, blocks in (("prefill", prefill, prefill_blocks),
                                 ("decode", decode, decode_blocks)):
        _check_blocks(side, layout, blocks)


def used_attn_blocks(layout: EngineLayout, blocks: RequestBlocks) -> tuple[int, ...]:
    return blocks.attn_blocks[:-(-blocks.num_tokens // layout.block_tokens)]


def _check_blocks(side: str, layout: EngineLayout, blocks: RequestBlocks) -> None:
    num_blocks = layout.num_blocks
    if layout.has_paged:
        used = used_attn_blocks(layout, blocks)
        need = -(-blocks.num_tokens // layout.block_tokens)
        if len(used) < need:
            raise ValueError(f"{side} attn_blocks: {len(blocks.attn_blocks)} blocks of "
                             f"{layout.block_tokens} tokens cannot hold num_tokens="
                             f"{blocks.num_tokens} (need {need})")
        if used and max(used) >= num_blocks:
            bad = next(b for b in used if b >= num_blocks)
            raise ValueError(f"{side} attn_blocks: block id {bad} >= num_blocks {num_blocks}")
        if len(set(used)) != len(used):
            raise ValueError(f"{side} attn_blocks: a block id appears twice in {used}")
    if layout.has_state and blocks.state_block >= num_blocks:
        raise ValueError(f"{side} state_block={blocks.state_block} >= num_blocks "
                         f"{layout.num_blocks}")
