"""Pure transfer planning: which bytes each decode rank reads from which prefill rank."""
from .cost_model import CostModel
from .plan_cache import PlanCache
from .planner import parse_strategy, plan_transfer
from .push_batches import PUSH_STRATEGIES, LayerBatch, check_push_strategy, push_batches
from .transfer_plan import SCRATCH, CopyList, ReadGroup, RequestBlocks, Strategy, TransferPlan

__all__ = ["CostModel", "CopyList", "LayerBatch", "PlanCache", "PUSH_STRATEGIES",
           "check_push_strategy", "push_batches", "ReadGroup", "RequestBlocks", "SCRATCH",
           "Strategy", "TransferPlan", "parse_strategy", "plan_transfer"]
