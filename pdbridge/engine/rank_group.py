"""RankGroup: the TP group of one engine, built without torch.distributed's global state.

Each engine makes its own process groups from its own store, so one process can drive
several engines (a prefill and a decode engine in one test or demo). Two groups:
* control (gloo, CPU): rank 0 broadcasts each call; idle ranks wait here, so their side's
  timeout is long (a dead rank 0 closes the sockets, and workers also watch their parent).
  Rank 0 never waits without a deadline (issue 12: one SIGSTOPped worker hung the engine):
  it polls each of its control collectives until `deadline_s`, so a stopped rank becomes a
  CollectiveTimeout and Ctrl-C reaches it between polls;
* compute (gloo on CPU, nccl on CUDA): the model's all-reduces, with the engine's timeout.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = datetime.timedelta(days=7)
LOOPBACK = "127.0.0.1"      # one engine's ranks share a host (DESIGN.md section 6)
POLL_S = 0.0002             # rank 0's poll of a pending control collective


def _gloo_options(timeout: datetime.timedelta):
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    opts._timeout = timeout
    return opts


class Rendezvous:
    """A private folder (0700) holding one engine's FileStore; its owner (the engine) removes
    it on close. `path` goes to the workers."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="pdbridge-rendezvous-")
        self.path = os.path.join(self._dir, "store")

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class CollectiveTimeout(RuntimeError):
    """A rank did not take part in a control collective before the deadline (stopped, hung)."""


class GroupComm:
    """What the model needs from its TP group (pdbridge.model contract): rank, size, a sum."""

    def __init__(self, pg, rank: int, size: int):
        self._pg, self.rank, self.size = pg, rank, size

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self._pg.allreduce([tensor]).wait()
        return tensor


class RankGroup:
    """The rendezvous is a FileStore in a private folder (Rendezvous), not a TCPStore: a
    TCPStore server listens on every interface whatever host it is given (issue 12), and one
    host's ranks need no network to meet. The gloo pairs are bound to 127.0.0.1 explicitly."""

    def __init__(self, store_path: str, rank: int, size: int, device: torch.device,
                 timeout_s: float, join_timeout_s: float | None = None):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.size = rank, size
        self.deadline_s = timeout_s         # rank 0's bound on each control collective
        self.store = dist.FileStore(store_path, size)
        # Meeting waits for the other ranks to start (join_timeout_s), not for a collective.
        self.store.set_timeout(datetime.timedelta(seconds=max(timeout_s, join_timeout_s or 0)))
        self.control = dist.ProcessGroupGloo(dist.PrefixStore("control", self.store), rank, size,
                                             _gloo_options(CONTROL_TIMEOUT))
        comp_store = dist.PrefixStore("compute", self.store)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            compute = dist.ProcessGroupNCCL(comp_store, rank, size, opts)
        else:
            compute = dist.ProcessGroupGloo(comp_store, rank, size, _gloo_options(timeout))
        self.comm = GroupComm(compute, rank, size)

    def broadcast_bytes(self, data: bytes | None, deadline_s: float | None = None) -> bytes:
        """Rank 0 passes the bytes; every rank returns them. Length first, then payload."""
        until = self._until(deadline_s)
        n = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        self._wait(self.control.broadcast(n, 0), until, "broadcast")
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(n), dtype=torch.uint8)
        if buf.numel():
            self._wait(self.control.broadcast(buf, 0), until, "broadcast")
        return data if self.rank == 0 else buf.numpy().tobytes()

    def gather_bytes(self, data: bytes, deadline_s: float | None = None) -> list[bytes]:
        """Every rank's bytes, on every rank (all-gather of padded buffers)."""
        until = self._until(deadline_s)
        n = torch.tensor([len(data)], dtype=torch.int64)
        lens = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        self._wait(self.control.allgather([lens], [n]), until, "gather")
        width = max(1, max(int(x) for x in lens))
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
        self._wait(self.control.allgather([bufs], [mine]), until, "gather")
        return [b[:int(k)].numpy().tobytes() for b, k in zip(bufs, lens)]

    def _until(self, deadline_s: float | None) -> float | None:
        if self.rank != 0:
            return None                     # workers wait for rank 0 as long as it lives
        return time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)

    def _wait(self, work, until: float | None, what: str) -> None:
        if until is None:
            work.wait()
            return
        while not work.is_completed():      # Python runs between polls: Ctrl-C gets through
            if time.monotonic() > until:
                raise CollectiveTimeout(f"a TP rank did not join the control {what} within "
                                        f"the deadline (stopped or hung?)")
            time.sleep(POLL_S)
        work.wait()                         # raises what the collective failed with
