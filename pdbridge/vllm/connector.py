"""PdbridgeConnector: vLLM's KV connector interface (v1, hybrid KV cache groups) done with
pdbridge's parts: vLLM's cache tensors as an EngineLayout (layout.py), `plan_transfer` for
the reads, `NixlTransport` for the bytes, our CURVE handshake with its geometry check.

Flow (vLLM's own): the client sends the prompt to the prefill server with
kv_transfer_params {"do_remote_decode": true} and max_tokens 1; the prefill server computes
all but the prompt's last token (a recurrent state cannot be rolled back, and the decode
server must compute at least one token) and returns kv_transfer_params (wire.RemotePrefill)
naming its blocks; the client sends the whole prompt with those parameters to the decode
server, whose workers read their shard from every prefill rank it needs, compute the last
prompt token and go on. Each decode rank then tells every prefill rank it is done
(ReadDone with `readers` = its TP size), and each prefill worker frees the request's blocks
once all decode ranks said so, or when the lease runs out.

Threads and sockets: each worker owns one transport, one metadata server (its side channel
at VLLM_NIXL_SIDE_CHANNEL_PORT + tp rank) and one poller thread (NIXL's passive side needs
progress), and closes all three in `shutdown`. Reads run in
start_load_kv, on vLLM's worker thread; a failed read (transfer, peer gone, geometry) is
logged in one line and reports the request's blocks as failed, and vLLM's
kv_load_failure_policy decides (its default, "fail", fails that request; "recompute"
computes it on the decode server).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.utils import clip_ssm_state_blocks
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorTransferResults,
    SupportsHMA)
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

from pdbridge.plan import RequestBlocks, Strategy, plan_transfer
from pdbridge.transport.chunks import layout_zones
from pdbridge.transport.copies import execute_plan
from pdbridge.transport.handshake import MetadataServer, PeerDirectory, RankMetadata, peer_name
from pdbridge.transport.messages import ProtocolError, ReadDone, RegionAddr, decode, encode
from pdbridge.transport.side_channel_key import load_key

from .layout import TensorView, VllmView, check_views, vllm_layout, whole_blocks
from .wire import ParamsError, Recv, RemotePrefill, StepMeta

log = logging.getLogger("vllm").getChild("pdbridge")    # vLLM's handlers print it
DEFAULT_LEASE_S = 60.0
DEFAULT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.001
MAX_INBOX = 4096            # notifications kept from one poll; a flood beyond is dropped


class PdbridgeMeta(KVConnectorMetadata):
    def __init__(self, step: StepMeta):
        self.step = step


def _side_channel() -> tuple[str, int]:
    from vllm import envs
    return envs.VLLM_NIXL_SIDE_CHANNEL_HOST, envs.VLLM_NIXL_SIDE_CHANNEL_PORT


def _groups(kv_cache_config) -> tuple[int, int]:
    """(attention group, state group) indices; one of each is what this connector moves."""
    attn = [i for i, g in enumerate(kv_cache_config.kv_cache_groups)
            if isinstance(g.kv_cache_spec, FullAttentionSpec)]
    state = [i for i, g in enumerate(kv_cache_config.kv_cache_groups)
             if isinstance(g.kv_cache_spec, MambaSpec)]
    if len(attn) > 1 or len(state) != 1:
        raise ValueError(
            f"pdbridge.vllm moves one full-attention and one state KV cache group; this model "
            f"has {len(attn)} attention and {len(state)} state groups "
            f"({[type(g.kv_cache_spec).__name__ for g in kv_cache_config.kv_cache_groups]})")
    return (attn[0] if attn else -1), state[0]


class PdbridgeConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.lease_s = float(extra.get("lease_s", DEFAULT_LEASE_S))
        self.timeout_s = float(extra.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.engine_id = vllm_config.kv_transfer_config.engine_id
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.attn_group, self.state_group = _groups(kv_cache_config)
        self.num_spec_blocks = kv_cache_config.kv_cache_groups[
            self.state_group].kv_cache_spec.num_speculative_blocks
        self.host, self.port = _side_channel()
        load_key()      # refuse at start, in one line, without the deployment's secret
        if role == KVConnectorRole.SCHEDULER:
            self._recv: list[Recv] = []
            self._send: dict[str, float] = {}
            self._digest: str | None = None
        else:
            self.worker: _Worker | None = None

    # ---- scheduler side ------------------------------------------------------------

    def on_new_request(self, request) -> None:
        params = request.kv_transfer_params
        if params and params.get("do_remote_decode") and not params.get("_pdbridge_cut"):
            _compute_all_but_last(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        remote = self._remote(request)
        if remote is None:
            return 0, False
        # The state moved is the one after the prompt's first n - 1 tokens (the prefill
        # side stopped one short); anything else would be another point in the sequence.
        if remote.remote_num_tokens != request.num_prompt_tokens - 1:
            return 0, False     # computed here; update_state_after_alloc releases the prefill
        count = remote.remote_num_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        remote = self._remote(request)
        if remote is None:
            return
        request.kv_transfer_params["do_remote_prefill"] = False     # one transfer a request
        if num_external_tokens == 0:        # nothing to read: only release the prefill blocks
            self._recv.append(Recv(request.request_id, remote, 0, [], 0, notify_only=True))
            return
        ids = blocks.get_block_ids()
        attn = list(ids[self.attn_group]) if self.attn_group >= 0 else []
        state = clip_ssm_state_blocks(list(ids[self.state_group]), self.num_spec_blocks)
        self._recv.append(Recv(request.request_id, remote, remote.remote_num_tokens, attn,
                               state[-1]))

    def _remote(self, request) -> RemotePrefill | None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        try:
            return RemotePrefill.parse(params)
        except ParamsError as e:
            log.error("request %s: %s; computing it here instead", request.request_id, e)
            params["do_remote_prefill"] = False
            return None

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = PdbridgeMeta(StepMeta(self._recv, self._send))
        self._recv, self._send = [], {}
        return meta

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        return self._kv_cache_config.transfer_group_ids

    def request_finished(self, request, block_ids):
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request, block_ids):
        from vllm.v1.request import RequestStatus
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None
        n = request.num_prompt_tokens
        if n < 1 or request.num_computed_tokens < n:
            return False, None
        attn = list(block_ids[self.attn_group]) if self.attn_group >= 0 else []
        state = clip_ssm_state_blocks(list(block_ids[self.state_group]), self.num_spec_blocks)
        if not state:
            return False, None
        self._send[request.request_id] = self.lease_s
        return True, dict(
            do_remote_prefill=True, do_remote_decode=False,
            remote_engine_id=self.engine_id, remote_request_id=request.request_id,
            remote_host=self.host, remote_port=self.port, remote_tp_size=self.tp_size,
            remote_num_tokens=n, remote_attn_blocks=attn, remote_state_block=state[-1])

    # ---- worker side ---------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker = _Worker(self, kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdbridgeMeta)
        self.worker.step(meta.step)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return None

    def wait_for_save(self):
        return None

    def get_transfer_results(self, finished_req_ids) -> KVConnectorTransferResults:
        return self.worker.results() if self.worker else KVConnectorTransferResults()

    def shutdown(self):
        if getattr(self, "worker", None) is not None:
            self.worker.close()
            self.worker = None


def _compute_all_but_last(request) -> None:
    """Prefill side: stop one token short of the prompt (the decode server computes it)."""
    params = request.kv_transfer_params
    if request.num_prompt_tokens <= 1 or request.prompt_token_ids is None:
        return
    del request.prompt_token_ids[-1]
    del request._all_token_ids[-1]
    request.num_prompt_tokens -= 1
    request.max_tokens = 1
    params["_pdbridge_cut"] = True


class _Worker:
    """One TP rank's half: its layout, transport and side channel."""

    def __init__(self, conn: PdbridgeConnector, kv_caches: dict[str, torch.Tensor]):
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.layers.mamba.mamba_utils import get_conv_state_layout
        from pdbridge.transport.nixl import NixlTransport
        cfg = conn._vllm_config
        self.conn, self.rank = conn, get_tensor_model_parallel_rank()
        ctx = cfg.compilation_config.static_forward_context
        attn_layers = set(conn._kv_cache_config.kv_cache_groups[conn.attn_group].layer_names) \
            if conn.attn_group >= 0 else set()
        views = [_view(name, ctx[name], name in attn_layers) for name in kv_caches]
        state_spec = conn._kv_cache_config.kv_cache_groups[conn.state_group].kv_cache_spec
        model_dtype = _dtype_name(cfg.model_config.dtype)
        self.layout = vllm_layout(
            cfg.model_config.hf_config.to_dict(), conn.tp_size,
            conn._kv_cache_config.num_blocks, cfg.cache_config.block_size,
            get_conv_state_layout(), model_dtype, _dtype_name(state_spec.dtypes[-1]), views)
        check_views(self.layout, self.rank, views)
        self.buffers = _storages(kv_caches)
        self.transport = NixlTransport(peer_name(conn.engine_id, self.rank))
        self.transport.register_regions(self.buffers, None, layout_zones(self.layout.rank(self.rank)))
        key = load_key()
        regions = tuple(RegionAddr(b.data_ptr(), b.numel()) for b in self.buffers)
        meta = RankMetadata(conn.engine_id, self.rank, self.layout, self.transport.metadata(),
                            regions)
        port = conn.port + self.rank
        try:
            self.server = MetadataServer(meta, bind=f"tcp://{conn.host}:{port}", key=key)
        except Exception as e:
            self.transport.close()
            raise RuntimeError(f"VLLM_NIXL_SIDE_CHANNEL_PORT={conn.port}: rank {self.rank} "
                               f"cannot listen on {conn.host}:{port} ({e}); give every server "
                               f"its own range of TP-size ports") from None
        self.directory = PeerDirectory(self.layout, conn.engine_id, self.rank,
                                       timeout_s=conn.timeout_s, strategy=Strategy.DIRECT,
                                       add_peer=self.transport.add_peer, key=key)
        self._sending: dict[str, float] = {}            # request id -> lease deadline
        self._done_by: dict[str, set[int]] = {}         # request id -> decode ranks done
        self._readers: dict[str, int] = {}
        self._recving_done: set[str] = set()
        self._recving_failed: set[str] = set()
        # The passive side of NIXL progresses only when polled (REFERENCE.md), and vLLM
        # steps an idle prefill engine too rarely for that: one thread polls every ms,
        # sharing the agent with this worker's own reads under one lock.
        self._agent_lock, self._inbox_lock = threading.Lock(), threading.Lock()
        self._inbox: list[bytes] = []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True,
                                        name=f"pdbridge-vllm-poll-{self.rank}")
        self._poller.start()
        self.stats = {"reads": 0, "descriptors": 0, "nbytes": 0, "seconds": 0.0}
        log.info("pdbridge.vllm rank %d: layout %s, %d regions, side channel %s", self.rank,
                 self.layout.digest, len(self.buffers), self.server.endpoint)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            with self._agent_lock:
                try:
                    got = self.transport.get_notifications()
                except Exception as e:
                    log.warning("polling notifications: %s", e)
                    continue
            if got:
                with self._inbox_lock:
                    self._inbox.extend(blob for _, blob in got[:MAX_INBOX])

    # decode side: read what the step asks for
    def step(self, meta: StepMeta) -> None:
        now = time.monotonic()
        for rid, lease_s in meta.send.items():
            self._sending[rid] = now + lease_s
        for recv in meta.recv:
            self._read(recv)

    def _read(self, recv: Recv) -> None:
        remote, t0 = recv.remote, time.perf_counter()
        ok, detail = True, ""
        try:
            peers = self._peers(remote)
            if not recv.notify_only:
                prefill = self.directory.layout_of(remote.remote_engine_id)
                n = whole_blocks(prefill, self.layout, recv.num_tokens)
                plan = plan_transfer(
                    prefill, self.layout, self.rank,
                    RequestBlocks(n, tuple(remote.remote_attn_blocks),
                                  remote.remote_state_block),
                    RequestBlocks(n, tuple(recv.attn_blocks), recv.state_block),
                    Strategy.DIRECT)
                with self._agent_lock:
                    execute_plan(self.transport, plan,
                                 {r: peers[r] for r in plan.source_ranks()}, self.buffers,
                                 None, self.conn.timeout_s)
                self.stats["reads"] += 1
                self.stats["descriptors"] += plan.num_descriptors
                self.stats["nbytes"] += plan.total_nbytes
                self.stats["seconds"] += time.perf_counter() - t0
                self._write_stats()
                log.debug("request %s: rank %d read %d bytes in %d descriptors from ranks %s "
                         "(%d tokens, blocks %s/%d -> %s/%d)", recv.request_id, self.rank,
                         plan.total_nbytes, plan.num_descriptors, plan.source_ranks(),
                         recv.num_tokens, remote.remote_attn_blocks, remote.remote_state_block,
                         recv.attn_blocks, recv.state_block)
        except Exception as e:      # transfer, peer or geometry: the failure policy decides
            ok, detail = False, f"{type(e).__name__}: {e}"
            log.error("request %s: reading from %s failed: %s", recv.request_id,
                      remote.remote_engine_id, detail)
            # By request, not by block: vLLM refuses block-level failures with several KV
            # cache groups (it raised and killed the engine core when we reported blocks).
            self._recving_failed.add(recv.request_id)
        if not recv.notify_only:
            self._recving_done.add(recv.request_id)
        self._notify(remote, ReadDone(remote.remote_request_id, self.conn.engine_id, self.rank,
                                      ok, detail[:200], readers=self.conn.tp_size))

    def _peers(self, remote: RemotePrefill) -> dict[int, str]:
        ranks = list(range(remote.remote_tp_size))
        self.directory.get_ranks(remote.remote_engine_id, ranks, remote.endpoint)
        return {r: peer_name(remote.remote_engine_id, r) for r in ranks}

    def _notify(self, remote: RemotePrefill, msg: ReadDone) -> None:
        blob = encode(msg)
        for r in range(remote.remote_tp_size):
            try:
                with self._agent_lock:
                    self.transport.notify(peer_name(remote.remote_engine_id, r), blob)
            except Exception as e:
                log.warning("ReadDone to %s rank %d: %s (its lease frees the blocks)",
                            remote.remote_engine_id, r, e)

    # prefill side: which requests every decode rank is done with
    def results(self) -> KVConnectorTransferResults:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for blob in inbox:
            try:
                msg = decode(blob)
            except ProtocolError:
                continue
            if isinstance(msg, ReadDone):
                self._done_by.setdefault(msg.request_id, set()).add(msg.decode_rank)
                self._readers[msg.request_id] = max(msg.readers, 1)
        now, sent = time.monotonic(), set()
        for rid, deadline in list(self._sending.items()):
            done = self._done_by.get(rid, ())
            if (rid in self._readers and len(done) >= self._readers[rid]) or now > deadline:
                if now > deadline and len(done) < self._readers.get(rid, 1):
                    log.warning("request %s: lease ran out before every decode rank was done; "
                                "freeing its blocks", rid)
                sent.add(rid)
                del self._sending[rid]
                self._done_by.pop(rid, None)
                self._readers.pop(rid, None)
        out = KVConnectorTransferResults(finished_sending=sent,
                                         finished_recving=self._recving_done,
                                         failed_recving=self._recving_failed)
        self._recving_done, self._recving_failed = set(), set()
        return out

    def _write_stats(self) -> None:
        """With PDBRIDGE_VLLM_STATS=PREFIX, this rank's read totals go to PREFIX.<rank>.json
        (the benchmark reads them)."""
        prefix = os.environ.get("PDBRIDGE_VLLM_STATS")
        if prefix:
            with open(f"{prefix}.{self.rank}.json", "w") as f:
                json.dump(self.stats, f)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(1.0)
        self.server.close()
        self.transport.close()


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _view(name: str, layer: Any, attention: bool) -> VllmView:
    kv = layer.kv_cache
    tensors = [kv] if isinstance(kv, torch.Tensor) else list(kv)
    if tensors and isinstance(tensors[0], (list, tuple)):     # per virtual engine
        tensors = list(tensors[0])
    storage = tensors[0].untyped_storage()
    backend = layer.attn_backend.get_name() if attention else ""
    return VllmView(name, attention, storage.data_ptr(), storage.nbytes(),
                    tuple(TensorView(t.data_ptr(), tuple(t.shape), tuple(t.stride()),
                                     t.element_size()) for t in tensors), backend)


def _storages(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each distinct storage once, as a flat uint8 tensor, in address order (layout.py)."""
    seen: dict[int, torch.Tensor] = {}
    for t in kv_caches.values():
        for x in ([t] if isinstance(t, torch.Tensor) else list(t)):
            s = x.untyped_storage()
            if s.data_ptr() not in seen:
                seen[s.data_ptr()] = torch.empty(0, dtype=torch.uint8, device=x.device).set_(
                    s, 0, (s.nbytes(),))
    return [seen[a] for a in sorted(seen)]
