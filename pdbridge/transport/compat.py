"""Refuse incompatible prefill/decode geometry before a single byte moves (DESIGN.md section 5).

A decode engine can read a prefill engine's state only if both describe the same model state:
same model, same dtypes, same tensors with the same dims, segments and shard rules, the same
conv rows. They may differ in TP size, block sizes and physical layouts; the planner bridges
those, except for the layout pairs a strategy cannot handle, which are data (`PAIR_RULES`).

Fields are compared one by one in a fixed order and the first difference is reported by
path, e.g. `tensors[3].dims.state_len`, with both values (vLLM checks no state size or conv
rows at handshake; REFERENCE.md "How other engines stand").
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..plan.transfer_plan import Strategy
from ..spec.layout import EngineLayout
from ..spec.sharding import StateTensor

CONCRETE_STRATEGIES = (Strategy.DIRECT, Strategy.STAGING, Strategy.PERMUTE)


class GeometryMismatch(ValueError):
    """Prefill and decode geometry differ in `field` (a path); both values are kept."""

    def __init__(self, field: str, prefill_value: Any, decode_value: Any, why: str = ""):
        self.field, self.prefill_value, self.decode_value = field, prefill_value, decode_value
        msg = f"incompatible geometry at {field}: prefill {prefill_value!r}, decode {decode_value!r}"
        super().__init__(msg + (f" ({why})" if why else ""))


@dataclass(frozen=True)
class PairRule:
    """A layout pair some strategies cannot bridge.

    `field` is an attribute path on EngineLayout (e.g. "cache.conv_layout"); the pair
    (prefill value, decode value) is bridgeable by the strategies in `strategies` only when
    `allowed(prefill_value, decode_value)` holds.
    """
    field: str
    strategies: frozenset[Strategy]
    allowed: Callable[[Any, Any], bool]
    why: str


def _same(p: Any, d: Any) -> bool:
    return p == d


# The planner pairs tensors by (layer, name): a packed "kv" tensor has no partner among split
# "k"/"v" tensors, whatever the strategy. Conv layouts (SD/DS), attention layouts, block sizes
# and page padding are bridged by every strategy (the planner works from strides).
PAIR_RULES: tuple[PairRule, ...] = (
    PairRule("cache.kv_packed", frozenset(CONCRETE_STRATEGIES), _same,
             "packed and split K/V tensors do not pair"),
)


def check_compatible(prefill: EngineLayout, decode: EngineLayout,
                     strategy: Strategy = Strategy.DIRECT,
                     rules: Iterable[PairRule] = PAIR_RULES) -> None:
    """Raise GeometryMismatch naming the first field in which the two layouts cannot meet.

    Order: model-wide fields, layout pairs the strategy cannot bridge, block rules, then every
    tensor field by field. AUTO passes if any concrete strategy can bridge the pair.
    """
    for path, pv, dv in _model_fields(prefill, decode):
        if pv != dv:
            raise GeometryMismatch(path, pv, dv)
    _check_pair_rules(prefill, decode, strategy, tuple(rules))
    _check_block_rules(prefill, decode)
    check_tensors(prefill.tensors, decode.tensors)


def bridging_strategies(prefill: EngineLayout, decode: EngineLayout,
                        rules: Iterable[PairRule] = PAIR_RULES) -> list[Strategy]:
    """The concrete strategies whose layout-pair rules this pair satisfies."""
    rules = tuple(rules)
    return [s for s in CONCRETE_STRATEGIES if _pair_problem(prefill, decode, s, rules) is None]


# ---- the parts ---------------------------------------------------------------------------

def _model_fields(p: EngineLayout, d: EngineLayout) -> Iterator[tuple[str, Any, Any]]:
    gp, gd = p.geometry(), d.geometry()
    for key in ("model_type", "hidden_size", "layers", "dtype", "ssm_dtype"):
        yield key, gp[key], gd[key]


def _check_pair_rules(p: EngineLayout, d: EngineLayout, strategy: Strategy,
                      rules: tuple[PairRule, ...]) -> None:
    candidates = CONCRETE_STRATEGIES if strategy is Strategy.AUTO else (strategy,)
    problems = [_pair_problem(p, d, s, rules) for s in candidates]
    if any(pr is None for pr in problems):
        return
    raise problems[0]


def _pair_problem(p: EngineLayout, d: EngineLayout, strategy: Strategy,
                  rules: tuple[PairRule, ...]) -> GeometryMismatch | None:
    for rule in rules:
        if strategy not in rule.strategies:
            continue
        pv, dv = _attr(p, rule.field), _attr(d, rule.field)
        if not rule.allowed(pv, dv):
            return GeometryMismatch(rule.field, _plain(pv), _plain(dv),
                                    f"strategy {strategy.value}: {rule.why}")
    return None


def _check_block_rules(p: EngineLayout, d: EngineLayout) -> None:
    # A kernel block must tile a logical block exactly: the planner maps token t of block b
    # to kernel block b * (block_tokens // kernel_block_tokens) + ...
    for side, layout in (("prefill", p), ("decode", d)):
        if layout.block_tokens % layout.kernel_block_tokens:
            raise GeometryMismatch(
                "kernel_block_tokens", p.kernel_block_tokens, d.kernel_block_tokens,
                f"{side} kernel_block_tokens={layout.kernel_block_tokens} does not divide "
                f"block_tokens={layout.block_tokens}")


def check_tensors(ps: list[StateTensor], ds: list[StateTensor]) -> None:
    """The tensor part of check_compatible, for tensors of any origin."""
    if len(ps) != len(ds):
        raise GeometryMismatch("tensors.count", len(ps), len(ds), _first_extra(ps, ds))
    for i, (tp, td) in enumerate(zip(ps, ds)):
        for path, pv, dv in _tensor_fields(tp, td):
            if pv != dv:
                raise GeometryMismatch(f"tensors[{i}].{path}", pv, dv,
                                       f"prefill layer {tp.layer} {tp.name}")


def _tensor_fields(p: StateTensor, d: StateTensor) -> Iterator[tuple[str, Any, Any]]:
    """Field paths in check order. Dims are compared by name: their order is the physical
    layout (SD vs DS conv, attention layouts), which the planner bridges."""
    for key in ("layer", "name", "dtype", "sharded_dim", "paged"):
        yield key, getattr(p, key), getattr(d, key)
    pdims, ddims = {x.name: x.extent for x in p.dims}, {x.name: x.extent for x in d.dims}
    yield "dims", sorted(pdims), sorted(ddims)
    for name in sorted(pdims):
        yield f"dims.{name}", pdims[name], ddims[name]
    yield "segments.count", len(p.segments), len(d.segments)
    for j, (sp, sd) in enumerate(zip(p.segments, d.segments)):
        for key in ("name", "unit_count", "unit_size"):
            yield f"segments[{j}].{key}", getattr(sp, key), getattr(sd, key)
        yield f"segments[{j}].rule.kind", sp.rule.kind.value, sd.rule.kind.value
        yield f"segments[{j}].rule.num_heads", sp.rule.num_heads, sd.rule.num_heads
        yield f"segments[{j}].rule.granule", sp.rule.granule, sd.rule.granule


def _first_extra(ps: list[StateTensor], ds: list[StateTensor]) -> str:
    kp, kd = [t.key for t in ps], [t.key for t in ds]
    for a, b in zip(kp, kd):
        if a != b:
            return f"first differing tensor: prefill {a}, decode {b}"
    longer, side = (kp, "prefill") if len(kp) > len(kd) else (kd, "decode")
    return f"{side} has extra tensor {longer[min(len(kp), len(kd))]}"


def _attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _plain(v: Any) -> Any:
    return v.value if isinstance(v, enum.Enum) else v
