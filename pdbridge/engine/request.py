"""Request: one sequence's tokens, sampling parameters, blocks and progress (no tensors)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"                # queued; no blocks yet
    AWAITING_STATE = "awaiting_state"  # imported: blocks held, a transport is filling them
    RUNNING = "running"                # has blocks; scheduled every step until done
    PREFILLED = "prefilled"            # prefill-only: target tokens computed, blocks kept
    FINISHED = "finished"              # blocks returned


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    NONFINITE = "nonfinite"            # NaN/Inf logits: an error, no token is sampled from them


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0: no top-k cut
    seed: int | None = None         # None: a fresh random seed (temperature > 0 only)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """Tokens 0..num_tokens-1 are prompt then output; the first num_computed_tokens of them
    are in the caches. A step computes the next chunk; when it reaches num_tokens the
    request samples one more token (unless it stops at `compute_target`, prefill-only)."""
    request_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    compute_target: int | None = None      # prefill-only: stop once this many are computed
    imported: bool = False                  # the first N-1 tokens' state arrives by transfer
    output_ids: list[int] = field(default_factory=list)
    attn_blocks: list[int] = field(default_factory=list)
    state_block: int | None = None
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        return [self.prompt_ids[i] if i < n else self.output_ids[i - n] for i in range(start, stop)]

    @property
    def target_tokens(self) -> int:
        """Tokens to compute before the request samples (or stops, when prefill-only)."""
        return self.num_tokens if self.compute_target is None else self.compute_target

    @property
    def num_pending_tokens(self) -> int:
        return self.target_tokens - self.num_computed_tokens

    @property
    def max_cached_tokens(self) -> int:
        """Most tokens this request ever holds in the cache: the last sampled token is never
        fed back, so N + max_tokens - 1 (or the prefill-only target)."""
        if self.compute_target is not None:
            return self.compute_target
        return self.num_prompt_tokens + self.sampling.max_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.PREFILLED)


def blocks_for(tokens: int, block_tokens: int) -> int:
    return math.ceil(tokens / block_tokens)
