"""EngineLayout: the one source of truth for cache geometry and bytes (DESIGN.md section 2).

From a ModelSpec, a TP size and a CacheConfig it derives, for every rank, the memory regions
the engine allocates and the byte offset of every (layer, tensor, block, segment, unit,
element). The engine allocates from it, the planner plans from it, the transport registers
exactly its regions; nothing re-derives a size.

Regions: one per attention tensor (paged by kernel block), one per state mixer holding all
that mixer's state tensors for a block in one page (conv then ssm), as hybrid engines do.
With page padding, block_tokens is derived so that an attention page holds at least a state
page, and state pages are padded to the attention page.

With `layer_interleave`, all layers whose tensors have the same shape share one region, and
the layer index becomes an axis placed just inside the sharded dim: a rank's share of a segment is then one run across ALL layers (e.g. one SSM
run and three conv runs per request instead of 4 per Mamba layer), so a transfer needs few,
large descriptors (DESIGN.md section 2: descriptor count is decided by layout). Each layer's
tensor is still an ordinary strided TensorLayout; nothing else needs to know. Page padding
sets block_tokens as above, but stacked state regions keep their natural page.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .model_spec import ModelSpec
from .sharding import BLOCK, TOKEN, StateTensor
from .state_tensors import AttnLayout, ConvLayout, model_tensors

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
TENSOR_ALIGN = 64       # bytes between tensors sharing a page
# Zone origins (RankLayout.zone_origins) are rounded down to this: a transport whose grain
# divides it (NIXL: every registration up to 32 GiB, transport/chunks.py) keeps them as given.
ZONE_ALIGN = TENSOR_ALIGN


class LayoutError(ValueError):
    """An impossible cache configuration; the message names the field and what would work."""


@dataclass(frozen=True)
class PlacedGroup:
    """Where one region group (a paged tensor, or one mixer's state tensors) of another
    engine lives: `base` bytes into region `region` is block 0; the group's tensors follow
    each other within a page in `tensors` order, each aligned to Placement.pack_align.
    `orders` gives, per tensor, its dims outermost first where they differ from the
    declared order (empty: declared order)."""
    layer: int
    tensors: tuple[str, ...]
    region: int
    base: int
    orders: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "orders", tuple(tuple(o) for o in self.orders))


@dataclass(frozen=True)
class Placement:
    """An engine that is not ours (vLLM) as data: its cache buffers and where each tensor
    sits in them, the same on every rank of the engine (it shards evenly). Every block of
    every tensor is `page_nbytes` apart (one block id, one page, whatever the group)."""
    regions: tuple[tuple[str, int], ...]        # (name, nbytes) of each registered buffer
    page_nbytes: int
    groups: tuple[PlacedGroup, ...]
    pack_align: int = 1

    def __post_init__(self):
        object.__setattr__(self, "regions", tuple((str(n), int(b)) for n, b in self.regions))
        object.__setattr__(self, "groups", tuple(
            g if isinstance(g, PlacedGroup) else PlacedGroup(**g) for g in self.groups))
        if self.page_nbytes < 1:
            raise LayoutError(f"placement.page_nbytes must be >= 1, got {self.page_nbytes}")
        if self.pack_align < 1:
            raise LayoutError(f"placement.pack_align must be >= 1, got {self.pack_align}")
        for g in self.groups:
            if not 0 <= g.region < len(self.regions):
                raise LayoutError(f"placement: layer {g.layer} {'/'.join(g.tensors)}: region "
                                  f"{g.region} outside the {len(self.regions)} regions")


@dataclass(frozen=True)
class CacheConfig:
    num_blocks: int = 16
    block_tokens: int | None = None         # None: derived (page padding) or 16
    kernel_block_tokens: int | None = None  # None: min(16, block_tokens)
    conv_layout: ConvLayout = ConvLayout.DS
    attn_layout: AttnLayout = AttnLayout.HEADS_OUTER
    kv_packed: bool = True
    dtype: str | None = None                # None: the model's dtype (KV and conv)
    ssm_dtype: str | None = None            # None: the model's ssm dtype (fp32 by default)
    page_padding: bool = False
    layer_interleave: bool = False          # one region per tensor shape, layers interleaved
    placement: Placement | None = None      # another engine's memory, as data (vllm/)

    def __post_init__(self):
        if isinstance(self.placement, dict):
            object.__setattr__(self, "placement", Placement(**self.placement))
        # Accept the enums' string values at the edge, keep enums inside.
        if isinstance(self.conv_layout, str):
            object.__setattr__(self, "conv_layout", _enum(ConvLayout, self.conv_layout, "conv_layout"))
        if isinstance(self.attn_layout, str):
            object.__setattr__(self, "attn_layout", _enum(AttnLayout, self.attn_layout, "attn_layout"))
        if self.num_blocks < 1:
            raise LayoutError(f"num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("block_tokens", "kernel_block_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise LayoutError(f"{name} must be >= 1, got {v}")
        for name in ("dtype", "ssm_dtype"):
            v = getattr(self, name)
            if v is not None and v not in DTYPE_BYTES:
                raise LayoutError(f"{name}={v!r}; allowed: {', '.join(DTYPE_BYTES)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_layout"], d["attn_layout"] = self.conv_layout.value, self.attn_layout.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheConfig":
        return cls(**d)


def _enum(cls, value: str, field_name: str):
    try:
        return cls(value)
    except ValueError:
        raise LayoutError(f"{field_name}={value!r}; allowed: {', '.join(e.value for e in cls)}") from None


@dataclass(frozen=True)
class Axis:
    name: str
    extent: int     # elements on this rank
    stride: int     # bytes


@dataclass(frozen=True)
class Region:
    name: str       # "L3.state", "L5.kv"
    layer: int
    nbytes: int
    paged: bool = False     # attention KV (indexed by token) rather than per-request state

    def page_nbytes(self, num_blocks: int) -> int:
        return self.nbytes // num_blocks


@dataclass(frozen=True)
class TensorLayout:
    """One tensor on one rank: where each element lives, in bytes from its region's start."""
    tensor: StateTensor
    region: int
    base: int                              # byte offset of element (0, ..., 0)
    axes: tuple[Axis, ...]                 # in tensor.dims order
    seg_units: tuple[tuple[int, int], ...] # global unit range held, per segment
    seg_offsets: tuple[int, ...]           # element offset of each segment on the sharded axis
    itemsize: int

    @property
    def key(self) -> tuple[int, str]:
        return self.tensor.key

    def axis(self, name: str) -> Axis:
        return self.axes[self.tensor.dim_index(name)]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one (kernel) block of this tensor if all its other axes were contiguous."""
        n = self.itemsize
        for a in self.axes:
            if a.name != BLOCK:
                n *= a.extent
        return n

    def segment_index(self, name: str) -> int:
        for i, s in enumerate(self.tensor.segments):
            if s.name == name:
                return i
        raise KeyError(f"{self.tensor.name} has no segment {name!r}")


@dataclass(frozen=True)
class RankLayout:
    rank: int
    regions: tuple[Region, ...]
    tensors: tuple[TensorLayout, ...]

    @cached_property
    def _by_key(self) -> dict[tuple[int, str], TensorLayout]:
        return {t.key: t for t in self.tensors}

    def tensor(self, layer: int, name: str) -> TensorLayout:
        return self._by_key[(layer, name)]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def state_nbytes_per_request(self, num_blocks: int) -> int:
        """Bytes of one request's recurrent state on this rank (one page per state region)."""
        return sum(r.page_nbytes(num_blocks) for r in self.regions if not r.paged)

    @cached_property
    def region_final_layer(self) -> tuple[int, ...]:
        """Per region, the last layer whose tensors live in it: once a forward has run that
        layer, a request's bytes in the region are final (push mode writes them then). One
        layer per region, except layer-interleaved stacks, whose bytes are final only after
        the stack's last layer."""
        last = [-1] * len(self.regions)
        for tl in self.tensors:
            last[tl.region] = max(last[tl.region], tl.tensor.layer)
        return tuple(last)

    @cached_property
    def zone_origins(self) -> tuple:
        """Per region, the sorted int64 numpy array of its zone origins: where each tensor's
        slab starts, rounded down to ZONE_ALIGN; 0 always.

        A slab is one index of every dim outer to the block dim (a (kv, head) row of a
        heads-across-blocks KV tensor), or one block when the block dim is outermost (a state
        tensor's page). Runs between two engines start at the same place within a slab far
        more often than at the same place within a region, whose tensor bases and page sizes
        depend on the TP size; NIXL's chunk grid restarts at these origins
        (transport/chunks.py) and the staging strategy aligns its buffer to them
        (plan/strategies.py), so both must read them from here. The rounding only moves the
        per-layer bases of layer-interleaved tensors (a few bytes apart), which no run starts
        at anyway, and keeps every origin on the transport's grain.
        """
        import numpy as np      # deferred: spec stays import-light
        origins = [[np.zeros(1, np.int64)] for _ in self.regions]
        for tl in self.tensors:
            k = tl.tensor.dim_index(BLOCK)
            starts = np.array([tl.base], np.int64)
            for a in (tl.axes[:k] if k else tl.axes[:1]):
                starts = (starts[:, None] + np.arange(a.extent, dtype=np.int64) * a.stride).ravel()
            origins[tl.region].append(starts)
        return tuple(np.unique(np.concatenate(o) // ZONE_ALIGN * ZONE_ALIGN) for o in origins)


@dataclass(frozen=True, eq=False)
class EngineLayout:
    model: ModelSpec
    tp_size: int
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self):
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise LayoutError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        problem = _shard_problem(self.tensor_groups, self.tp_size)
        if problem:
            ok = [t for t in range(1, 65) if not _shard_problem(self.tensor_groups, t)]
            raise LayoutError(f"tp_size={self.tp_size}: {problem}; TP sizes that work: "
                              f"{_ranges(ok)}")
        self._check_blocks()
        object.__setattr__(self, "_ranks", {})

    # ---- derived scalars -------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self.cache.dtype or self.model.dtype

    @property
    def ssm_dtype(self) -> str:
        return self.cache.ssm_dtype or self.model.ssm_dtype

    @cached_property
    def tensor_groups(self) -> list[list[StateTensor]]:
        """Tensors per region: each paged tensor alone, each mixer's state tensors together."""
        c = self.cache
        groups = []
        for mixer in model_tensors(self.model, c.conv_layout, c.attn_layout, c.kv_packed,
                                   self.dtype, self.ssm_dtype):
            paged = [t for t in mixer if t.paged]
            state = [t for t in mixer if not t.paged]
            groups.extend([t] for t in paged)
            if state:
                groups.append(state)
        return groups

    @property
    def tensors(self) -> list[StateTensor]:
        return [t for g in self.tensor_groups for t in g]

    @cached_property
    def has_paged(self) -> bool:
        """Some tensor is paged by token (attention KV)."""
        return any(t.paged for t in self.tensors)

    @cached_property
    def has_state(self) -> bool:
        """Some tensor is one state page per request (conv, SSM, recurrent state)."""
        return any(not t.paged for t in self.tensors)

    @cached_property
    def block_tokens(self) -> int:
        c = self.cache
        kbt = c.kernel_block_tokens or 16
        if not c.page_padding or not self._paged_token_nbytes or not self._state_page_nbytes:
            return c.block_tokens or (kbt if c.kernel_block_tokens else 16)
        need = -(-self._state_page_nbytes // min(self._paged_token_nbytes))
        derived = -(-need // kbt) * kbt
        if c.block_tokens is not None:
            if c.block_tokens < need:
                raise LayoutError(f"block_tokens={c.block_tokens} is too small with page_padding: "
                                  f"an attention page must hold a state page; use >= {derived} "
                                  f"or leave block_tokens unset")
            return c.block_tokens
        return derived

    @property
    def kernel_block_tokens(self) -> int:
        return self.cache.kernel_block_tokens or min(16, self.block_tokens)

    @property
    def kernel_blocks_per_block(self) -> int:
        return self.block_tokens // self.kernel_block_tokens

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @cached_property
    def state_page_nbytes(self) -> int:
        """Block stride of every state region (padded to the attention page when asked)."""
        if not self.cache.page_padding:
            return 0        # natural per region
        pages = [self.block_tokens * b for b in self._paged_token_nbytes]
        return max([self._state_page_nbytes] + pages)

    def _check_blocks(self) -> None:
        bt, kbt = self.block_tokens, self.kernel_block_tokens
        if bt % kbt:
            raise LayoutError(f"kernel_block_tokens={kbt} must divide block_tokens={bt}; "
                              f"allowed: {[k for k in range(1, bt + 1) if bt % k == 0]}")

    @cached_property
    def _paged_token_nbytes(self) -> list[int]:
        """Bytes per token of each paged tensor, on every rank."""
        out = []
        for r in range(self.tp_size):
            for g in self.tensor_groups:
                for t in g:
                    if t.paged:
                        out.append(_elements(t, self.tp_size, r, {BLOCK: 1, TOKEN: 1}) * DTYPE_BYTES[t.dtype])
        return out

    @cached_property
    def _state_page_nbytes(self) -> int:
        """Largest natural state page (all state tensors of one mixer) over mixers and ranks."""
        pages = [0]
        for r in range(self.tp_size):
            for g in self.tensor_groups:
                if not g[0].paged:
                    pages.append(_page_bases(g, self.tp_size, r)[1])
        return max(pages)

    # ---- per-rank layout -------------------------------------------------------------

    def rank(self, r: int) -> RankLayout:
        if not 0 <= r < self.tp_size:
            raise LayoutError(f"rank {r} is outside tp_size {self.tp_size}")
        if r not in self._ranks:
            self._ranks[r] = self._build_rank(r)
        return self._ranks[r]

    def _build_rank(self, r: int) -> RankLayout:
        if self.cache.placement is not None:
            return self._build_rank_placed(r)
        if self.cache.layer_interleave:
            return self._build_rank_interleaved(r)
        t, regions, tensors = self.tp_size, [], []
        m, kbt = self.kernel_blocks_per_block, self.kernel_block_tokens
        for g in self.tensor_groups:
            idx = len(regions)
            if g[0].paged:
                tl = _tensor_layout(g[0], t, r, idx, 0, self.num_blocks * m, kbt, None)
                nbytes = tl.block_nbytes * self.num_blocks * m
                regions.append(Region(f"L{g[0].layer}.{g[0].name}", g[0].layer, nbytes, paged=True))
                tensors.append(tl)
                continue
            bases, natural = _page_bases(g, t, r)
            page = self.state_page_nbytes or natural
            for tensor, base in zip(g, bases):
                tensors.append(_tensor_layout(tensor, t, r, idx, base, self.num_blocks, 0, page))
            kind = "state" if len(g) > 1 else g[0].name
            regions.append(Region(f"L{g[0].layer}.{kind}", g[0].layer, page * self.num_blocks))
        return RankLayout(r, tuple(regions), tuple(tensors))

    def _build_rank_interleaved(self, r: int) -> RankLayout:
        """One region per distinct tensor-group shape; layer l of L at layer index l."""
        t, m, kbt = self.tp_size, self.kernel_blocks_per_block, self.kernel_block_tokens
        stacks: dict[tuple, list[list[StateTensor]]] = {}
        for g in self.tensor_groups:
            stacks.setdefault(_signature(g), []).append(g)
        regions, tensors = [], []
        for groups in stacks.values():
            idx, n = len(regions), len(groups)
            first, last = groups[0][0].layer, groups[-1][0].layer
            if groups[0][0].paged:
                for i, g in enumerate(groups):
                    tensors.append(_tensor_layout(g[0], t, r, idx, 0, self.num_blocks * m, kbt,
                                                  None, layers=(n, i)))
                nbytes = tensors[-1].block_nbytes * n * self.num_blocks * m
                name = groups[0][0].name
            else:
                bases, page = _page_bases(groups[0], t, r, layers=n)
                for i, g in enumerate(groups):
                    for tensor, base in zip(g, bases):
                        tensors.append(_tensor_layout(tensor, t, r, idx, base, self.num_blocks, 0,
                                                      page, layers=(n, i)))
                nbytes = page * self.num_blocks
                name = "state" if len(groups[0]) > 1 else groups[0][0].name
            regions.append(Region(f"L{first}-{last}x{n}.{name}", first, nbytes,
                                  paged=groups[0][0].paged))
        return RankLayout(r, tuple(regions), tuple(tensors))

    def _build_rank_placed(self, r: int) -> RankLayout:
        """Regions and tensors where the placement says they are (another engine's caches)."""
        p, t, m, kbt = self.cache.placement, self.tp_size, self.kernel_blocks_per_block, \
            self.kernel_block_tokens
        placed = {(g.layer, g.tensors[0]): g for g in p.groups}
        regions = tuple(Region(name, -1, nbytes) for name, nbytes in p.regions)
        tensors = []
        for group in self.tensor_groups:
            where = f"layer {group[0].layer} {'/'.join(x.name for x in group)}"
            g = placed.pop((group[0].layer, group[0].name), None)
            if g is None or g.tensors != tuple(x.name for x in group):
                raise LayoutError(f"placement: no group for {where}"
                                  + (f" (it lists {'/'.join(g.tensors)})" if g else ""))
            page = p.page_nbytes // m if group[0].paged else p.page_nbytes
            off = 0
            for i, tensor in enumerate(group):
                off = -(-off // p.pack_align) * p.pack_align
                order = g.orders[i] if i < len(g.orders) and g.orders[i] else \
                    tuple(d.name for d in tensor.dims)
                tl = _placed_tensor_layout(tensor, t, r, g.region, g.base + off, order, page,
                                           self.num_blocks * (m if tensor.paged else 1),
                                           kbt if tensor.paged else 0)
                off += tl.block_nbytes
                tensors.append(tl)
            if off > page:
                raise LayoutError(f"placement: {where} needs {off} bytes a block on rank {r}, "
                                  f"more than page_nbytes {p.page_nbytes}"
                                  + (f" / {m} kernel blocks" if group[0].paged else ""))
            end = g.base + (self.num_blocks * m if group[0].paged else self.num_blocks) * page
            if end > regions[g.region].nbytes:
                raise LayoutError(f"placement: {where} ends at byte {end}, past region "
                                  f"{regions[g.region].name} ({regions[g.region].nbytes} bytes)")
        if placed:
            raise LayoutError(f"placement: groups for tensors the model lacks: "
                              f"{sorted(placed)[:3]}")
        return RankLayout(r, regions, tuple(tensors))

    def token_slots(self, attn_blocks, num_tokens: int):
        """(kernel block, row in it) of tokens 0..num_tokens-1 of a request whose logical
        attention blocks are `attn_blocks`: int64 numpy arrays (the vector form of `offset`)."""
        import numpy as np      # deferred: spec stays import-light
        t = np.arange(num_tokens, dtype=np.int64)
        table = np.asarray(attn_blocks if len(attn_blocks) else (0,), dtype=np.int64)
        bt, kbt = self.block_tokens, self.kernel_block_tokens
        return table[t // bt] * self.kernel_blocks_per_block + (t % bt) // kbt, t % kbt

    # ---- scalar offsets (the reference planner and tests use these) -----------------

    def offset(self, rank: int, layer: int, tensor: str, block: int, segment: str, unit: int,
               element: int = 0, token: int = 0, inner: dict[str, int] | None = None
               ) -> tuple[int, int] | None:
        """(region, byte offset) of one element on `rank`, or None if the rank lacks the unit.

        `block` is a logical block id; `token` the token within it (paged tensors only);
        `unit`/`element` index the segment's global units and the element within a unit;
        `inner` gives the index of every other dim by name (0 where absent).
        """
        tl = self.rank(rank).tensor(layer, tensor)
        s = tl.segment_index(segment)
        u0, u1 = tl.seg_units[s]
        if not u0 <= unit < u1:
            return None
        seg = tl.tensor.segments[s]
        idx = dict(inner or {})
        idx[tl.tensor.sharded_dim] = tl.seg_offsets[s] + (unit - u0) * seg.unit_size + element
        if tl.tensor.paged:
            idx[BLOCK] = block * self.kernel_blocks_per_block + token // self.kernel_block_tokens
            idx[TOKEN] = token % self.kernel_block_tokens
        else:
            idx[BLOCK] = block
        off = tl.base
        for a in tl.axes:
            i = idx.get(a.name, 0)
            if not 0 <= i < a.extent:
                raise IndexError(f"{tensor}.{a.name} index {i} outside [0, {a.extent})")
            off += i * a.stride
        return tl.region, off

    # ---- identity --------------------------------------------------------------------

    def geometry(self) -> dict[str, Any]:
        """Rank-independent geometry that two engines must share to exchange state."""
        return {
            "model_type": self.model.model_type,
            "hidden_size": self.model.hidden_size,
            "layers": self.model.pattern(),
            "dtype": self.dtype,
            "ssm_dtype": self.ssm_dtype,
            "tensors": [_tensor_geometry(t) for t in self.tensors],
        }

    def describe(self) -> dict[str, Any]:
        return {"geometry": self.geometry(), "tp_size": self.tp_size,
                "cache": self.cache.to_dict(), "block_tokens": self.block_tokens,
                "kernel_block_tokens": self.kernel_block_tokens}

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this layout elsewhere (plain JSON/msgpack types).

        The model travels as the config it was built from (`ModelSpec.config`), so the other
        side rebuilds it with the same builder; `from_dict` checks the rebuilt digest.
        """
        from .hf_config import load_model_spec     # deferred: hf_config is the edge parser
        if not self.model.config:
            raise LayoutError(f"model {self.model.model_type!r} has no source config; "
                              f"build it with load_model_spec to send its layout")
        if load_model_spec(self.model.config, dtype=self.model.dtype) != self.model:
            raise LayoutError("model spec differs from the spec its config rebuilds into; "
                              "only specs built by load_model_spec can be sent")
        return {"model_config": dict(self.model.config), "model_dtype": self.model.dtype,
                "tp_size": self.tp_size, "cache": self.cache.to_dict(), "digest": self.digest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineLayout":
        """Inverse of to_dict; raises LayoutError if the rebuilt digest differs from d's."""
        from .hf_config import load_model_spec
        model = load_model_spec(d["model_config"], dtype=d["model_dtype"])
        layout = cls(model, d["tp_size"], CacheConfig.from_dict(d["cache"]))
        if "digest" in d and layout.digest != d["digest"]:
            raise LayoutError(f"rebuilt layout digest {layout.digest} differs from the sent "
                              f"digest {d['digest']}")
        return layout

    @cached_property
    def digest(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- helpers ---------------------------------------------------------------------------

def _tensor_geometry(t: StateTensor) -> dict[str, Any]:
    return {"layer": t.layer, "name": t.name, "dtype": t.dtype, "sharded_dim": t.sharded_dim,
            "dims": [[d.name, d.extent] for d in t.dims],
            "segments": [[s.name, s.unit_count, s.unit_size, s.rule.kind.value] for s in t.segments]}


def _local_units(t: StateTensor, tp: int, r: int) -> list[tuple[int, int]]:
    return [s.units(tp, r) for s in t.segments]


def _sharded_extent(t: StateTensor, tp: int, r: int) -> int:
    return sum((b - a) * s.unit_size for s, (a, b) in zip(t.segments, _local_units(t, tp, r)))


def _extents(t: StateTensor, tp: int, r: int, given: dict[str, int]) -> list[int]:
    out = []
    for d in t.dims:
        if d.name == t.sharded_dim:
            out.append(_sharded_extent(t, tp, r))
        elif d.name in given:
            out.append(given[d.name])
        else:
            out.append(d.extent)
    return out


def _elements(t: StateTensor, tp: int, r: int, given: dict[str, int]) -> int:
    n = 1
    for e in _extents(t, tp, r, given):
        n *= e
    return n


def _align(n: int) -> int:
    return -(-n // TENSOR_ALIGN) * TENSOR_ALIGN


def _page_bases(group: list[StateTensor], tp: int, r: int, layers: int = 1) -> tuple[list[int], int]:
    """Byte base of each state tensor within one page (holding `layers` layers of each), and
    the natural page size."""
    bases, off = [], 0
    for t in group:
        off = _align(off)
        bases.append(off)
        off += layers * _elements(t, tp, r, {BLOCK: 1}) * DTYPE_BYTES[t.dtype]
    return bases, _align(off)


def _signature(group: list[StateTensor]) -> tuple:
    """What must match for layers to share an interleaved region."""
    return tuple((t.name, t.dims, t.segments, t.dtype, t.paged) for t in group)


def _layer_axis_position(t: StateTensor) -> int:
    """Where the layer axis goes: just inside the sharded dim, so that a rank's units of a
    segment are adjacent across layers (outside the block dim of heads-across-blocks KV, so
    one layer's blocks stay adjacent)."""
    return t.dim_index(t.sharded_dim) + 1


def _tensor_layout(t: StateTensor, tp: int, r: int, region: int, base: int, num_blocks: int,
                   kernel_tokens: int, page_nbytes: int | None,
                   layers: tuple[int, int] = (1, 0)) -> TensorLayout:
    """Row-major strides over t.dims; a state tensor's block stride is the page size.

    `layers` = (count, index): the region interleaves `count` layers along an extra axis
    (see _layer_axis_position); this tensor is layer `index` of them.
    """
    itemsize = DTYPE_BYTES[t.dtype]
    extents = _extents(t, tp, r, {BLOCK: num_blocks, TOKEN: kernel_tokens})
    num_layers, layer = layers
    at = _layer_axis_position(t)
    full = extents[:at] + [num_layers] + extents[at:]
    strides, acc = [0] * len(full), itemsize
    for i in reversed(range(len(full))):
        strides[i] = acc
        acc *= full[i]
    base += layer * strides.pop(at)
    if page_nbytes is not None:
        strides[t.dim_index(BLOCK)] = page_nbytes
    units = _local_units(t, tp, r)
    offsets, acc_el = [], 0
    for s, (a, b) in zip(t.segments, units):
        offsets.append(acc_el)
        acc_el += (b - a) * s.unit_size
    axes = tuple(Axis(d.name, e, s) for d, e, s in zip(t.dims, extents, strides))
    return TensorLayout(t, region, base, axes, tuple(units), tuple(offsets), itemsize)


def _placed_tensor_layout(t: StateTensor, tp: int, r: int, region: int, base: int,
                          order: tuple[str, ...], page_nbytes: int, num_blocks: int,
                          kernel_tokens: int) -> TensorLayout:
    """Row-major strides over `order` (outermost first); the block stride is the page."""
    names = [d.name for d in t.dims]
    if sorted(order) != sorted(names):
        raise LayoutError(f"placement: layer {t.layer} {t.name} order {list(order)}; "
                          f"allowed: a permutation of {names}")
    itemsize = DTYPE_BYTES[t.dtype]
    extents = dict(zip(names, _extents(t, tp, r, {BLOCK: num_blocks, TOKEN: kernel_tokens})))
    strides, acc = {}, itemsize
    for name in reversed(order):
        if name == BLOCK:
            continue
        strides[name], acc = acc, acc * extents[name]
    strides[BLOCK] = page_nbytes
    units = _local_units(t, tp, r)
    offsets, acc_el = [], 0
    for s, (a, b) in zip(t.segments, units):
        offsets.append(acc_el)
        acc_el += (b - a) * s.unit_size
    axes = tuple(Axis(n, extents[n], strides[n]) for n in names)
    return TensorLayout(t, region, base, axes, tuple(units), tuple(offsets), itemsize)


def _shard_problem(groups: list[list[StateTensor]], tp: int) -> str:
    """Why tp cannot shard these tensors (a segment left empty on some rank), or ''."""
    for g in groups:
        for t in g:
            for s in t.segments:
                for r in range(tp):
                    a, b = s.units(tp, r)
                    if b <= a:
                        return (f"rank {r} would hold no {s.name} units of layer {t.layer} "
                                f"{t.name} ({s.unit_count} units, rule {s.rule.kind.value})")
    return ""


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
