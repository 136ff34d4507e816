"""Prometheus metrics of a router or a `both` server, in their own registry (several apps
may share a process in tests). `/metrics` serves `render()`."""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .wire import PULL_PARTS

_TIME_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                 2.5, 5, 10, 30, 60)

# The transfer stage and its floor: fine where small requests' are (a median from buckets,
# `pdbridge bench serve`, is as fine as they are).
_FINE_BUCKETS = (0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001,
                 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01,
                 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdbridge_requests", "requests by outcome (ok, error, bad_request)",
                                ["outcome"], registry=r)
        self.ttft = Histogram("pdbridge_time_to_first_token_seconds",
                              "from request arrival to its first token", buckets=_TIME_BUCKETS,
                              registry=r)
        self.itl = Histogram("pdbridge_inter_token_seconds", "between a request's tokens",
                             buckets=_TIME_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("pdbridge_prefill_seconds",
                                         "prefill server: request to TransferParams",
                                         buckets=_TIME_BUCKETS, registry=r)
        self.transfer_bytes = Counter("pdbridge_transfer_bytes", "state bytes moved P -> D",
                                      registry=r)
        self.transfer_seconds = Histogram("pdbridge_transfer_seconds",
                                          "decode server: request to its state in place",
                                          buckets=_FINE_BUCKETS, registry=r)
        self.transfer_queued_seconds = Histogram(
            "pdbridge_transfer_queued_seconds", "of the transfer stage: waiting for the decode "
            "server's engine loop and transfer thread", buckets=_FINE_BUCKETS, registry=r)
        self.pull_seconds = Histogram("pdbridge_pull_seconds", "the slowest decode rank's own "
                                      "pull (plan, read, notify)", buckets=_FINE_BUCKETS,
                                      registry=r)
        self.pull_part_seconds = Counter("pdbridge_pull_part_seconds", "of pdbridge_pull_"
                                         "seconds, by part (plan, peers, read, verify, notify, "
                                         "other)", ["part"], registry=r)
        # `serve --floor-probe`: the probed requests, instead of in the histograms above.
        self.probe_seconds = Histogram(
            "pdbridge_probe_seconds", "a probed request's floor, measured in place: the "
            "slowest decode rank's bare NIXL read + notification", buckets=_FINE_BUCKETS,
            registry=r)
        self.probe_bytes = Counter("pdbridge_probe_bytes", "bytes the probes read", registry=r)
        self.probed_transfer_seconds = Histogram(
            "pdbridge_probed_transfer_seconds", "the probed requests' transfer stages (the "
            "probe ran in them; not in pdbridge_transfer_seconds)", buckets=_FINE_BUCKETS,
            registry=r)
        self.probed_pull_seconds = Histogram(
            "pdbridge_probed_pull_seconds", "the probed requests' pulls (not in "
            "pdbridge_pull_seconds)",
            buckets=_FINE_BUCKETS, registry=r)
        self.failures = Counter("pdbridge_failures", "failures by reason", ["reason"], registry=r)
        self.recomputed = Counter("pdbridge_recomputed", "requests recomputed after a failed "
                                  "transfer", registry=r)
        self.generated_tokens = Counter("pdbridge_generated_tokens", "tokens sent to clients",
                                        registry=r)
        self.in_flight = Gauge("pdbridge_requests_in_flight", "requests being served",
                               registry=r)
        self.blocks_in_use = Gauge("pdbridge_blocks_in_use", "cache blocks in use per server",
                                   ["server"], registry=r)
        self.queue_length = Gauge("pdbridge_queue_length", "requests waiting per server",
                                  ["server"], registry=r)

    def observe_load(self, server: str, load) -> None:
        self.blocks_in_use.labels(server).set(load.blocks_total - load.blocks_free)
        self.queue_length.labels(server).set(load.waiting)

    def observe_pull_parts(self, parts) -> None:
        """wire.PullParts of one request: each part's seconds onto its counter."""
        for part in PULL_PARTS:
            self.pull_part_seconds.labels(part).inc(getattr(parts, part + "_s"))

    def observe_transfer(self, transfer) -> None:
        """wire.TransferStats of one request: its bytes; its stage, pull and their parts, or
        for a probed request (`serve --floor-probe`, the probe ran inside its stage) its
        floor and its stage and pull apart, so the plain histograms hold plain stages."""
        self.transfer_bytes.inc(transfer.nbytes)
        if transfer.probe is not None:
            self.probe_seconds.observe(transfer.probe.seconds)
            self.probe_bytes.inc(transfer.probe.nbytes)
            self.probed_transfer_seconds.observe(transfer.seconds)
            self.probed_pull_seconds.observe(transfer.pull_s)
            return
        self.transfer_seconds.observe(transfer.seconds)
        self.transfer_queued_seconds.observe(transfer.queued_s)
        self.pull_seconds.observe(transfer.pull_s)
        if transfer.pull_parts is not None:
            self.observe_pull_parts(transfer.pull_parts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
