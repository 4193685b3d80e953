"""The one error hierarchy of defer. The CLI edge turns these into a message and an exit code.

Exit codes: 2 = the user's input is wrong (file, option, shape, hash); 1 = a runtime failure
(a node died, a timeout); 3 = a startup failure (port in use, bundle will not load).
"""

from __future__ import annotations


class DeferError(Exception):
    """Base of every error defer raises on purpose. `str(err)` names the problem and the fix."""

    exit_code = 1


class UsageError(DeferError):
    """Bad input from the user: missing file, unknown format, impossible option."""

    exit_code = 2


class MissingDependencyError(UsageError):
    """An optional extra is needed, e.g. TensorFlow for Keras input."""


class ManifestError(UsageError):
    """A manifest or bundle that is malformed, or does not match what a node serves."""


class InputError(UsageError):
    """An inference input with the wrong names, shape or dtype."""


class PlanError(UsageError):
    """No partition satisfies the constraints (n too large, memory cap too small, bad cut)."""


class VerifyError(DeferError):
    """The chain's outputs differ from the whole model's beyond tolerance."""


class ProtocolError(DeferError):
    """A malformed, oversized or unexpected frame. The only error the protocol decoder raises."""


class CodecError(DeferError):
    """A tensor payload that cannot be encoded or decoded."""


class NodeError(DeferError):
    """A node refused, failed or vanished. The message names the node (host:port)."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class AuthError(NodeError):
    """Authentication failed (wrong or missing token): a configuration mistake, exit code 2."""

    exit_code = 2


class DeferTimeoutError(NodeError):
    """A node did not answer in time."""


class StartupError(DeferError):
    """A server could not start (port in use, bundle will not load)."""

    exit_code = 3


class StateError(DeferError):
    """An event that the failover state machine does not allow in its current state (a bug)."""
