"""Scheduler: continuous batching of decodes and chunked prefills under a token budget.

Every step runs all running decodes (one token each) plus prefill chunks that fill the rest of
the budget, in one batch. There is no preemption: a request is admitted only when the pool can
hold its worst case (prompt + max_tokens - 1 tokens) on top of what running requests may still
grow into, so growth never fails; a request that could never fit is rejected when added.
Pure Python, no tensors (nano-vllm's scheduler).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_pool import BlockPool
from .request import Request, RequestStatus, blocks_for


class RequestTooLarge(ValueError):
    """The request needs more blocks than the whole pool holds."""


class EngineFull(RuntimeError):
    """No room right now for a request that must get its blocks immediately (imported)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batched_tokens: int = 256   # tokens computed per step, decodes and prefill chunks
    max_num_seqs: int = 32          # sequences per step

    def __post_init__(self):
        for name in ("max_batched_tokens", "max_num_seqs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    context_len: int    # tokens already in the cache
    query_len: int      # tokens computed this step

    @property
    def is_decode(self) -> bool:
        return self.query_len == 1


class Scheduler:
    def __init__(self, pool: BlockPool, block_tokens: int, uses_attention: bool,
                 uses_state: bool, config: SchedulerConfig = SchedulerConfig()):
        self.pool, self.block_tokens, self.config = pool, block_tokens, config
        self.uses_attention, self.uses_state = uses_attention, uses_state
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []        # RUNNING and AWAITING_STATE

    # ---- admission -------------------------------------------------------------------

    def worst_case_blocks(self, req: Request) -> int:
        attn = blocks_for(req.max_cached_tokens, self.block_tokens) if self.uses_attention else 0
        return attn + (1 if self.uses_state else 0)

    def _held_blocks(self, req: Request) -> int:
        return len(req.attn_blocks) + (req.state_block is not None)

    def _reserved(self) -> int:
        """Blocks running requests may still take as they grow."""
        return sum(self.worst_case_blocks(r) - self._held_blocks(r) for r in self.running)

    def can_admit(self, req: Request) -> bool:
        return self.pool.num_free - self._reserved() >= self.worst_case_blocks(req)

    def add(self, req: Request) -> None:
        self._check_fits(req)
        self.waiting.append(req)

    def add_imported(self, req: Request) -> None:
        """Allocate the blocks for the transferred tokens now, so a transport can fill them."""
        self._check_fits(req)
        if not self.can_admit(req):
            raise EngineFull(f"request {req.request_id}: needs {self.worst_case_blocks(req)} "
                             f"blocks, {self.pool.num_free - self._reserved()} are free now")
        self._allocate(req, req.num_prompt_tokens - 1)
        req.status = RequestStatus.AWAITING_STATE
        self.running.append(req)

    def state_arrived(self, req: Request) -> None:
        if req.status is not RequestStatus.AWAITING_STATE:
            raise ValueError(f"request {req.request_id} is {req.status.value}, not awaiting state")
        req.num_computed_tokens = req.num_prompt_tokens - 1
        req.status = RequestStatus.RUNNING

    def _check_fits(self, req: Request) -> None:
        need = self.worst_case_blocks(req)
        if need > self.pool.num_blocks:
            raise RequestTooLarge(
                f"request {req.request_id}: {req.num_prompt_tokens} prompt tokens + max_tokens "
                f"{req.sampling.max_tokens} need {need} blocks of {self.block_tokens} tokens; "
                f"the engine has {self.pool.num_blocks} (raise num_blocks or lower max_tokens)")

    def _allocate(self, req: Request, tokens: int) -> None:
        """First blocks of a request: its state block and the attention blocks for `tokens`,
        as one contiguous run when the pool has one."""
        n_attn = blocks_for(tokens, self.block_tokens) if self.uses_attention else 0
        ids = self.pool.allocate(n_attn + (1 if self.uses_state else 0))
        if self.uses_state:
            req.state_block, ids = ids[0], ids[1:]
        req.attn_blocks = ids

    # ---- one step --------------------------------------------------------------------

    def schedule(self) -> list[ScheduledChunk]:
        """Decodes first, then running prefills, then newly admitted prompts, FIFO."""
        budget, chunks = self.config.max_batched_tokens, []
        runnable = [r for r in self.running if r.status is RequestStatus.RUNNING]
        for req in sorted(runnable, key=lambda r: r.num_pending_tokens != 1):
            if len(chunks) == self.config.max_num_seqs or budget == 0:
                return chunks
            chunks.append(self._chunk(req, budget))
            budget -= chunks[-1].query_len
        while self.waiting and budget and len(chunks) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self.can_admit(req):
                break                               # FIFO: no overtaking
            self.waiting.popleft()
            self._allocate(req, req.target_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.num_pending_tokens == 0:         # prefill-only of a 1-token prompt
                self.keep(req)
                continue
            chunks.append(self._chunk(req, budget))
            budget -= chunks[-1].query_len
        return chunks

    def _chunk(self, req: Request, budget: int) -> ScheduledChunk:
        n = min(req.num_pending_tokens, budget)
        end = req.num_computed_tokens + n
        if self.uses_attention:
            grow = blocks_for(end, self.block_tokens) - len(req.attn_blocks)
            if grow > 0:
                req.attn_blocks += self.pool.extend(req.attn_blocks, grow)
        return ScheduledChunk(req, req.num_computed_tokens, n)

    # ---- after a step ----------------------------------------------------------------

    def finish(self, req: Request) -> None:
        """Return a request's blocks; it leaves the running set."""
        self._drop(req)
        self._free_blocks(req)
        req.status = RequestStatus.FINISHED

    def keep(self, req: Request) -> None:
        """Prefill-only request done: it leaves the running set but keeps its blocks."""
        self._drop(req)
        req.status = RequestStatus.PREFILLED

    def release(self, req: Request) -> None:
        if req.status is not RequestStatus.PREFILLED:
            raise ValueError(f"request {req.request_id} is {req.status.value}, not prefilled")
        self._free_blocks(req)
        req.status = RequestStatus.FINISHED

    def _drop(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _free_blocks(self, req: Request) -> None:
        ids = req.attn_blocks + ([req.state_block] if req.state_block is not None else [])
        self.pool.free(ids)
        req.attn_blocks, req.state_block = [], None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.status is RequestStatus.RUNNING for r in self.running)
