"""Failover: the dispatcher's states and events as one transition table, and the pending table.

Both are pure (no I/O, no clock): the dispatcher's supervisor feeds events in and performs the
action each transition names; the tests walk every (state, event) pair in memory.

    SETUP --wired--> RUNNING --node_lost--> RECOVERING --rewired--> RUNNING
                        ^                        | recovery_failed
                        |                        v
                        +--- (rewired) <-- request: FAILED (every pending request failed)
                             via RECOVERING, retrying the dead node's own address

A node is *lost* when its control connection ends or breaks, when it stays silent for 3 of its
heartbeat intervals (a hung node: noticed within ~1.75 s at the default 0.5 s), or when the node
before it reports (ERROR with request id 0 naming it) that it lost the data connection to it.
RECOVERING, per lost stage, the last stage first: take the next spare (or, after FAILED, the dead
node's own address first), push the stage's bundle (LOAD), CONFIGURE it with the lost node's next
hop, then CONFIGURE its predecessor to send to it (stage 0: inputs go to it). A CONFIGURE makes a
node drop work queued under the old wiring. Then every pending request is sent again to stage 0,
in submission order; requests submitted meanwhile wait in the table and go with the replay.

The guarantee. Every request has a unique id. The pending table holds a request from submission
until its first RESULT, or a per-request ERROR from a node (such as a bad input, which is not
replayed), arrives: then the entry is removed and the caller gets that one outcome. Replayed are
exactly the requests still in the table when the chain is rewired. A RESULT whose id is not in
the table -- the second copy of a replayed request, or a result still travelling through the
surviving nodes of the old chain -- is dropped and counted (`dropped`); both copies come from the
same input through the same bundles, so the first is as good as the second. The table is bounded
by the dispatcher's window, and so is the memory replay needs. With raw hop-0 encoding the table
holds a view of the caller's input array: do not modify an input until its result is returned.

FAILED: every pending request fails at once with a NodeError naming the dead node; the other
connections stay open. The next request makes the dispatcher retry the dead node's own address
(then any spare left): if it is back, the chain is rewired and the stream goes on; if not, the
request fails at once, naming the node. CLOSED is final: events after close are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum, StrEnum
from typing import Generic, TypeVar

from defer.errors import StateError


class State(StrEnum):
    """A sentinel per state; as a str it is its name in lowercase ("running")."""

    SETUP = "setup"
    RUNNING = "running"
    RECOVERING = "recovering"
    FAILED = "failed"
    CLOSED = "closed"


class Event(StrEnum):
    WIRED = "wired"  # setup finished: every node loaded and configured
    NODE_LOST = "node_lost"  # a chain node's connection ended, went silent or was reported
    REWIRED = "rewired"  # every lost stage has a new node: replay the pending requests
    RECOVERY_FAILED = "recovery_failed"  # a lost stage found no node: fail every pending request
    REQUEST = "request"  # the caller submitted a request
    CLOSE = "close"  # the caller closed the dispatcher


class Action(Enum):
    """What the supervisor does on a transition (beyond changing state)."""

    NONE = "none"
    SEND = "send"  # send the request to stage 0 now
    HOLD = "hold"  # keep it in the pending table: it goes with the next replay
    RECOVER = "recover"  # start replacing the lost stage(s)
    QUEUE_LOST = "queue_lost"  # add the lost stage to the running recovery's list
    MARK_DEAD = "mark_dead"  # remember the stage as dead; FAILED stays FAILED
    REPLAY = "replay"  # send every pending request again, in submission order
    FAIL_PENDING = "fail_pending"  # fail every pending request with the dead node's error
    RETRY_DEAD = "retry_dead"  # start a recovery that tries the dead nodes' own addresses
    IGNORE = "ignore"  # not news (e.g. connections ending after close)
    SHUT = "shut"  # fail what is pending as "closed", stop


S, E, A = State, Event, Action
# (state, event) -> (next state, action). Every pair not listed is illegal (StateError).
TRANSITIONS: dict[tuple[State, Event], tuple[State, Action]] = {
    (S.SETUP, E.WIRED): (S.RUNNING, A.NONE),
    (S.SETUP, E.NODE_LOST): (S.SETUP, A.IGNORE),  # setup itself raises, naming the node
    (S.SETUP, E.REQUEST): (S.SETUP, A.HOLD),
    (S.SETUP, E.CLOSE): (S.CLOSED, A.SHUT),
    (S.RUNNING, E.NODE_LOST): (S.RECOVERING, A.RECOVER),
    (S.RUNNING, E.REQUEST): (S.RUNNING, A.SEND),
    (S.RUNNING, E.CLOSE): (S.CLOSED, A.SHUT),
    (S.RECOVERING, E.NODE_LOST): (S.RECOVERING, A.QUEUE_LOST),
    (S.RECOVERING, E.REWIRED): (S.RUNNING, A.REPLAY),
    (S.RECOVERING, E.RECOVERY_FAILED): (S.FAILED, A.FAIL_PENDING),
    (S.RECOVERING, E.REQUEST): (S.RECOVERING, A.HOLD),
    (S.RECOVERING, E.CLOSE): (S.CLOSED, A.SHUT),
    (S.FAILED, E.NODE_LOST): (S.FAILED, A.MARK_DEAD),
    (S.FAILED, E.REQUEST): (S.RECOVERING, A.RETRY_DEAD),
    (S.FAILED, E.CLOSE): (S.CLOSED, A.SHUT),
    (S.CLOSED, E.NODE_LOST): (S.CLOSED, A.IGNORE),
    (S.CLOSED, E.CLOSE): (S.CLOSED, A.IGNORE),
}
del S, E, A


class Failover:
    """The current state; `handle(event)` moves along the table and says what to do."""

    def __init__(self) -> None:
        self.state = State.SETUP

    def handle(self, event: Event) -> Action:
        try:
            self.state, action = TRANSITIONS[self.state, event]
        except KeyError:
            raise StateError(f"event {event} is not allowed in state {self.state}") from None
        return action


T = TypeVar("T")


class PendingTable(Generic[T]):
    """Requests from submission to their one outcome, in submission order (see the guarantee).

    `resolve(id)` takes a request out when its first outcome arrives; None (and `dropped` + 1)
    for a late or duplicate one. `replay()` lists what is still pending, oldest first.
    """

    def __init__(self) -> None:
        self._table: dict[int, T] = {}
        self.dropped = 0

    def add(self, request_id: int, request: T) -> None:
        if request_id in self._table:
            raise StateError(f"request id {request_id} is already pending")
        self._table[request_id] = request

    def resolve(self, request_id: int) -> T | None:
        request = self._table.pop(request_id, None)
        if request is None:
            self.dropped += 1
        return request

    def discard(self, request_id: int) -> T | None:
        """Take a request out without counting it as dropped (e.g. a per-request ERROR)."""
        return self._table.pop(request_id, None)

    def replay(self) -> list[T]:
        return list(self._table.values())

    def take_all(self) -> list[T]:
        """Empty the table (to fail everything pending); oldest first."""
        requests, self._table = list(self._table.values()), {}
        return requests

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[T]:
        return iter(self._table.values())

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._table
