"""Run a function on t CPU ranks (torch.distributed, gloo) and return every rank's result.
The ranks are forked from the fork server the engines use (torch imported once per session,
not once per rank)."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from pdbridge.engine.llm_engine import rank_process_context


def _worker(rank: int, size: int, outdir: str, fn, args) -> None:
    import torch.distributed as dist
    from pdbridge.model import TorchDistComm
    torch.set_num_threads(1)
    # A file rendezvous: a port picked free beforehand can be taken by another process in
    # the meantime (on a busy machine the suite would then fail now and then).
    dist.init_process_group("gloo", init_method=f"file://{outdir}/rendezvous", rank=rank,
                            world_size=size)
    try:
        result = fn(TorchDistComm(), *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_tp(fn, size: int, *args) -> list:
    """fn(comm, *args) on `size` ranks; fn must be a module-level (picklable) function."""
    with tempfile.TemporaryDirectory() as outdir:
        rank_process_context()       # the engines' fork server: torch and pdbridge imported once
        mp.start_processes(_worker, args=(size, outdir, fn, args), nprocs=size, join=True,
                           start_method="forkserver")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(size)]
