"""Prometheus metrics of a router or a `both` server, in their own registry (several apps
may share a process in tests). `/metrics` serves `render()`."""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .wire import PULL_PARTS

_TIME_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                 2.5, 5, 10, 30, 60)


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
                                          buckets=_TIME_BUCKETS, registry=r)
        self.transfer_queued_seconds = Histogram(
            "pdbridge_transfer_queued_seconds", "of the transfer stage: waiting for the decode "
            "server's engine loop and transfer thread", buckets=_TIME_BUCKETS, registry=r)
        self.pull_seconds = Histogram("pdbridge_pull_seconds", "the slowest decode rank's own "
                                      "pull (plan, read, notify)", buckets=_TIME_BUCKETS,
                                      registry=r)
        self.pull_part_seconds = Counter("pdbridge_pull_part_seconds", "of pdbridge_pull_"
                                         "seconds, by part (plan, peers, read, verify, notify, "
                                         "other)", ["part"], registry=r)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
