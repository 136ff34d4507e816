"""The reference engine: block pool, paged caches from EngineLayout, scheduler, TP workers."""
from .block_pool import BlockPool, BlockPoolError
from .llm_engine import Engine, EngineError, GenerateOutput, RequestHandle, StepOutput
from .messages import WorkerCall
from .paged_caches import PagedCaches
from .request import FinishReason, Request, RequestStatus, SamplingParams
from .scheduler import EngineFull, RequestTooLarge, SchedulerConfig

__all__ = ["BlockPool", "BlockPoolError", "Engine", "EngineError", "GenerateOutput",
           "RequestHandle", "StepOutput", "WorkerCall", "PagedCaches", "FinishReason", "Request",
           "RequestStatus", "SamplingParams", "EngineFull", "RequestTooLarge", "SchedulerConfig"]
