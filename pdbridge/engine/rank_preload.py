"""What the server that forks TP ranks imports once (`llm_engine.rank_process_context`), so that no
rank pays for it again: torch, the worker and its P/D calls, and torch's meta-device kernels.

Those kernels are imported lazily, on the first operation on a meta tensor (they bring in
torch._dynamo: 1-2.5 s of CPU here), and every rank builds its model once on the meta device
to check the checkpoint's shapes (`checkpoint_check.check_shapes`). Nothing here starts a
thread or touches a device, so a fork of this process is as clean as a fresh one.
"""
import torch

from . import pd_rank, worker  # noqa: F401  (imported for the ranks forked from here)


def warm_meta_kernels() -> None:
    """Best effort: an error here would end the fork server (it forgives only ImportError),
    and a rank that finds the kernels unimported imports them itself."""
    try:
        with torch.device("meta"):
            torch.nn.Embedding(2, 2)
    except Exception:       # noqa: BLE001  (a warm-up; the rank does the real work)
        pass


warm_meta_kernels()
