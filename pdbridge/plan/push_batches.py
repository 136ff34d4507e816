"""Push mode: a decode rank's plan, cut into what one prefill rank writes after each layer.

The plan is the pull plan (plan_transfer); in push mode its reads become the prefill rank's
writes, and a run is written as soon as the layer that last writes its source region has run
(RankLayout.region_final_layer). Layer-interleaved regions hold several layers, so their runs
go after the stack's last layer. Only `direct` plans are pushed: staging and permute need a
local copy on one side after (or before) the transfer, which layer-by-layer writes would
have to wait for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdbridge.spec import EngineLayout

from .transfer_plan import SCRATCH, Strategy, TransferPlan

PUSH_STRATEGIES = (Strategy.DIRECT,)


@dataclass(frozen=True)
class LayerBatch:
    after_layer: int            # the runs' bytes are final once this layer has run
    runs: np.ndarray            # indices into the plan's runs, in plan order


def check_push_strategy(strategy: Strategy) -> None:
    if strategy not in PUSH_STRATEGIES:
        raise ValueError(f"strategy={strategy.value!r} with transfer_mode='push'; allowed: "
                         f"{', '.join(s.value for s in PUSH_STRATEGIES)}")


def push_batches(plan: TransferPlan, prefill_layout: EngineLayout, prefill_rank: int
                 ) -> list[LayerBatch]:
    """The runs of `plan` that `prefill_rank` holds, grouped by the layer after which they
    are final, in layer order; empty when the plan reads nothing from that rank."""
    check_push_strategy(plan.strategy)
    idx = plan.reads_from(prefill_rank)
    if not len(idx):
        return []
    regions = plan.src_region[idx]
    if (regions == SCRATCH).any():
        raise ValueError("a push plan cannot read a prefill scratch buffer")
    final = np.asarray(prefill_layout.rank(prefill_rank).region_final_layer, np.int64)[regions]
    return [LayerBatch(int(layer), idx[final == layer]) for layer in np.unique(final).tolist()]
