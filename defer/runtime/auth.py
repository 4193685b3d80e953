"""Shared-token authentication for HELLO, sans-IO: nonces and HMAC-SHA256 proofs.

The token never crosses the wire. Both sides prove knowledge of it over both nonces, under
different labels, so a proof cannot be replayed on another connection nor reflected back at
its sender:

    client -> node   HELLO(role, challenge=Nc)
    node -> client   HELLO(challenge=Ns, response=HMAC(token, "node|role|Nc|Ns"))
    client -> node   HELLO(role, response=HMAC(token, "client|role|Nc|Ns"))
    node -> client   HELLO(bundle_sha256=...)                 (or ERROR, then close)

Without a token the node answers the first HELLO with the last one directly. A client with a
token refuses a node that does not prove it knows it (no downgrade); a client without one is
refused by a node that has one. This authenticates the peer when the connection opens; only
TLS protects the frames that follow against reading or tampering on the path.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

NONCE_BYTES = 32


def new_nonce() -> str:
    """A fresh random challenge: 64 lowercase hex digits."""
    return secrets.token_hex(NONCE_BYTES)


def proof(token: str, who: str, role: str, client_nonce: str, server_nonce: str) -> str:
    """HMAC-SHA256 proof that `who` ("node" or "client") holds `token`, bound to this HELLO."""
    text = f"defer-auth-v1|{who}|{role}|{client_nonce}|{server_nonce}".encode()
    return hmac.new(token.encode(), text, hashlib.sha256).hexdigest()


def check(token: str, who: str, role: str, client_nonce: str, server_nonce: str,
          response: str | None) -> bool:
    """True when `response` is the right proof (constant-time comparison)."""
    if response is None:
        return False
    return hmac.compare_digest(proof(token, who, role, client_nonce, server_nonce), response)
