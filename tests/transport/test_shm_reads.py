"""Same-host reads go through UCX's shared-memory transports (nixl.DEFAULT_MM_ERROR_HANDLING):
under ucx_error_handling_mode=peer UCX leaves those transports out unless they are asked to
report peer failures, and then emulates every read with active messages over TCP loopback.
UCX names the lanes it chose per endpoint at UCX_LOG_LEVEL=info; this reads that line."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("nixl")

SCRIPT = r"""
import numpy as np
from pdbridge.transport.nixl import NixlTransport
from pdbridge.transport.transport import ReadList, XferState
a, b = NixlTransport("lanes-src"), NixlTransport("lanes-dst")
src, dst = np.arange(8192, dtype=np.uint8), np.zeros(8192, np.uint8)
a.register_regions([src]); b.register_regions([dst])
b.add_peer("lanes-src", a.metadata()); a.add_peer("lanes-dst", b.metadata())
one = lambda v, dt: np.asarray([v], dt)
h = b.read("lanes-src", ReadList(one(0, np.int32), one(0, np.int64), one(0, np.int32),
                                 one(0, np.int64), one(8192, np.int64)))
while b.poll(h).state is XferState.PENDING:
    a.get_notifications()
assert bytes(dst) == bytes(src)
a.close(); b.close()
"""


def _lanes(env_extra: dict) -> list[str]:
    """The RMA lanes of UCX's intra-node endpoint config, from a read in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}
    env.update(UCX_LOG_LEVEL="info", **env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines()
             if "intra-node cfg" in line]
    assert lines, "UCX printed no intra-node endpoint config"
    return re.findall(r"\b(rma(?:_am)?)\(([^)]*)\)", lines[0])


def test_same_host_reads_use_shared_memory_not_tcp():
    lanes = _lanes({})
    assert lanes and all(kind == "rma" and "memory" in tls and "tcp" not in tls
                         for kind, tls in lanes), lanes


def test_the_check_tells_tcp_emulation_apart():
    """Without the setting, the same read's lanes are active messages over TCP."""
    lanes = _lanes({"UCX_MM_ERROR_HANDLING": "n"})
    assert any(kind == "rma_am" and "tcp" in tls for kind, tls in lanes), lanes
