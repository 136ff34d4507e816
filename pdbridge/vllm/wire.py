"""What the connector's halves tell each other, one msgspec struct per crossing.

* `RemotePrefill`: the kv_transfer_params a prefill server returns and the client hands to the
  decode server (JSON over HTTP, so a dict at vLLM's edge; parsed here, once, refusing a bad
  field by name).
* `StepMeta`: the scheduler's word to its workers each step (vLLM pickles it across processes).
"""
from __future__ import annotations

import msgspec


class ParamsError(ValueError):
    """kv_transfer_params that cannot drive a transfer; the message names the field."""


class RemotePrefill(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Where a prefilled request's bytes are and what they cover."""
    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int                # side-channel port of prefill rank 0; rank r: + r
    remote_tp_size: int
    remote_num_tokens: int          # tokens whose KV and state the prefill server holds
    remote_attn_blocks: list[int]
    remote_state_block: int
    do_remote_prefill: bool = True
    do_remote_decode: bool = False

    def endpoint(self, rank: int) -> str:
        return f"tcp://{self.remote_host}:{self.remote_port + rank}"

    @classmethod
    def parse(cls, params: dict) -> "RemotePrefill":
        try:
            return msgspec.convert(params, cls)
        except msgspec.ValidationError as e:
            raise ParamsError(f"kv_transfer_params: {e}") from None


class Recv(msgspec.Struct, frozen=True):
    """One request a decode worker reads (or, with no blocks, only releases on prefill)."""
    request_id: str
    remote: RemotePrefill
    num_tokens: int
    attn_blocks: list[int]
    state_block: int
    notify_only: bool = False


class StepMeta(msgspec.Struct):
    recv: list[Recv] = []
    send: dict[str, float] = {}     # prefill request id -> lease seconds
