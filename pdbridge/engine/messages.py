"""The calls rank 0 sends to every rank of its engine: small msgspec structs, one per call.

A call type names the Worker method that runs it (`handler`, "pd.pull" for a method of one of
its parts) and whether rank 0 collects every rank's result (`collect`, e.g. each rank's region
addresses) or uses only its own (a model step, whose logits are the same on every rank). New calls (pull blocks over NIXL, export regions) are
new subclasses, here or in their own module (imported on every rank before use): the dispatch
is generic.
"""
from __future__ import annotations

from typing import Any, ClassVar, Union

import msgspec


class WorkerCall(msgspec.Struct, tag=True):
    handler: ClassVar[str]
    collect: ClassVar[bool] = False


class Step(WorkerCall):
    """One forward over a flattened batch (the fields of pdbridge.model.ForwardBatch)."""
    handler: ClassVar[str] = "step"
    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    state_slots: list[int]


class Describe(WorkerCall):
    """Each rank's layout digest and region sizes: a start-up barrier and a consistency check
    (and the torch threads it computes with)."""
    handler: ClassVar[str] = "describe"
    collect: ClassVar[bool] = True


class RankInfo(msgspec.Struct):
    rank: int
    layout_digest: str
    region_nbytes: list[int]
    torch_threads: int = 0      # torch's intra-op threads in the rank's process


class Shutdown(WorkerCall):
    handler: ClassVar[str] = "shutdown"


def _all_call_types() -> tuple[type, ...]:
    out, todo = [], [WorkerCall]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return tuple(out)


_decoders: dict[tuple[type, ...], msgspec.msgpack.Decoder] = {}


def encode(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def decode_call(data: bytes) -> WorkerCall:
    """Any WorkerCall subclass defined so far (both sides import the same modules)."""
    types = _all_call_types()
    if types not in _decoders:
        _decoders[types] = msgspec.msgpack.Decoder(Union[types])   # type: ignore[valid-type]
    return _decoders[types].decode(data)
