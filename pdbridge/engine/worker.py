"""Worker: one TP rank's model shard and caches, and the loop ranks 1..t-1 run.

Rank 0's Worker lives in the engine's process; the others run `worker_main` in forked
processes and execute each call rank 0 broadcasts (`WorkerCall.handler` names the method), so
every rank runs the same forward with its own shard and its own caches.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pdbridge.spec import CacheConfig, EngineLayout

from .messages import Describe, RankInfo, Shutdown, Step, WorkerCall, decode_call, encode
from . import cache_snapshot, pd_calls  # noqa: F401  (register their calls on every rank)
from .cpu_affinity import pin_process, rank_cpus
from .paged_caches import PagedCaches
from .rank_group import RankGroup

# (model_dir, comm, device, dtype) -> (ModelSpec, model); must be picklable (a module function).
ModelLoader = Callable[..., tuple[Any, torch.nn.Module]]


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs to build itself; sent once, at spawn."""
    model_dir: str | None
    tp_size: int
    cache_config: CacheConfig
    device: str
    dtype: str | None
    loader: ModelLoader
    timeout_s: float
    num_threads: int
    cpus: tuple[int, ...] | None = None     # the CPUs the ranks split (cpu_affinity); None: any


class Worker:
    def __init__(self, rank: int, args: WorkerArgs, comm):
        self.rank, self.args = rank, args
        self.device = _rank_device(args.device, rank)
        self.spec, self.model = args.loader(args.model_dir, comm, self.device, args.dtype)
        self.layout = EngineLayout(self.spec, args.tp_size, args.cache_config)
        self.caches = PagedCaches(self.layout, rank, self.device)
        self.pd = None          # PrefillRank or DecodeRank, once a PDSetup call opened it
        self.running = True

    def handle(self, call: WorkerCall) -> Any:
        """`handler` names a method of this Worker, or of one of its parts (`pd.pull`)."""
        target = self
        *path, method = call.handler.split(".")
        for part in path:
            target = getattr(target, part)
            if target is None:
                raise RuntimeError(f"{call.handler}: this rank has no {part!r} set up")
        return getattr(target, method)(call)

    def snapshot(self, call) -> Any:
        """This rank's cache contents for one request (tests compare ranks and engines)."""
        from .cache_snapshot import snapshot
        return snapshot(self.caches, call)

    def setup_pd(self, call) -> Any:
        """Open this rank's side of P/D (pdbridge.engine.pd_rank.open_rank) on its caches."""
        from .pd_rank import open_rank
        if self.pd is not None:
            self.pd.close()
            self.pd = None
        self.pd = open_rank(self, call)
        return self.pd.info()

    @torch.inference_mode()
    def step(self, call: Step) -> torch.Tensor:
        """Logits (num_seqs, vocab) at each sequence's last token."""
        from pdbridge.model.batch import ForwardBatch
        batch = ForwardBatch(call.input_ids, call.positions, call.query_lens, call.context_lens,
                             call.block_tables, call.state_slots)
        if self.device.type != "cpu":
            batch = ForwardBatch(*(getattr(batch, f).to(self.device) for f in _BATCH_FIELDS))
        if self.pd is None:
            return self.model(batch, self.caches)
        try:
            return self._pd_forward(batch)
        finally:
            self.pd.expect_reads()      # a prefill's readers come right after its forward

    def _pd_forward(self, batch) -> torch.Tensor:
        hook = self.pd.layer_hook()
        if hook is None:
            return self.model(batch, self.caches)
        self.model.after_layer = hook       # push mode: write each layer's final bytes
        try:
            logits = self.model(batch, self.caches)
        except BaseException as e:
            self.pd.finish_push(f"the prefill forward failed: {type(e).__name__}: {e}")
            raise
        finally:
            self.model.after_layer = None
        self.pd.finish_push()
        return logits

    def describe(self, call: Describe) -> RankInfo:
        return RankInfo(self.rank, self.layout.digest,
                        [b.numel() for b in self.caches.region_buffers], torch.get_num_threads())

    def shutdown(self, call: Shutdown) -> None:
        if self.pd is not None:
            self.pd.close()
            self.pd = None
        self.running = False


_BATCH_FIELDS = ("input_ids", "positions", "query_lens", "context_lens", "block_tables",
                 "state_slots")


def _rank_device(device: str, rank: int) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", rank)
    return d


def worker_main(rank: int, args: WorkerArgs, store_path: str, parent_pid: int) -> None:
    """Process entry of ranks 1..t-1: build, then run calls until Shutdown."""
    # Ctrl-C in a terminal signals the whole process group; the engine's process (rank 0)
    # alone decides how its ranks stop (Engine.close), so a worker never dies mid-collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # already so since pdbridge/__init__.py
    if args.cpus:                   # first: the threads it starts inherit it
        why = pin_process(rank_cpus(args.cpus, args.tp_size, rank))
        if why:
            print(f"pdbridge rank {rank}: {why}; running unpinned", file=sys.stderr)
    torch.set_num_threads(args.num_threads)
    _watch_parent(parent_pid)
    try:
        device = _rank_device(args.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = RankGroup(store_path, rank, args.tp_size, device, args.timeout_s)
        worker = Worker(rank, args, group.comm)
        while worker.running:
            call = decode_call(group.broadcast_bytes(None))
            result = worker.handle(call)
            if call.collect:
                group.gather_bytes(encode(result))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the engine's process is gone (killed hard, so no Shutdown ever comes). Ranks
    are forked by a server process (`rank_process_context`), so the engine is not our parent: watch
    its pid through a pidfd, which cannot be fooled by a reused pid."""
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(3)

    def watch():
        select.select([fd], [], [])     # readable once the process has exited
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="pdbridge-parent-watch").start()
