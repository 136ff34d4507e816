"""The worker calls of P/D disaggregation: what rank 0 of an engine asks every rank to do.

Each call runs on every rank of one engine (`pdbridge.engine.messages`); the handler names a
method of that rank's PrefillRank or DecodeRank (`pd.<method>`), created by PDSetup.

`ChooseStrategy` and `Pull` are RankRequests instead: the decode node sends them to each
decode rank over its rank channel (rank_channel.py), outside the TP group's lockstep calls,
so a pull costs one socket round trip and does not wait for, or hold up, a model step.
"""
from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from pdbridge.plan import Strategy

from .messages import WorkerCall


class PDSetup(WorkerCall):
    """Open this rank's transport agent, register its cache regions and scratch buffer;
    a prefill rank also starts serving its metadata (handshake) and polling notifications."""
    handler: ClassVar[str] = "setup_pd"
    collect: ClassVar[bool] = True
    role: str                   # "prefill" | "decode"
    engine_id: str
    transport: str              # "nixl" | "local"
    scratch_nbytes: int
    timeout_s: float = 30.0
    transfer_mode: str = "pull"     # "pull" | "push": push decode ranks poll for PushDone
    # The side channel's shared secret (transport/side_channel_key.py), from the node: each
    # worker process would otherwise make its own. Crosses only the engine's own TP group.
    secret: bytes = b""
    # Prefill: the address its metadata server binds (and decode ranks of other hosts
    # reach); the loopback unless the node is told otherwise.
    side_channel_host: str = "127.0.0.1"
    # Prefill: whether reads of this rank wait for its progress (over TCP), so that its
    # poller polls fast after a forward (pd_rank.reads_need_progress).
    hot_polling: bool = True


class PDRankInfo(msgspec.Struct):
    rank: int
    endpoint: str               # prefill: the metadata server's address; decode: ""
    scratch_nbytes: int
    agent_metadata: bytes = b""     # this rank's transport metadata (push: decode ranks')
    channel: str = ""               # decode: its rank channel's address (rank_channel.py)


class RankRequest(msgspec.Struct, tag=True):
    """What the decode node asks one decode rank over its rank channel; `handler` names the
    DecodeRank method that answers it."""
    handler: ClassVar[str]


class ChooseStrategy(RankRequest):
    """Decode ranks: plan this rank's reads of one request with `strategy` and report the
    concrete strategy the plan chose. `auto` is resolved here, once, by the decode side's
    cost model; the prefill side is then told the choice instead of re-deciding it. The
    plan is kept for the Pull that follows (DecodeRank's plan cache)."""
    handler: ClassVar[str] = "choose_strategy"
    prefill_layout: dict[str, Any]          # EngineLayout.to_dict() of the prefill engine
    prefill_blocks: tuple[int, tuple[int, ...], int]   # RequestBlocks fields
    decode_blocks: tuple[int, tuple[int, ...], int]
    strategy: Strategy


class StrategyChoice(msgspec.Struct):
    rank: int
    strategy: Strategy                      # concrete, unless the request could not be planned
    error: str = ""                         # why it could not (the pull reports it again)


class PreparePermute(WorkerCall):
    """Prefill ranks: gather into scratch, in destination order, what each decode rank of
    one decode engine that chose `permute` will read (DESIGN.md section 4)."""
    handler: ClassVar[str] = "pd.prepare_permute"
    collect: ClassVar[bool] = True
    request_id: str
    decode_engine_id: str
    decode_layout: dict[str, Any]           # EngineLayout.to_dict() of the decode engine
    prefill_blocks: tuple[int, tuple[int, ...], int]   # RequestBlocks fields
    decode_blocks: tuple[int, tuple[int, ...], int]
    strategies: dict[int, Strategy]         # decode rank -> its concrete strategy (ChooseStrategy)


class ScratchBases(msgspec.Struct):
    """Per decode rank, where this prefill rank put its permuted bytes in its scratch."""
    rank: int
    bases: dict[int, int]


class DigestReads(WorkerCall):
    """Prefill ranks: for every decode rank of one decode engine whose reads this rank
    serves, the xxh3_64 of those source bytes (engine/checksums.py)."""
    handler: ClassVar[str] = "pd.digest_reads"
    collect: ClassVar[bool] = True
    request_id: str
    decode_layout: dict[str, Any]           # EngineLayout.to_dict() of the decode engine
    prefill_blocks: tuple[int, tuple[int, ...], int]   # RequestBlocks fields
    decode_blocks: tuple[int, tuple[int, ...], int]


class ReadDigests(msgspec.Struct):
    """Per decode rank, the digest of what it reads from this prefill rank."""
    rank: int
    digests: dict[int, int]
    error: str = ""             # the request could not be planned here (no digests)


class FlipByte(WorkerCall):
    """Fault injection (tests, drills): rank `rank` inverts one byte of one of its cache
    regions; the other ranks do nothing."""
    handler: ClassVar[str] = "pd.flip_byte"
    rank: int
    region: int
    offset: int


class ForgetRequest(WorkerCall):
    """Prefill ranks: free the scratch a request's permute used."""
    handler: ClassVar[str] = "pd.forget"
    request_id: str


class PollNotifications(WorkerCall):
    """Prefill ranks: the notifications (encoded ReadDone / LeaseRenew) received so far."""
    handler: ClassVar[str] = "pd.poll_notifications"
    collect: ClassVar[bool] = True


class Notifications(msgspec.Struct):
    rank: int
    messages: list[bytes]
    # Per message, seconds it had waited here when this batch was made: a duration on this
    # rank's clock, which the receiver places on its own clock (instants would tie both sides
    # to one clock, and tests to real time).
    ages_s: list[float]


class Pull(RankRequest):
    """Decode ranks: plan this rank's reads of one request and pull them; every rank of the
    decode engine runs it with the same arguments and plans for itself. With `auto` each rank
    resolves the strategy itself, in this one call; a rank whose choice needs the prefill
    side to prepare (permute) answers needs_prepare instead of reading (PullResult)."""
    handler: ClassVar[str] = "pull"
    request_id: str
    prefill_engine_id: str
    prefill_layout: dict[str, Any]          # EngineLayout.to_dict() of the prefill engine
    endpoints: list[str]                    # metadata server of each prefill rank
    prefill_blocks: tuple[int, tuple[int, ...], int]
    decode_blocks: tuple[int, tuple[int, ...], int]
    strategy: Strategy
    scratch_bases: dict[int, dict[int, int]] = {}   # prefill rank -> decode rank -> base
    timeout_s: float = 30.0
    renew_every_s: float = 0.0              # > 0: renew the prefill lease this often while reading
    strategies: dict[int, Strategy] = {}    # decode rank -> concrete choice; overrides strategy
    # Checksums on: prefill rank -> decode rank -> digest (DigestReads), compared after the
    # reads; None: off, nothing is digested.
    checksums: dict[int, dict[int, int]] | None = None
    # > 0: before its pull, the rank times one bare NIXL read of this many bytes (one
    # descriptor) and its notification (DecodeRank._probe): the transfer floor measured in
    # place, on the same agents and cores at the same moment (`serve --floor-probe`).
    probe_nbytes: int = 0


class PullBatch(RankRequest):
    """Decode ranks: several requests' Pulls in one round trip, their reads in flight
    together (DecodeRank.pull_batch); one PullResult per pull, in order."""
    handler: ClassVar[str] = "pull_batch"
    pulls: list[Pull]


class PlanAhead(RankRequest):
    """Decode ranks: plan these pulls now and keep each plan, its source ranks' metadata
    fetched, for the Pull of the same request, which then only reads (DecodeRank.plan_ahead):
    sent while the prefill engine still computes the request, so planning is off the
    transfer's path. It reads nothing and fails nothing: a pull that cannot be planned here
    is planned (and failed) by its Pull as usual, and a Pull whose inputs differ from what was
    planned ahead plans afresh."""
    handler: ClassVar[str] = "plan_ahead"
    pulls: list[Pull]


class PlannedAhead(msgspec.Struct):
    rank: int
    planned: int                            # of PlanAhead.pulls, the plans kept


class PullPhases(msgspec.Struct):
    """One decode rank's pull, piece by piece (seconds on that rank)."""
    plan_s: float = 0.0                     # plan_transfer (or the block rows' indices), or
                                            # 0 when the cached plan served
    peers_s: float = 0.0                    # directory: metadata of the source ranks
    read_s: float = 0.0                     # NIXL reads posted, waited, local restore
    verify_s: float = 0.0                   # checksums
    notify_s: float = 0.0                   # 0: ReadDone goes out after the reply
    plan_cached: bool = False
    block_rows: bool = False                # read through the layout pair's block rows
                                            # (direct, PlanCache.block_reads), no plan made
    planned_ahead: bool = False             # planned (and peers fetched) by a PlanAhead
    probe_s: float = 0.0                    # Pull.probe_nbytes: the bare read + notification,
    probe_nbytes: int = 0                   # before the pull (not in its seconds); 0: none


class PullResult(msgspec.Struct):
    rank: int
    ok: bool
    detail: str = ""
    strategy: str = ""                      # the concrete strategy (auto resolves to one)
    sources: list[int] = []
    nbytes: int = 0
    descriptors: int = 0
    seconds: float = 0.0                    # on this rank: the Pull's arrival to its end
    phases: PullPhases | None = None        # where those seconds went (pull mode)
    # Nothing was read: this rank's plan (`strategy`, e.g. what `auto` chose) reads what its
    # prefill ranks must first gather into scratch (permute), and the Pull brought no scratch
    # bases for it. The node asks the prefill side to prepare, then pulls this rank again.
    needs_prepare: bool = False


class PullBatchResult(msgspec.Struct):
    rank: int
    results: list[PullResult]               # one per PullBatch.pulls, in their order


# ---- push mode -------------------------------------------------------------------------------

class PushTarget(msgspec.Struct, frozen=True):
    """Where a prefill engine writes one request in push mode, every fact once: the decode
    engine's blocks (allocated before prefill starts), its layout (digest checked on arrival,
    never re-derived) and each decode rank's transport metadata. May cross a network."""
    push_id: str                            # the decode engine's name for it, echoed in PushDone
    decode_engine_id: str
    decode_layout: dict[str, Any]           # EngineLayout.to_dict(), with its digest
    agents: list[bytes]                     # per decode rank: its transport metadata
    decode_blocks: tuple[int, tuple[int, ...], int]   # RequestBlocks fields
    strategy: Strategy = Strategy.DIRECT
    timeout_s: float = 30.0                 # for the prefill ranks' writes
    checksums: bool = False                 # digest what is written, sent in PushDone


class ArmPush(WorkerCall):
    """Prefill ranks: the next Step ends this request's prefill; after each layer of it,
    write that layer's final bytes into every decode rank this rank serves, then notify."""
    handler: ClassVar[str] = "pd.arm_push"
    prefill_blocks: tuple[int, tuple[int, ...], int]
    target: PushTarget


class AwaitPush(WorkerCall):
    """Decode ranks: wait until every prefill rank this rank's plan reads from has reported
    (PushDone) writing its share of push_id; answers a PullResult."""
    handler: ClassVar[str] = "pd.await_push"
    collect: ClassVar[bool] = True
    push_id: str
    prefill_engine_id: str
    prefill_layout: dict[str, Any]
    prefill_blocks: tuple[int, tuple[int, ...], int]
    decode_blocks: tuple[int, tuple[int, ...], int]
    timeout_s: float = 30.0
    checksums: bool = False                 # compare what landed with each PushDone's digest
