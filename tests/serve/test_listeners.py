"""Every listener binds the address it was given, 127.0.0.1 by default (issue 12): the TP
rendezvous, gloo, the metadata servers and UCX, on a prefill engine at TP=2 and a decode engine
after a transfer. Read from /proc: each process's listening TCP sockets."""
import os

import pytest

from pd_harness import PROMPTS, cache, monolithic
from pdbridge.engine.request import SamplingParams
from pdbridge.serve.decode_node import DecodeNode
from pdbridge.serve.prefill_node import PrefillNode
from pdbridge.serve.router import PDRouter

LISTEN = "0A"


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    if len(host) == 8:                              # IPv4, little-endian
        return ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0)) + f":{int(port, 16)}"
    words = [host[i:i + 8] for i in range(0, 32, 8)]
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    import ipaddress
    return f"[{ipaddress.IPv6Address(raw)}]:{int(port, 16)}"


def listening(pids) -> list[str]:
    inodes = set().union(*(_socket_inodes(p) for p in pids))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == LISTEN and cols[9] in inodes:
                    found.append(_address(cols[1]))
    return found


def test_the_parser_sees_an_external_listener():
    """The check can fail: a socket bound to every interface is reported as such."""
    import socket
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert f"0.0.0.0:{s.getsockname()[1]}" in listening([os.getpid()])


def test_every_listener_is_on_loopback(model_dir):
    pre = PrefillNode(model_dir, 2, cache(), transport="nixl")
    dec = DecodeNode(model_dir, 1, cache(), transport="nixl", strategy="direct")
    try:
        want = monolithic(model_dir, PROMPTS[:1], 4)
        records = PDRouter(pre, [dec]).run(PROMPTS[:1], SamplingParams(max_tokens=4))
        assert [r.token_ids for r in records] == want          # the transfer happened
        pids = [os.getpid(), *(p.pid for p in pre.engine._procs)]
        found = listening(pids)
        assert found, "a TP=2 engine with NIXL listens somewhere"
        wrong = [a for a in found if not (a.startswith("127.") or a.startswith("[::1]"))]
        assert not wrong, f"listening beyond the loopback: {wrong}"
    finally:
        pre.close()
        dec.close()


@pytest.fixture(scope="module")
def model_dir():
    from pdbridge.model import default_model
    return str(default_model.model_dir())
