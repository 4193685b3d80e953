"""The failover state machine and pending table, in memory (no I/O): every (state, event) pair
is either a legal transition with the documented next state and action, or a StateError that
leaves the state unchanged; the pending table keeps submission order and counts duplicates."""

from __future__ import annotations

import itertools
import time

import pytest

from defer.errors import StateError
from defer.runtime.failover import TRANSITIONS, Action, Event, Failover, PendingTable, State

EXPECTED = {
    (State.SETUP, Event.WIRED): (State.RUNNING, Action.NONE),
    (State.SETUP, Event.NODE_LOST): (State.SETUP, Action.IGNORE),
    (State.SETUP, Event.REQUEST): (State.SETUP, Action.HOLD),
    (State.SETUP, Event.CLOSE): (State.CLOSED, Action.SHUT),
    (State.RUNNING, Event.NODE_LOST): (State.RECOVERING, Action.RECOVER),
    (State.RUNNING, Event.REQUEST): (State.RUNNING, Action.SEND),
    (State.RUNNING, Event.CLOSE): (State.CLOSED, Action.SHUT),
    (State.RECOVERING, Event.NODE_LOST): (State.RECOVERING, Action.QUEUE_LOST),
    (State.RECOVERING, Event.REWIRED): (State.RUNNING, Action.REPLAY),
    (State.RECOVERING, Event.RECOVERY_FAILED): (State.FAILED, Action.FAIL_PENDING),
    (State.RECOVERING, Event.REQUEST): (State.RECOVERING, Action.HOLD),
    (State.RECOVERING, Event.CLOSE): (State.CLOSED, Action.SHUT),
    (State.FAILED, Event.NODE_LOST): (State.FAILED, Action.MARK_DEAD),
    (State.FAILED, Event.REQUEST): (State.RECOVERING, Action.RETRY_DEAD),
    (State.FAILED, Event.CLOSE): (State.CLOSED, Action.SHUT),
    (State.CLOSED, Event.NODE_LOST): (State.CLOSED, Action.IGNORE),
    (State.CLOSED, Event.CLOSE): (State.CLOSED, Action.IGNORE),
}


def test_every_state_event_pair_is_legal_as_documented_or_refused():
    started = time.perf_counter()
    assert TRANSITIONS == EXPECTED
    for state, event in itertools.product(State, Event):
        machine = Failover()
        machine.state = state
        if (state, event) in EXPECTED:
            next_state, action = EXPECTED[state, event]
            assert machine.handle(event) is action
            assert machine.state is next_state
        else:
            with pytest.raises(StateError, match=f"{event}.*{state}"):
                machine.handle(event)
            assert machine.state is state  # an illegal event changes nothing
    assert time.perf_counter() - started < 1.0


def test_a_loss_with_a_spare_and_one_without():
    machine = Failover()
    steps = [(Event.WIRED, State.RUNNING), (Event.NODE_LOST, State.RECOVERING),
             (Event.NODE_LOST, State.RECOVERING), (Event.REWIRED, State.RUNNING),
             (Event.NODE_LOST, State.RECOVERING), (Event.RECOVERY_FAILED, State.FAILED),
             (Event.REQUEST, State.RECOVERING), (Event.REWIRED, State.RUNNING),
             (Event.CLOSE, State.CLOSED), (Event.NODE_LOST, State.CLOSED)]
    for event, state in steps:
        machine.handle(event)
        assert machine.state is state


def test_states_read_as_their_names():
    assert State.RUNNING == "running" and str(State.FAILED) == "failed"


def test_pending_table_keeps_order_and_counts_late_results():
    table: PendingTable[str] = PendingTable()
    for rid in (3, 1, 2):
        table.add(rid, f"r{rid}")
    assert table.replay() == ["r3", "r1", "r2"] and len(table) == 3 and 1 in table
    assert table.resolve(1) == "r1"
    assert table.resolve(1) is None and table.dropped == 1  # a duplicate from a replay
    assert table.discard(7) is None and table.dropped == 1  # an error for nothing pending
    assert table.replay() == ["r3", "r2"]
    with pytest.raises(StateError):
        table.add(3, "again")
    assert table.take_all() == ["r3", "r2"] and len(table) == 0
