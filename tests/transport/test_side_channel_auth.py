"""The side channel admits only holders of the shared secret (issue 12): without it a peer gets
no metadata, no region addresses and no reply at all, and its notifications are never read."""
import zmq
import pytest

from pdbridge.transport.handshake import MetadataServer, PeerTimeout, request
from pdbridge.transport.messages import MetadataReply, MetadataRequest, ReadDone, encode
from pdbridge.transport.side_channel_key import (ENV_SECRET, ENV_SECRET_FILE, SecretError,
                                                 SideChannelKey, generate_secret, load_key)
from test_handshake import rank_meta

MINE, THEIRS = SideChannelKey(b"m" * 32), SideChannelKey(b"t" * 32)


@pytest.fixture
def server():
    got = []
    with MetadataServer(rank_meta(), key=MINE, on_notification=got.append) as s:
        s.notifications = got
        yield s


def test_the_secret_holder_gets_metadata(server):
    reply = request(server.endpoint, MetadataRequest("d0", 0, "x"), 5.0, key=MINE)
    assert isinstance(reply, MetadataReply) and reply.regions


@pytest.mark.parametrize("who", ["another secret", "no CURVE at all"])
def test_without_the_secret_nothing_leaves_and_nothing_is_read(server, who):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if who == "another secret":
        THEIRS.connect_as_client(sock)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart([b"", encode(MetadataRequest("d0", 0, "x"))])
        sock.send_multipart([b"", encode(ReadDone("p0:1", "d0", 0))])
        assert not sock.poll(1000), "a reply reached a peer without the secret"
    finally:
        sock.close()
    with pytest.raises(PeerTimeout):
        request(server.endpoint, ReadDone("p0:1", "d0", 0), 1.0, key=THEIRS)
    assert (server.messages_received, server.metadata_served, server.notifications) == (0, 0, [])


def test_forged_notification_is_never_applied(server):
    with pytest.raises(PeerTimeout):
        request(server.endpoint, ReadDone("p0:1", "evil", 0), 1.0, key=THEIRS)
    request(server.endpoint, ReadDone("p0:1", "d0", 0), 5.0, key=MINE)
    assert server.notifications == [ReadDone("p0:1", "d0", 0)]


def test_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    monkeypatch.delenv(ENV_SECRET_FILE, raising=False)
    assert load_key() == load_key()                       # one per process by default
    secret = generate_secret()
    assert len(bytes.fromhex(secret)) == 32
    f = tmp_path / "key"
    f.write_text(secret + "\n")
    monkeypatch.setenv(ENV_SECRET_FILE, str(f))
    assert load_key().secret == secret.encode()
    monkeypatch.setenv(ENV_SECRET, "x" * 20)              # the variable wins over the file
    assert load_key().secret == b"x" * 20
    monkeypatch.setenv(ENV_SECRET, "")
    with pytest.raises(SecretError, match=ENV_SECRET):
        load_key()
    monkeypatch.setenv(ENV_SECRET, "short")
    with pytest.raises(SecretError, match="16 or more"):
        load_key()
    monkeypatch.delenv(ENV_SECRET)
    monkeypatch.setenv(ENV_SECRET_FILE, str(tmp_path / "missing"))
    with pytest.raises(SecretError, match=ENV_SECRET_FILE):
        load_key()


def test_derived_keys_differ_by_secret_and_role():
    assert MINE.server != THEIRS.server and MINE.client != THEIRS.client
    assert MINE.server[0] != MINE.client[0]
    assert MINE.allows("pdbridge", MINE.client[0]) and not MINE.allows("pdbridge", THEIRS.client[0])
