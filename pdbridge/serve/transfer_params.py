"""What a prefill engine hands back for a prefilled request, and the router passes to a
decode engine (DESIGN.md section 5, step 1). A msgspec struct: it may cross a network."""
from __future__ import annotations

from typing import Any

import msgspec


class TransferParams(msgspec.Struct, frozen=True):
    engine_id: str                          # the prefill engine
    request_id: str                         # unique on that engine
    num_tokens: int                         # prompt tokens computed there: N - 1
    prefill_blocks: tuple[int, tuple[int, ...], int]   # RequestBlocks(num_tokens, attn, state)
    layout: dict[str, Any]                  # the prefill EngineLayout.to_dict()
    endpoints: list[str]                    # metadata server of each prefill rank
    lease_s: float                          # the lease on the blocks: renew well within it
