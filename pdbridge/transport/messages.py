"""The typed messages of the P/D control plane, and their one wire format (msgpack).

Handshake (DESIGN.md section 5): a decode rank asks a prefill rank for its metadata once,
and gets back the NIXL agent metadata, the base address and length of every registered
region, and the whole EngineLayout (rebuilt and digest-checked on the decode side).
Request lifecycle: a decode rank tells each prefill rank it read from that it is done
(`ReadDone`), and renews the prefill rank's lease on the request's blocks while it reads
(`LeaseRenew`). The transports carry these as opaque bytes from `encode`.

Every message is a msgspec Struct in one tagged union, so `decode` either returns a
validated message of a known type or raises ProtocolError: nothing is unpickled, nothing
is split back out of a formatted string.
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

PROTOCOL_VERSION = 1
MAX_MESSAGE_NBYTES = 16 << 20    # a reply carries agent metadata + a model config: KiBs


class ProtocolError(ValueError):
    """Bytes that are not a valid message (malformed, wrong type, too large)."""


class _Message(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    pass


class MetadataRequest(_Message, tag="metadata_request"):
    """A decode rank asks for one prefill rank's metadata."""
    decode_engine_id: str
    decode_rank: int
    decode_layout_digest: str
    engine_id: str | None = None        # the prefill engine the asker expects, if it knows
    rank: int | None = None             # the prefill rank the asker expects, if it knows
    protocol_version: int = PROTOCOL_VERSION


class RegionAddr(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One registered memory region: where it starts in the owner's address space."""
    base_addr: int
    nbytes: int


class MetadataReply(_Message, tag="metadata_reply"):
    engine_id: str
    rank: int
    agent_metadata: bytes               # opaque, from Transport.metadata()
    regions: list[RegionAddr]           # one per EngineLayout.rank(rank).regions, same order
    layout: dict[str, Any]              # EngineLayout.to_dict()
    digest: str                         # EngineLayout.digest, checked after the rebuild
    scratch: RegionAddr | None = None   # the permute scratch buffer, if registered
    protocol_version: int = PROTOCOL_VERSION


class ErrorReply(_Message, tag="error_reply"):
    """The request was refused: `field` names what was wrong, `detail` says why."""
    field: str
    detail: str


class ReadDone(_Message, tag="read_done"):
    """Decode rank (decode_engine_id, decode_rank) finished its reads of request_id."""
    request_id: str
    decode_engine_id: str
    decode_rank: int
    ok: bool = True
    detail: str = ""
    readers: int = 0        # ReadDones the request gets in all (vllm/: the decode TP); 0: unsaid


class LeaseRenew(_Message, tag="lease_renew"):
    """Decode rank is still reading request_id: keep its blocks."""
    request_id: str
    decode_engine_id: str
    decode_rank: int


class PushDone(_Message, tag="push_done"):
    """Push mode: prefill rank (prefill_engine_id, prefill_rank) finished writing its share
    of push_id into decode rank decode_rank (ok), or could not (detail says why)."""
    push_id: str
    prefill_engine_id: str
    prefill_rank: int
    decode_rank: int
    ok: bool = True
    detail: str = ""
    nbytes: int = 0
    digest: int | None = None   # checksums on: xxh3_64 of the bytes written (engine/checksums.py)


class FloorProbe(_Message, tag="floor_probe"):
    """The notification of a decode rank's bare read (Pull.probe_nbytes: the floor `pdbridge
    bench serve` divides the transfer stage by). It names no request and frees nothing."""
    decode_engine_id: str
    decode_rank: int


class Ack(_Message, tag="ack"):
    """Reply to a notification sent over a request/reply socket."""
    request_id: str = ""


Message = Union[MetadataRequest, MetadataReply, ErrorReply, ReadDone, LeaseRenew, PushDone,
                FloorProbe, Ack]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, max_nbytes: int = MAX_MESSAGE_NBYTES) -> Message:
    """Parse one message; any problem becomes ProtocolError naming what was wrong."""
    if len(data) > max_nbytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_nbytes}")
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid message: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed message: {e}") from None
