import pytest

from fluxgymd.states import FINISHED, TRANSITIONS, InvalidTransition, JobState, check_transition

S = JobState


def test_every_state_has_a_transition_entry():
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize("old,new", [
    (S.QUEUED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.STALLED), (S.STALLED, S.RECOVERING), (S.RECOVERING, S.STARTING),
    (S.RUNNING, S.INTERRUPTED), (S.INTERRUPTED, S.QUEUED), (S.FAILED, S.QUEUED),
    (S.CANCELLED, S.QUEUED), (S.QUEUED, S.CANCELLED),
])
def test_allowed(old, new):
    assert check_transition(old, new) == (old, new)


def test_a_succeeded_job_can_never_move_again():
    for new in JobState:
        with pytest.raises(InvalidTransition):
            check_transition(S.SUCCEEDED, new)


@pytest.mark.parametrize("old,new", [
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.SUCCEEDED), (S.FAILED, S.RUNNING),
    (S.CANCELLED, S.SUCCEEDED), (S.INTERRUPTED, S.RUNNING),
])
def test_refused_with_a_message_that_lists_the_allowed_moves(old, new):
    with pytest.raises(InvalidTransition) as e:
        check_transition(old.value, new.value)
    assert f"a {old.value} job cannot become {new.value}" in str(e.value)
    assert "allowed:" in str(e.value)


def test_finished_states_only_go_back_to_the_queue():
    for s in FINISHED:
        assert TRANSITIONS[s] <= {S.QUEUED}
