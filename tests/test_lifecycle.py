"""A publisher's states and the moves between them (pubmon.core.lifecycle)."""

import pytest

from pubmon.core.lifecycle import ALLOWED, PublisherState, check_transition
from pubmon.errors import InvalidTransition

S = PublisherState


def test_every_state_has_a_row_and_fatal_leaves_only_by_operator_moves() -> None:
    assert set(ALLOWED) == set(S)
    assert ALLOWED[S.FATAL] == {S.STARTING, S.STOPPED}
    assert S.RUNNING not in ALLOWED[S.STOPPED]  # a start always goes through STARTING


def test_forbidden_move_names_publisher_and_states() -> None:
    check_transition("feed", S.STARTING, S.RUNNING)
    with pytest.raises(InvalidTransition, match=r"'feed': STOPPED -> RUNNING"):
        check_transition("feed", S.STOPPED, S.RUNNING)
