"""What crosses the HTTP boundaries between router, prefill servers and decode servers: one
typed msgspec struct per message, JSON on the wire, every fact once.

    router  -- GET  /pd/info ---------------> any node      NodeInfo (model, tokenizer, load)
    router  -- POST /pd/prefill ------------> prefill       PrefillRequest -> TransferParams
                                                            (announce: PrefillEvent lines)
    router  -- POST /pd/decode -------------> decode        TransferRequest -> TokenEvent lines
                                                            (announced: then PrefillComputed)
    decode  -- POST /pd/prepare_permute ----> prefill       PermuteRequest -> PermuteBases
    decode  -- POST /pd/digest_reads -------> prefill       DigestRequest -> ReadDigests
    router  -- POST /pd/generate -----------> both          GenerateRequest -> TokenEvent lines

Token streams are newline-delimited JSON, one TokenEvent per line; the last one has a
finish_reason or an error.

Announced prefills (PrefillRequest.announce, what the router asks): the prefill server
answers two PrefillEvent lines, the request's TransferParams just before the step that ends
its prefill (blocks allocated, not yet computed), then `computed` (or an error). The router
passes the first on to the decode server at once (TransferRequest.computed False: it
allocates and its ranks plan their reads while that step runs) and the second as a
PrefillComputed line on the same request body, where the decode server's transfer starts.
"""
from __future__ import annotations

import enum
from typing import Any

import msgspec

from pdbridge.engine.request import SamplingParams
from pdbridge.plan import Strategy

from .transfer_params import TransferParams


class Role(enum.Enum):
    PREFILL = "prefill"     # computes prompts, serves their state to decode servers
    DECODE = "decode"       # pulls a prompt's state, generates
    BOTH = "both"           # one monolithic engine: prompt and generation here


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Sampling(_Wire):
    """SamplingParams on the wire (validated again where it becomes one)."""
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def params(self) -> SamplingParams:
        return SamplingParams(self.max_tokens, self.temperature, self.top_p, self.top_k,
                              self.seed, self.ignore_eos, self.stop_token_ids)


class NodeLoad(_Wire):
    running: int                # requests with blocks (decoding, or prefilled and held)
    waiting: int                # queued for blocks or compute
    blocks_total: int
    blocks_free: int
    held: int = 0               # prefill: requests whose blocks await their readers


class NodeInfo(_Wire):
    role: Role
    engine_id: str
    model: str                  # the name clients use (the model directory's name)
    tp_size: int
    max_model_len: int          # prompt + generated tokens one request may have
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_json: str | None
    chat_template: str | None
    load: NodeLoad
    layout_digest: str = ""     # prefill: its EngineLayout's digest (the handshake checks it)
    transfer_mode: str = "pull"
    checksums: bool = False
    healthy: bool = True
    error: str = ""


class PrefillRequest(_Wire):
    prompt_ids: tuple[int, ...]
    decode_engine_id: str       # the decode engine chosen for it: its ranks will read
    decode_tp: int
    announce: bool = False      # answer PrefillEvent lines (announced, computed), not params


class PrefillEvent(_Wire):
    """One line of an announced prefill's answer: its params just before its last step
    (computed False; nothing may be read yet), then once computed (its blocks held under a
    lease until read), or an error, the last line."""
    params: TransferParams | None = None
    computed: bool = False
    error: str | None = None


class TransferRequest(_Wire):
    """Everything a decode server needs to start a prefilled request. Without params (a
    one-token prompt has nothing to prefill elsewhere) the decode server computes it."""
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    params: TransferParams | None = None
    prefill_url: str = ""       # the prefill server, for permute and checksums
    # False: the params were announced before the prefill was computed; the decode server
    # allocates and plans now and transfers on the PrefillComputed line that follows
    computed: bool = True


class PrefillComputed(_Wire):
    """The prefill of an announced request (TransferParams.request_id) was computed, or
    failed (`error`: the decode server then recomputes or fails it, its failure policy)."""
    request_id: str
    error: str | None = None


class GenerateRequest(_Wire):
    prompt_ids: tuple[int, ...]
    sampling: Sampling


class PermuteRequest(_Wire):
    request_id: str
    decode_engine_id: str
    decode_layout: dict[str, Any]
    decode_blocks: tuple[int, tuple[int, ...], int]
    strategies: dict[int, Strategy]     # decode rank -> concrete strategy (never auto)


class PermuteBases(_Wire):
    bases: dict[int, dict[int, int]]    # prefill rank -> decode rank -> scratch base


class DigestRequest(_Wire):
    request_id: str
    decode_layout: dict[str, Any]
    decode_blocks: tuple[int, tuple[int, ...], int]


class ReadDigests(_Wire):
    digests: dict[int, dict[int, int]]  # prefill rank -> decode rank -> xxh3_64


class PullParts(_Wire):
    """Where the slowest decode rank's pull went (seconds on that rank; PullPhases)."""
    plan_s: float = 0.0         # planning; 0 when the rank's plan cache served
    peers_s: float = 0.0        # metadata of the prefill ranks read from
    read_s: float = 0.0         # NIXL reads posted and waited, local restore
    verify_s: float = 0.0       # checksums
    notify_s: float = 0.0       # ReadDone to the prefill ranks (sent after the reply: 0)
    other_s: float = 0.0        # the rest: the layout lookup, a cached plan, the answer


PULL_PARTS = tuple(f[:-2] for f in PullParts.__struct_fields__)     # plan, peers, ...


class Probe(_Wire):
    """The transfer floor of one probed request (`serve --floor-probe`), measured in place:
    the slowest decode rank's bare NIXL read + notification, before its pull."""
    seconds: float
    nbytes: int                 # that rank's bytes (the last pull's: DecodeNode.probe_every)


class TransferStats(_Wire):
    """One request's transfer stage as the decode server saw it, end to end and in parts."""
    nbytes: int
    descriptors: int
    seconds: float              # from receiving the request (an announced one: the word that
                                # its prefill was computed) to its state in place (end to end:
                                # the ranks' pulls returned, before the engine loop takes it)
    recomputed: bool
    strategies: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    queued_s: float = 0.0       # of `seconds`: waiting for the engine loop and the transfer
                                # thread (steps, backlog, earlier transfers)
    pull_s: float = 0.0         # the slowest decode rank's own pull: plan, read, notify
    pull_parts: PullParts | None = None     # of pull_s, in parts (pull mode)
    probe: Probe | None = None  # probed (the floor measured before its pull, in `seconds`)
    planned_ahead: bool = False # every rank read from a plan made while the prefill ran


class TokenEvent(_Wire):
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None    # FinishReason value; set on the last event
    error: str | None = None            # the request failed; the last event
    transfer: TransferStats | None = None   # on the first event of a decode stream


class ErrorBody(_Wire):
    error: str
    field: str | None = None


_encoder = msgspec.json.Encoder()


def encode(obj: msgspec.Struct) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, kind: type):
    """One struct of `kind` from JSON; msgspec.ValidationError / DecodeError if it is not."""
    return msgspec.json.decode(data, type=kind)


def event_line(event: TokenEvent | PrefillEvent) -> bytes:
    return _encoder.encode(event) + b"\n"
