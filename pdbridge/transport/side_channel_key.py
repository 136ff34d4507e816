"""The shared secret that guards the side channel (issue 12: anyone on the host could fetch an
engine's NIXL metadata and then read and overwrite its cache, or forge notifications).

Every metadata server is a ZeroMQ CURVE server and every client a CURVE client, with key pairs
derived from one shared secret: a peer that does not hold the secret cannot complete the CURVE
handshake, so it receives nothing (no metadata, no region addresses, no Ack) and what it sends is
never read; what holders exchange is encrypted. The server also checks, through ZAP, that the
client's public key is the one the secret derives.

Where the secret comes from, first match wins:
  PDBRIDGE_SECRET       the secret itself (any text; 32 random bytes in hex is the norm)
  PDBRIDGE_SECRET_FILE  a file holding it (the first line), e.g. one `pdbridge` generated
  otherwise             a random secret made once per process: every engine of one process
                        (tests, `pdbridge demo`) shares it, and nothing outside can know it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from functools import cached_property

import zmq
from zmq.utils import z85

ENV_SECRET = "PDBRIDGE_SECRET"
ENV_SECRET_FILE = "PDBRIDGE_SECRET_FILE"
ZAP_DOMAIN = "pdbridge"


class SecretError(ValueError):
    """No usable secret (an empty variable, an unreadable file); the message names which."""


@dataclass(frozen=True)
class SideChannelKey:
    secret: bytes

    def __post_init__(self):
        if len(self.secret) < 16:
            raise SecretError(f"the side-channel secret has {len(self.secret)} bytes; "
                            f"allowed: 16 or more")

    def _pair(self, role: bytes) -> tuple[bytes, bytes]:
        raw = hmac.new(self.secret, b"pdbridge curve " + role, hashlib.sha256).digest()
        secret_z85 = z85.encode(raw)
        return zmq.curve_public(secret_z85), secret_z85

    @cached_property
    def server(self) -> tuple[bytes, bytes]:     # (public, secret), z85
        return self._pair(b"server")

    @cached_property
    def client(self) -> tuple[bytes, bytes]:
        return self._pair(b"client")

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` (before bind) a CURVE server that only this secret's clients reach."""
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.server
        sock.zap_domain = ZAP_DOMAIN.encode()

    def connect_as_client(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of this secret's servers."""
        sock.curve_serverkey = self.server[0]
        sock.curve_publickey, sock.curve_secretkey = self.client

    def allows(self, domain: str, client_public_z85: bytes) -> bool:
        """ZAP: the only client key accepted is the one the secret derives."""
        return domain == ZAP_DOMAIN and hmac.compare_digest(client_public_z85, self.client[0])

    # ZAP credentials-provider protocol of pyzmq's Authenticator
    def callback(self, domain: str, key: bytes) -> bool:
        return self.allows(domain, key)


_PROCESS_SECRET = secrets.token_bytes(32)


def load_key() -> SideChannelKey:
    if ENV_SECRET in os.environ:
        text = os.environ[ENV_SECRET].strip()
        if not text:
            raise SecretError(f"{ENV_SECRET} is set but empty; allowed: a secret of 16+ bytes")
        return SideChannelKey(text.encode())
    if ENV_SECRET_FILE in os.environ:
        path = os.environ[ENV_SECRET_FILE]
        try:
            with open(path) as f:
                text = f.readline().strip()
        except OSError as e:
            raise SecretError(f"{ENV_SECRET_FILE}={path}: {e.strerror}") from None
        return SideChannelKey(text.encode())
    return SideChannelKey(_PROCESS_SECRET)


def generate_secret() -> str:
    """A new secret for PDBRIDGE_SECRET or a key file: 32 random bytes, hex."""
    return secrets.token_hex(32)
