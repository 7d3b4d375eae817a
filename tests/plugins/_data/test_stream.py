"""``RecordStream``: every record once per pass, a fresh seeded order each pass, a position
that survives a resume."""

from __future__ import annotations

from rlfuse.plugins._data.stream import RecordStream


def test_each_pass_is_a_permutation_and_passes_differ():
    s = RecordStream(list(range(10)), seed=5)
    first, second = s.take(10), s.take(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and s.epoch == 1
    assert RecordStream(list(range(10)), seed=5).take(20) == first + second  # seeded
    assert RecordStream(list(range(10)), seed=6).take(10) != first


def test_unshuffled_stream_wraps_in_order():
    s = RecordStream(["a", "b", "c"], seed=0, shuffle=False)
    assert s.take(5) == ["a", "b", "c", "a", "b"]


def test_state_dict_resumes_mid_pass():
    a = RecordStream(list(range(7)), seed=1)
    a.take(9)  # one pass and two records of the next
    state = a.state_dict()
    assert state == {"epoch": 1, "pos": 2}
    b = RecordStream(list(range(7)), seed=1)
    b.load_state_dict(state)
    assert b.take(6) == a.take(6)
