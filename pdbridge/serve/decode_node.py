"""DecodeNode: a decode engine (TP = d worker processes) that starts requests from state pulled
off a prefill engine, and falls back to recomputing the prompt when a pull fails.

Each decode rank plans and pulls its own reads (DecodeRank.pull), asked over its rank channel
(engine/rank_channel.py) rather than through the TP group; the last prompt token then runs as
an ordinary decode step (query_len 1, context N-1) in the engine's decode batch.

Errors split two ways. A transfer that fails (read error, timeout, prefill peer gone, checksum
mismatch) goes to the failure policy: recompute here, or fail the request (PullFailed). A
geometry or configuration that can never work (the prefill layout does not meet this one,
another protocol version) is refused at once, in one line naming the field (TransferRefused):
recomputing would hide a broken deployment. A decode worker that dies (EngineError) fails the
request with that error, and its blocks are freed.

Push mode (`transfer_mode="push"`): blocks are allocated first and their table sent to the
prefill engine (`push_target`), whose ranks write into them layer by layer; `await_push`
waits for every writer's PushDone, then decodes, or recomputes / fails like a failed pull.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass
from typing import Callable

import msgspec

from pdbridge.engine.llm_engine import Engine, EngineError, RequestHandle
from pdbridge.engine.pd_calls import (AwaitPush, ChooseStrategy, PDSetup, PlanAhead, PlannedAhead,
                                     Pull, PullBatch, PullBatchResult, PullResult, PushTarget,
                                     StrategyChoice)
from pdbridge.engine.rank_channel import Asked, RankChannel
from pdbridge.engine.rank_channel import encode as channel_encode
from pdbridge.engine.request import SamplingParams
from pdbridge.plan import PUSH_STRATEGIES, Strategy, parse_strategy
from pdbridge.plan.strategies import STAGE_ALIGN
from pdbridge.spec import CacheConfig, EngineLayout
from pdbridge.transport.compat import GeometryMismatch, check_compatible
from pdbridge.transport.handshake import HandshakeError, PeerTimeout, request
from pdbridge.transport.messages import ErrorReply, MetadataReply, MetadataRequest
from pdbridge.transport.side_channel_key import SideChannelKey, load_key

from .transfer_params import TransferParams

_ENGINE_IDS = itertools.count()
CHANNEL_SLACK_S = 5.0       # beyond a pull's own deadlines, before a rank counts as silent
# A prefill server's refusals that no retry or recompute can cure: its protocol differs.
REFUSED_FIELDS = ("protocol_version",)


class OnFailure(enum.Enum):
    RECOMPUTE = "recompute"     # compute the prompt here instead (the default)
    FAIL = "fail"               # end the request with an error


class TransferMode(enum.Enum):
    PULL = "pull"               # decode ranks read after the prefill ends (DESIGN.md section 5)
    PUSH = "push"               # prefill ranks write into decode blocks, layer by layer


def parse_transfer_mode(mode: "TransferMode | str") -> TransferMode:
    try:
        return TransferMode(mode)
    except ValueError:
        raise ValueError(f"transfer_mode={mode!r}; allowed: "
                         f"{', '.join(m.value for m in TransferMode)}") from None


class PullFailed(RuntimeError):
    """A request's state could not be pulled and the node is set to fail, not recompute."""


class PrepareFailed(RuntimeError):
    """The prefill side's part of a transfer (gathering for permute) failed: a transfer
    failure, for the failure policy."""


# rank -> concrete strategy of the ranks whose plans need it -> prefill rank -> decode rank ->
# scratch base (PrefillNode.prepare_permute, or the prefill server's /pd/prepare_permute)
Prepare = Callable[[dict[int, Strategy]], dict[int, dict[int, int]]]


class TransferRefused(Exception):
    """The prefill and decode engines can never transfer (geometry, configuration): the
    message names the field. Not a transfer failure, so never recomputed around."""


@dataclass(frozen=True)
class PullOutcome:
    request_id: int             # the decode engine's id of the request that now runs
    ok: bool
    recomputed: bool
    results: tuple[PullResult, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.results)

    @property
    def descriptors(self) -> int:
        return sum(r.descriptors for r in self.results)

    @property
    def slowest(self) -> PullResult | None:
        """The result of the decode rank whose own pull took longest."""
        return max(self.results, key=lambda r: r.seconds, default=None)

    @property
    def rank_pull_s(self) -> float:
        """The slowest decode rank's own pull time (on that rank: plan, read, notify)."""
        return self.slowest.seconds if self.results else 0.0

    @property
    def probe(self) -> tuple[float, int]:
        """The floor this request's pull measured in place (Pull.probe_nbytes): the slowest
        rank's bare read + notification, and its bytes; (0.0, 0) unless every rank probed."""
        probes = [(r.phases.probe_s, r.phases.probe_nbytes) for r in self.results
                  if r.phases is not None]
        if not probes or len(probes) < len(self.results) or not all(s > 0 for s, _ in probes):
            return 0.0, 0
        return max(probes)

    @property
    def planned_ahead(self) -> bool:
        """Every rank read from a plan made ahead (DecodeNode.plan_ahead)."""
        return bool(self.results) and all(r.phases is not None and r.phases.planned_ahead
                                          for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [f"decode rank {r.rank}: {r.detail}" for r in self.results if not r.ok]


@dataclass(frozen=True)
class PullJob:
    """One request's pull as pull_results takes it; a server hands several to
    pull_results_many."""
    handle: RequestHandle
    params: TransferParams
    scratch_bases: dict[int, dict[int, int]] | None = None
    renew_every_s: float = 0.0
    strategies: dict[int, Strategy] | None = None
    checksums: dict[int, dict[int, int]] | None = None
    prepare: Prepare | None = None


@dataclass(frozen=True)
class StartedPull:
    """A job's first Pull sent to the remote decode ranks (DecodeNode.start_pull), for
    finish_started; or, where it could not be asked, its outcome already."""
    first: "FirstPull | None"
    ask: Asked | None
    outcome: "tuple[PullResult, ...] | BaseException | None"


@dataclass
class FirstPull:
    job: PullJob
    chosen: dict[int, Strategy]             # rank -> strategy, so far
    bases: dict[int, dict[int, int]]        # prefill rank -> decode rank -> scratch base
    pull: Pull
    body: bytes | None = None               # the pull encoded (made ahead: plan_ahead)


class DecodeNode:
    def __init__(self, model_dir: str | None, tp_size: int, cache_config: CacheConfig, *,
                 transport: str = "nixl", engine_id: str | None = None,
                 strategy: Strategy | str = Strategy.AUTO,
                 on_failure: OnFailure | str = OnFailure.RECOMPUTE,
                 staging_nbytes: int | None = None, timeout_s: float = 60.0,
                 pull_timeout_s: float = 30.0, transfer_mode: TransferMode | str = "pull",
                 key: SideChannelKey | None = None, checksums: bool = False,
                 cpus: tuple[int, ...] | None = None, probe_every: int = 0):
        if probe_every < 0:
            raise ValueError(f"probe_every={probe_every}; allowed: 0 (off) or a count >= 1")
        self.engine_id = engine_id or f"decode{next(_ENGINE_IDS)}"
        self.key = key or load_key()        # the side channel's secret (side_channel_key.py)
        self.transfer_mode = parse_transfer_mode(transfer_mode)
        self.strategy = parse_strategy(strategy)
        if self.transfer_mode is TransferMode.PUSH:
            self.strategy = push_strategy(self.strategy)
        self.on_failure = OnFailure(on_failure)
        # Compare every received byte with the prefill side's digest (engine/checksums.py);
        # a mismatch fails the transfer like any other failure (on_failure).
        self.checksums = checksums
        self.pull_timeout_s = pull_timeout_s       # handshake and reads of one pull
        # Every probe_every-th pull first times a bare read (Pull.probe_nbytes) of as many
        # bytes as the last pull's slowest rank moved: the floor `pdbridge bench serve`
        # divides the transfer stage by, measured in place. 0: never.
        self.probe_every = probe_every
        self._pulls, self._last_rank_nbytes = 0, 0
        self.engine = Engine(model_dir, tp_size, cache_config, timeout_s=timeout_s, cpus=cpus)
        self.layout: EngineLayout = self.engine.layout
        self.layout_dict = self.layout.to_dict()
        self._prefill_layouts: dict[str, dict] = {}     # digest -> layout, from handshakes
        self._layouts_sent: set[str] = set()    # digests every rank has had whole in a Pull
        nbytes = staging_nbytes if staging_nbytes is not None else default_staging_nbytes(self.layout)
        infos = self.engine.call(PDSetup("decode", self.engine_id, transport, nbytes,
                                         pull_timeout_s, self.transfer_mode.value,
                                         secret=self.key.secret))
        infos = sorted(infos, key=lambda i: i.rank)
        self.agents = [i.agent_metadata for i in infos]
        # Rank 0 is this process's: called on the caller's thread, not over its socket.
        self.channel = RankChannel([i.channel for i in infos], self.engine.worker.pd.local())

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    def prefill_layout(self, params: TransferParams) -> dict:
        """The prefill engine's EngineLayout (as a dict, for the ranks' calls), taken from
        its rank 0's handshake once per digest and checked against `params.layout_digest`:
        the layout never rides in TransferParams. HandshakeError if it cannot be had (a
        transfer failure), TransferRefused if it can never meet this engine's."""
        d = self._prefill_layouts.get(params.layout_digest)
        if d is None:
            try:
                reply = request(params.endpoints[0], MetadataRequest(
                    self.engine_id, 0, self.layout.digest, params.engine_id, 0),
                    self.pull_timeout_s, key=self.key)
            except PeerTimeout:
                raise PeerTimeout(f"prefill engine {params.engine_id} rank 0 at "
                                  f"{params.endpoints[0]}: no metadata within "
                                  f"{self.pull_timeout_s:g} s (gone, or another "
                                  f"side-channel secret)") from None
            if isinstance(reply, ErrorReply):
                kind = TransferRefused if reply.field in REFUSED_FIELDS else HandshakeError
                raise kind(f"prefill engine {params.engine_id} refused: "
                           f"{reply.field}: {reply.detail}")
            if not isinstance(reply, MetadataReply):
                raise HandshakeError(f"prefill engine {params.engine_id}: unexpected reply "
                                     f"{type(reply).__name__}")
            layout = EngineLayout.from_dict(reply.layout)
            try:                        # refuse naming the field, before any rank pulls
                check_compatible(layout, self.layout, Strategy.AUTO)
            except GeometryMismatch as e:
                raise TransferRefused(f"prefill engine {params.engine_id}: {e}") from None
            if layout.digest != params.layout_digest:
                raise HandshakeError(f"prefill engine {params.engine_id}: its layout digest "
                                     f"{layout.digest} is not the {params.layout_digest} the "
                                     f"request names (restarted with another geometry?)")
            d = self._prefill_layouts[params.layout_digest] = layout.to_dict()
        return d

    def allocate(self, prompt_ids, sampling: SamplingParams) -> RequestHandle:
        """Blocks for the first N-1 prompt tokens, for the pull to fill."""
        return self.engine.add_request(prompt_ids, sampling, imported=True)

    def choose_strategies(self, handle: RequestHandle, params: TransferParams
                          ) -> dict[int, Strategy]:
        """Decode rank -> the concrete strategy its plan takes for this request, asked ahead
        of the pull (a round trip the pull itself does not need: pull_results resolves
        `auto` on each rank and asks for preparation only where a rank needs it). A rank
        that could not plan is left out: its pull fails with the reason, then recomputes or
        fails."""
        if self.strategy is not Strategy.AUTO:
            return {j: self.strategy for j in range(self.tp_size)}
        try:
            prefill_layout = self._freeing_on_error(handle, lambda: self.prefill_layout(params))
        except HandshakeError:
            return {}                   # no rank can plan; the pull fails with the reason
        b = handle.blocks
        choices = self._freeing_on_error(handle, lambda: self._ask_ranks(ChooseStrategy(
            prefill_layout, params.prefill_blocks, (b.num_tokens, b.attn_blocks, b.state_block),
            self.strategy), StrategyChoice, self.pull_timeout_s))
        return {j: c.strategy for j, c in choices.items() if not c.error}

    def pull(self, handle: RequestHandle, params: TransferParams,
             scratch_bases: dict[int, dict[int, int]] | None = None,
             renew_every_s: float = 0.0,
             strategies: dict[int, Strategy] | None = None,
             checksums: dict[int, dict[int, int]] | None = None,
             prepare: Prepare | None = None) -> PullOutcome:
        """Every decode rank pulls its shard (pull_results); then the request decodes from
        the pulled state, or (on any failure) recomputes its prompt here, or fails, as
        configured. With checksums on, `checksums` is PrefillNode.digest_reads (none given:
        every source fails its check)."""
        results = self._freeing_on_error(handle, lambda: self.pull_results(
            handle, params, scratch_bases, renew_every_s, strategies, checksums, prepare))
        return self.finish_pull(handle, results)

    def pull_results(self, handle: RequestHandle, params: TransferParams,
                     scratch_bases: dict[int, dict[int, int]] | None, renew_every_s: float,
                     strategies: dict[int, Strategy] | None,
                     checksums: dict[int, dict[int, int]] | None,
                     prepare: Prepare | None = None) -> tuple[PullResult, ...]:
        """The decode ranks' pulls, one result per rank, touching no engine state: a server
        runs this off its engine loop, then finish_pull on it.

        Strategies: each rank's from `strategies` (choose_strategies), else the node's, and
        `auto` is resolved by each rank inside its Pull: one round trip, no separate choice.
        A rank whose plan reads what its prefill ranks must first gather (permute) answers
        needs_prepare; `prepare(rank -> strategy)` then asks the prefill side for their
        scratch bases and those ranks pull again. Without `prepare` (or when it raises
        PrepareFailed) they fail, for the failure policy. A handshake that fails is every
        rank's failed result; TransferRefused and EngineError are raised (the caller frees
        the request)."""
        out = self.pull_results_many([PullJob(handle, params, scratch_bases, renew_every_s,
                                              strategies, checksums, prepare)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def pull_results_many(self, jobs: list["PullJob"], defer_after_work: bool = False,
                          firsts: "list[FirstPull | None] | None" = None
                          ) -> list[tuple[PullResult, ...] | BaseException]:
        """pull_results of several requests, their first pulls in one round trip to each
        rank (PullBatch: the reads of all of them in flight together); what needs a second
        pull (permute, prepared after the first) goes alone. Per job: its results, or the
        ValueError / TransferRefused pull_results would raise for it. EngineError (a rank's
        process died) is raised: it fails every job. `defer_after_work`: rank 0's ReadDone
        notifications may still be pending (run_after_work), for a caller that first reads
        its clocks. `firsts`: per job, its first Pull made ahead (plan_ahead) or None."""
        out: list = []
        for job, first in zip(jobs, firsts or [None] * len(jobs)):
            try:
                out.append(first or self._first_pull(job))
            except (ValueError, TransferRefused) as e:
                out.append(e)
        firsts = [(i, r) for i, r in enumerate(out) if isinstance(r, FirstPull)]
        answers = self._pull_all([r.pull for _, r in firsts])
        for (i, first), results in zip(firsts, answers):
            out[i] = self._then_prepared(first, results)
        if not defer_after_work:
            self.run_after_work()
        return out

    def run_after_work(self) -> None:
        """Rank 0's ReadDone notifications left pending by the last collect (its replies
        were all in first): RankChannel.run_after_work."""
        self.channel.run_after_work()

    def expect(self) -> None:
        """Tell the remote ranks a Pull follows shortly (RankChannel.expect): they poll for
        it rather than sleep. Only where nothing else uses the rank channel meanwhile."""
        self.channel.expect()

    def knows_layout(self, params: TransferParams) -> bool:
        """Whether the request's prefill layout is here already (no handshake to ask it)."""
        return params.layout_digest in self._prefill_layouts

    def start_pull(self, job: PullJob, first: "FirstPull | None" = None) -> "StartedPull":
        """pull_results' first half for one job: its Pull sent to the remote ranks now, so
        they read while the caller goes on; finish_started does the rest (rank 0's part,
        the replies, preparation). Nothing else may use the rank channel in between.
        `first`: the job's first Pull made ahead (plan_ahead), sent as it is."""
        try:
            first = first or self._first_pull(job)
        except (ValueError, TransferRefused) as e:
            return StartedPull(None, None, e)
        if not isinstance(first, FirstPull):
            return StartedPull(None, None, first)
        return StartedPull(first, self.channel.send(first.pull, body=first.body), None)

    def finish_started(self, started: "StartedPull", defer_after_work: bool = False
                       ) -> tuple[PullResult, ...] | BaseException:
        """After start_pull: the job's results, or the ValueError / TransferRefused
        pull_results would raise (pull_results_many's per-job outcome). EngineError (a
        rank's process died) is raised. `defer_after_work`: as pull_results_many's."""
        if started.ask is None:
            return started.outcome
        timeout_s = 2 * self.pull_timeout_s + CHANNEL_SLACK_S
        replies = self._collect(started.ask, PullResult, timeout_s)
        out = self._then_prepared(started.first, self._answers(replies, started.ask.asked,
                                                               timeout_s))
        if not defer_after_work:
            self.run_after_work()
        return out

    def plan_ahead(self, jobs: list[PullJob]) -> list["FirstPull | None"]:
        """Every decode rank plans these requests' pulls now and keeps the plans (PlanAhead),
        so that their Pulls, asked later with the same inputs, only read: for requests whose
        prefill engine still computes them. Per job, its first Pull made now, for
        start_pull to send as it is once the prefill was computed; None where it could not
        be planned ahead (a failed handshake, a refusal, a permute that needs the prefill
        side first: its Pull then plans and reports that). Best effort, and it reads
        nothing. EngineError if a rank's process died."""
        firsts: list[FirstPull | None] = []
        for job in jobs:
            try:
                first = self._first_pull(dataclasses.replace(job, prepare=None), probe=False)
            except (ValueError, TransferRefused):
                first = None
            firsts.append(first if isinstance(first, FirstPull) else None)
        pulls = [f.pull for f in firsts if f is not None]
        if not pulls:
            return firsts
        timeout_s = len(pulls) * self.pull_timeout_s + CHANNEL_SLACK_S
        answers = self._ask_ranks(PlanAhead(pulls), PlannedAhead, timeout_s)
        if min(answers.get(j, PlannedAhead(j, 0)).planned for j in range(self.tp_size)) < len(pulls):
            return [None] * len(firsts)     # a rank kept fewer: their Pulls plan as usual
        # Each rank has the layout now: the Pulls to come name it by its digest.
        out = []
        for job, f in zip(jobs, firsts):
            if f is not None:
                pull = msgspec.structs.replace(f.pull, prefill_layout={
                    "digest": job.params.layout_digest}, probe_nbytes=self._probe_nbytes())
                f = dataclasses.replace(f, job=job, pull=pull, body=channel_encode(pull))
            out.append(f)
        return out

    def _probe_nbytes(self) -> int:
        """This pull's Pull.probe_nbytes (probe_every): the bytes of the last pull's slowest
        rank, so over a run the probes read the same bytes as the pulls; 0: no probe."""
        if not self.probe_every or not self._last_rank_nbytes:
            return 0
        self._pulls += 1
        return self._last_rank_nbytes if self._pulls % self.probe_every == 0 else 0

    def _first_pull(self, job: "PullJob", probe: bool = True
                    ) -> "FirstPull | tuple[PullResult, ...]":
        """The job's first Pull, or every rank's failed result when it cannot be asked
        (`probe`: it may carry a floor probe; plan_ahead's never does)."""
        b, params = job.handle.blocks, job.params
        if b.num_tokens != params.num_tokens:
            raise ValueError(f"decode blocks hold {b.num_tokens} tokens, the prefill engine "
                             f"computed {params.num_tokens}")
        try:
            prefill_layout = self.prefill_layout(params)
        except HandshakeError as e:             # peer gone, stalled, another secret
            return self._all_failed(str(e))
        chosen = dict(job.strategies) if job.strategies else (
            {} if self.strategy is Strategy.AUTO else {j: self.strategy for j in range(self.tp_size)})
        bases = dict(job.scratch_bases or {})
        if job.prepare is not None and not bases and Strategy.PERMUTE in chosen.values():
            try:                                # known before any read: prepare first
                bases = job.prepare(chosen)
            except PrepareFailed as e:
                return self._all_failed(f"before the pull: {e}")
        # Sent whole once; then named by its digest, which each rank keeps it under (every
        # rank takes its Pulls in order, the first of them carried it).
        digest = params.layout_digest
        if digest in self._layouts_sent:
            prefill_layout = {"digest": digest}
        else:
            self._layouts_sent.add(digest)
        return FirstPull(job, chosen, bases, Pull(
            params.request_id, params.engine_id, prefill_layout, params.endpoints,
            params.prefill_blocks, (b.num_tokens, b.attn_blocks, b.state_block),
            self.strategy, bases, self.pull_timeout_s, job.renew_every_s, chosen,
            (job.checksums or {}) if self.checksums else None,
            self._probe_nbytes() if probe else 0))

    def _pull_all(self, pulls: list[Pull], ranks: list[int] | None = None
                  ) -> list[dict[int, PullResult]]:
        """Each Pull's answers (rank -> PullResult), from every rank (or those in `ranks`):
        one Pull as it is, several as one PullBatch."""
        if not pulls:
            return []
        # Each rank reads within pull_timeout_s after a handshake of at most as long, per pull.
        timeout_s = len(pulls) * 2 * self.pull_timeout_s + CHANNEL_SLACK_S
        asked = range(self.tp_size) if ranks is None else ranks
        if len(pulls) == 1:
            answers = [self._ask_ranks(pulls[0], PullResult, timeout_s, ranks)]
        else:
            batches = self._ask_ranks(PullBatch(pulls), PullBatchResult, timeout_s, ranks)
            answers = [{j: a.results[i] for j, a in batches.items() if len(a.results) > i}
                       for i in range(len(pulls))]
        return [self._answers(a, asked, timeout_s) for a in answers]

    @staticmethod
    def _answers(replies: dict, asked, timeout_s: float) -> dict[int, PullResult]:
        return {j: replies.get(j) or PullResult(j, False, f"no answer within {timeout_s:g} s")
                for j in asked}

    def _then_prepared(self, first: "FirstPull", results: dict[int, PullResult]
                       ) -> tuple[PullResult, ...]:
        """After the first pull: the ranks that answered needs_prepare are prepared for
        (first.job.prepare) and pull again, or fail with the reason."""
        waiting = {j: Strategy(r.strategy) for j, r in results.items() if r.needs_prepare}
        if waiting:
            prepare, bases = first.job.prepare, first.bases
            try:
                if prepare is None:
                    raise PrepareFailed("nothing asks the prefill side to prepare (no prepare "
                                        "given)")
                for r, per_rank in prepare(waiting).items():
                    bases.setdefault(r, {}).update(per_rank)
            except PrepareFailed as e:
                for j in waiting:
                    results[j] = PullResult(j, False, f"{results[j].detail}: {e}",
                                            results[j].strategy, results[j].sources)
            else:
                first.chosen.update(waiting)
                again = msgspec.structs.replace(first.pull, scratch_bases=bases,
                                                strategies=first.chosen, probe_nbytes=0)
                results.update(self._pull_all([again], sorted(waiting))[0])
        out = tuple(results[j] for j in range(self.tp_size))
        self._last_rank_nbytes = max([r.nbytes for r in out if r.ok],
                                     default=self._last_rank_nbytes)
        return out

    def finish_pull(self, handle: RequestHandle, results: tuple[PullResult, ...]) -> PullOutcome:
        """After pull_results: decode from the pulled state, or recompute, or fail."""
        if all(r.ok for r in results):
            self.engine.state_arrived(handle.request_id)
            return PullOutcome(handle.request_id, True, False, results)
        return self._failed(handle, results)

    def _ask_ranks(self, request, reply_type: type, timeout_s: float,
                   ranks: list[int] | None = None) -> dict:
        """Every decode rank's (or those in `ranks`) answer over the rank channel (rank ->
        reply; a rank that did not answer in time is missing). EngineError if a rank's
        process died."""
        return self._collect(self.channel.send(request, ranks), reply_type, timeout_s)

    def _collect(self, ask: Asked, reply_type: type, timeout_s: float) -> dict:
        try:
            return self.channel.collect(ask, reply_type, timeout_s, self.engine.check_alive)
        except EngineError as e:
            raise EngineError(f"decode engine {self.engine_id}: {e}; request aborted, "
                              f"its blocks freed") from e

    def _freeing_on_error(self, handle: RequestHandle, fn):
        """fn(), freeing the request's blocks if it is refused or a worker died."""
        try:
            return fn()
        except (TransferRefused, EngineError):
            self.engine.abort(handle.request_id)
            raise

    # ---- push mode ----------------------------------------------------------------------

    def push_target(self, handle: RequestHandle) -> PushTarget:
        """What the prefill engine needs to write this request's blocks: sent before it
        starts the prefill."""
        if self.transfer_mode is not TransferMode.PUSH:
            raise ValueError(f"push_target on a node with transfer_mode="
                             f"{self.transfer_mode.value!r}; allowed: push")
        b = handle.blocks
        return PushTarget(f"{self.engine_id}:{handle.request_id}", self.engine_id,
                          self.layout_dict, self.agents,
                          (b.num_tokens, b.attn_blocks, b.state_block), self.strategy,
                          self.pull_timeout_s, self.checksums)

    def await_push(self, handle: RequestHandle, params: TransferParams,
                   target: PushTarget) -> PullOutcome:
        """Every decode rank waits for the PushDone of each prefill rank its plan names;
        then the request decodes, or (any failure or timeout) recomputes or fails."""
        b = handle.blocks
        if b.num_tokens != params.num_tokens:
            raise ValueError(f"decode blocks hold {b.num_tokens} tokens, the prefill engine "
                             f"computed {params.num_tokens}")
        try:
            prefill_layout = self._freeing_on_error(handle, lambda: self.prefill_layout(params))
        except HandshakeError as e:
            return self.fail_transfer(handle, str(e))
        results = tuple(sorted(self.engine.call(AwaitPush(
            target.push_id, params.engine_id, prefill_layout, params.prefill_blocks,
            target.decode_blocks, self.pull_timeout_s, self.checksums)),
            key=lambda r: r.rank))
        return self.finish_pull(handle, results)

    def fail_transfer(self, handle: RequestHandle, detail: str) -> PullOutcome:
        """A transfer that failed before any rank pulled (the prefill side's part of it, over
        the network): recompute or fail, as for a failed pull."""
        return self._failed(handle, self._all_failed(detail))

    def _all_failed(self, detail: str) -> tuple[PullResult, ...]:
        return tuple(PullResult(j, False, detail) for j in range(self.tp_size))

    def _failed(self, handle: RequestHandle, results: tuple[PullResult, ...]) -> PullOutcome:
        req = self.engine.request(handle.request_id)
        self.engine.abort(handle.request_id)
        errors = "; ".join(f"decode rank {r.rank}: {r.detail}" for r in results if not r.ok)
        if self.on_failure is OnFailure.FAIL:
            raise PullFailed(f"pulling request state failed: {errors}")
        rid = self.engine.add_request(req.prompt_ids, req.sampling)
        return PullOutcome(rid, False, True, results)

    def close(self) -> None:
        self.channel.close()
        self.engine.close()


def push_strategy(strategy: Strategy) -> Strategy:
    """The strategy a push-mode node plans with: `auto` is `direct` (staging and permute
    need a local copy around the transfer, which layer-by-layer writes cannot wait for)."""
    if strategy is Strategy.AUTO:
        return Strategy.DIRECT
    if strategy not in PUSH_STRATEGIES:
        raise ValueError(f"strategy={strategy.value!r} with transfer_mode='push'; allowed: "
                         f"{', '.join(s.value for s in PUSH_STRATEGIES)}, auto")
    return strategy


def default_staging_nbytes(layout: EngineLayout, max_sources: int = 8) -> int:
    """Room for whole source spans (staging) or a permuted copy: twice the model's whole
    per-request state at TP=1, which bounds the bytes one decode rank stages for one request,
    plus the alignment padding of one piece per (source rank, state region)."""
    single = EngineLayout(layout.model, 1, layout.cache)
    state = single.rank(0).state_nbytes_per_request(single.num_blocks)
    pieces = max_sources * sum(not r.paged for r in single.rank(0).regions)
    return max(1 << 20, 2 * state + pieces * STAGE_ALIGN)
