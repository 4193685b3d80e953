"""The defer wire protocol, sans-IO: `encode(msg) -> bytes` and an incremental `Decoder`.

`feed(bytes)`, `feed_eof()`, `next() -> Message | None`. No sockets, no threads, no pickle.
Messages are frozen dataclasses (a tagged union, `Message`). Every size is bounded by `Limits`;
a malformed, oversized or truncated frame raises ProtocolError and nothing else. A clean EOF
between frames is not an error. Every metadata field is type- and range-checked on decode
(roles, hashes, nonces, addresses, names, sizes). Tensor payloads travel as opaque bytes:
`defer.codecs` gives them meaning, this module only checks that their declared sizes are sane,
including the decoded size a shape implies (<= Limits.tensor), so no codec can be made to
allocate more than that. HANDSHAKE_LIMITS bound what an unauthenticated peer may send.
This package is the one place to change the wire format: `fields` (bounds, checkers),
`messages` (the typed messages), `probes` (profiling and link measurement), `frames` (header
layout, encoder, decoder).
"""

from defer.codecs import WireTensor
from defer.runtime.protocol.fields import (
    ALIGN,
    DEFAULT_LIMITS,
    HANDSHAKE_LIMITS,
    MAGIC,
    MAX_DIMS,
    MAX_NAME,
    MAX_TEXT,
    PROTOCOL_VERSION,
    ROLES,
    Limits,
)
from defer.runtime.protocol.frames import (
    HEADER_SIZE,
    Decoder,
    encode,
    encode_parts,
)
from defer.runtime.protocol.messages import (
    Ack,
    Configure,
    Error,
    Hello,
    Infer,
    Load,
    Message,
    MsgType,
    Ping,
    Pong,
    Result,
    Shutdown,
    Span,
    Stats,
)
from defer.runtime.protocol.probes import (
    MAX_TRANSFER,
    PROFILE_LEVELS,
    PROFILE_MODES,
    Echo,
    LinkResult,
    LinkTest,
    Probe,
    Profile,
    ProfileResult,
)
from defer.tensors import DTYPES

__all__ = ["ALIGN", "DEFAULT_LIMITS", "DTYPES", "HANDSHAKE_LIMITS", "HEADER_SIZE", "MAGIC",
           "MAX_DIMS", "MAX_NAME", "MAX_TEXT", "PROTOCOL_VERSION", "ROLES", "Ack", "Configure",
           "Decoder", "Error", "Hello", "Infer", "Limits", "Load", "Message", "MsgType", "Ping",
           "Pong", "Result", "Shutdown", "Span", "Stats", "WireTensor", "encode", "encode_parts"]
__all__ += ["MAX_TRANSFER", "PROFILE_LEVELS", "PROFILE_MODES", "Echo", "LinkResult",
            "LinkTest", "Probe", "Profile", "ProfileResult"]
