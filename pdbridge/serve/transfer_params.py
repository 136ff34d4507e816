"""What a prefill engine hands back for a prefilled request, and the router passes to a
decode engine (DESIGN.md section 5, step 1). A msgspec struct: it crosses the network, so it
carries each fact once. The prefill engine's layout is not in it: the decode side takes that
from the prefill ranks' handshake (MetadataReply) and checks it against `layout_digest`."""
from __future__ import annotations

import msgspec


class BlockTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request's blocks on one engine (RequestBlocks on the wire)."""
    num_tokens: int                     # tokens whose state the blocks hold
    attn_blocks: tuple[int, ...]        # attention blocks, in token order
    state_block: int                    # the recurrent-state block (0 if the model has none)

    def as_tuple(self) -> tuple[int, tuple[int, ...], int]:
        """The form the engine's worker calls take (RequestBlocks(*t))."""
        return (self.num_tokens, self.attn_blocks, self.state_block)


class TransferParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    engine_id: str                          # the prefill engine
    request_id: str                         # unique on that engine, unguessable
    blocks: BlockTable                      # where the first N-1 prompt tokens' state is
    layout_digest: str                      # the prefill EngineLayout's digest
    endpoints: list[str]                    # metadata server of each prefill rank
    lease_s: float                          # the lease on the blocks: renew well within it

    @property
    def num_tokens(self) -> int:
        """Prompt tokens computed on the prefill engine: N - 1."""
        return self.blocks.num_tokens

    @property
    def prefill_blocks(self) -> tuple[int, tuple[int, ...], int]:
        return self.blocks.as_tuple()
