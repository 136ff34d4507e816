"""PDRouter: sends each prompt through a prefill engine and one of several decode engines.

The lifecycle of DESIGN.md section 5, driven from one process: prefill N-1 tokens, allocate
decode blocks, name the readers, (permute: let prefill ranks gather), pull on every decode
rank, then the last prompt token runs as a decode step batched with the other running
decodes. Per request it records the time to first token split into prefill / transfer /
first decode step, and the bytes and descriptors moved.

Errors split as on the HTTP path (decode_node.py): a prefill and a decode engine whose
geometry can never meet, or a configuration that cannot work, is refused, in one line naming
the field: at construction for what the nodes' layouts show, TransferRefused for what only
the handshake shows. A transfer that fails -- the prefill side's part of it included -- goes
to the decode node's failure policy (recompute, or PullFailed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from pdbridge.engine.llm_engine import EngineError
from pdbridge.engine.request import SamplingParams
from pdbridge.transport.compat import GeometryMismatch, check_compatible

from .decode_node import DecodeNode, PrepareFailed, TransferMode
from .prefill_node import PrefillNode


@dataclass
class RequestRecord:
    index: int
    prompt_ids: list[int]
    decode_engine: str
    decode_tp: int
    request_id: int = -1            # on the decode engine
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    first_step_s: float = 0.0
    nbytes: int = 0
    descriptors: int = 0
    strategies: list[str] = field(default_factory=list)
    recomputed: bool = False
    errors: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.prefill_s + self.transfer_s + self.first_step_s

    @property
    def gbps(self) -> float:
        return self.nbytes / self.transfer_s / 1e9 if self.transfer_s else 0.0


class PDRouter:
    def __init__(self, prefill: PrefillNode, decodes: list[DecodeNode],
                 progress: Callable[[str], None] | None = None):
        if not decodes:
            raise ValueError("PDRouter needs at least one decode node")
        wanting = [n.engine_id for n in decodes if n.checksums and not prefill.checksums]
        if wanting:
            raise ValueError(f"checksums=True on decode nodes {wanting} needs checksums=True on "
                             f"prefill node {prefill.engine_id}")
        for node in decodes:
            try:
                check_compatible(prefill.layout, node.layout, node.strategy)
            except GeometryMismatch as e:
                raise ValueError(f"decode node {node.engine_id} cannot read prefill node "
                                 f"{prefill.engine_id}: {e}") from None
        self.prefill, self.decodes = prefill, decodes
        self._progress = progress or (lambda msg: None)

    def run(self, prompts: list[list[int]], sampling: SamplingParams) -> list[RequestRecord]:
        """Every prompt through prefill -> transfer -> decode; decode engines are used in turn."""
        records = []
        for i, prompt in enumerate(prompts):
            node = self.decodes[i % len(self.decodes)]
            rec = self._start(i, list(prompt), node, sampling)
            records.append(rec)
            self._progress(f"request {i + 1}/{len(prompts)}: {len(prompt)} prompt tokens, "
                           f"{rec.nbytes / 2**20:.2f} MiB in {rec.descriptors} descriptors to "
                           f"{node.engine_id} (TP={node.tp_size})"
                           + (" [recomputed]" if rec.recomputed else ""))
        self._finish(records)
        return records

    def _start(self, index: int, prompt: list[int], node: DecodeNode,
               sampling: SamplingParams) -> RequestRecord:
        rec = RequestRecord(index, prompt, node.engine_id, node.tp_size)
        if node.transfer_mode is TransferMode.PUSH:
            return self._start_push(rec, node, sampling)
        t0 = time.perf_counter()
        params = self.prefill.prefill(prompt)
        t1 = time.perf_counter()
        handle = node.allocate(prompt, sampling)
        self.prefill.expect_readers(params, node.engine_id, node.tp_size)
        b = handle.blocks
        decode_blocks = (b.num_tokens, b.attn_blocks, b.state_block)
        try:
            digests = self.prefill.digest_reads(params, node.layout_dict, decode_blocks) \
                if node.checksums else None
        except ValueError:              # a configuration that cannot work: refused
            node.engine.abort(handle.request_id)
            raise
        except EngineError as e:        # the prefill engine is gone: a failed transfer
            outcome = node.fail_transfer(handle, f"before the pull: {e}")
        else:
            # The decode ranks decide (auto included) inside their pulls; the prefill ranks
            # gather (permute) exactly for the ranks that chose it.
            outcome = node.pull(handle, params, renew_every_s=params.lease_s / 3,
                                checksums=digests,
                                prepare=lambda s: self._prepare(params, node, handle, s))
        t2 = time.perf_counter()
        self.prefill.poll()
        return self._record(rec, node, outcome, t1 - t0, t2 - t1)

    def _prepare(self, params, node: DecodeNode, handle, strategies) -> dict:
        """The prefill ranks' permute gathers for the decode ranks that chose it. A refusal
        (ValueError: a configuration that cannot work) frees the decode blocks and is raised;
        a prefill engine that is gone is a failed transfer."""
        b = handle.blocks
        try:
            return self.prefill.prepare_permute(params, node.engine_id, node.layout_dict,
                                                (b.num_tokens, b.attn_blocks, b.state_block),
                                                strategies)
        except ValueError:
            node.engine.abort(handle.request_id)
            raise
        except EngineError as e:
            raise PrepareFailed(str(e)) from None

    def _start_push(self, rec: RequestRecord, node: DecodeNode,
                    sampling: SamplingParams) -> RequestRecord:
        """Push: decode blocks first, their table to the prefill engine, whose ranks write
        each layer's bytes as the prefill computes them; transfer_s is then only what is
        left after the prefill step (the wait for every writer's PushDone)."""
        handle = node.allocate(rec.prompt_ids, sampling)
        target = node.push_target(handle)
        t0 = time.perf_counter()
        try:
            params = self.prefill.prefill(rec.prompt_ids, push_to=target)
        except BaseException:
            node.engine.abort(handle.request_id)    # its blocks, freed once
            raise
        t1 = time.perf_counter()
        outcome = node.await_push(handle, params, target)
        return self._record(rec, node, outcome, t1 - t0, time.perf_counter() - t1)

    def _record(self, rec: RequestRecord, node: DecodeNode, outcome, prefill_s: float,
                transfer_s: float) -> RequestRecord:
        rec.request_id = outcome.request_id
        rec.prefill_s, rec.transfer_s = prefill_s, transfer_s
        rec.nbytes, rec.descriptors = outcome.nbytes, outcome.descriptors
        rec.strategies = sorted({r.strategy for r in outcome.results if r.strategy})
        rec.recomputed, rec.errors = outcome.recomputed, outcome.errors
        rec.first_step_s = self._first_step(node, outcome.request_id)
        return rec

    @staticmethod
    def _first_step(node: DecodeNode, request_id: int) -> float:
        """Steps until this request has its first token (one step when its state arrived:
        the last prompt token is a decode step); returns their time."""
        t0 = time.perf_counter()
        while not node.engine.request(request_id).output_ids:
            node.engine.step()
        return time.perf_counter() - t0

    def _finish(self, records: list[RequestRecord]) -> None:
        for node in self.decodes:
            while node.engine.has_unfinished():
                node.engine.step()
        for rec in records:
            node = next(n for n in self.decodes if n.engine_id == rec.decode_engine)
            rec.token_ids = list(node.engine.take(rec.request_id).output_ids)
        deadline = time.monotonic() + 10.0
        while self.prefill.num_held and time.monotonic() < deadline:
            self.prefill.poll()
            time.sleep(0.005)
