"""The robust spike detector: its documented behaviour, and agreement with a brute-force reference."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanguard.guard import SpikeDetector, lower_median


def filled(values, **kw) -> SpikeDetector:
    detector = SpikeDetector(**kw)
    for value in values:
        assert not detector.update(value)
    return detector


def test_lower_median_of_even_window_is_the_lower_middle_value():
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([5.0]) == 5.0


def test_no_robust_bound_before_min_history():
    detector = SpikeDetector(window=50, min_history=20)
    for _ in range(19):
        assert not detector.update(1.0)
    assert not detector.update(9.0)  # the 20th value: still learning (under 10x the largest so far)
    assert len(detector.history) == 20


def test_an_order_of_magnitude_jump_is_caught_from_the_third_value():
    """An LR blow-up in the first steps of a run: the loss jumps by orders of magnitude before the
    robust bounds have the history they need."""
    detector = SpikeDetector(window=50, min_history=20, early_history=3, early_ratio=10.0)
    assert not detector.update(2.0) and not detector.update(1e3)  # fewer than 3 values: learned as is
    detector = SpikeDetector(window=50, min_history=20, early_history=3, early_ratio=10.0)
    for value in (2.0, 1.5, 1.8):
        assert not detector.update(value)
    assert not detector.update(19.0)  # under 10x the largest so far (2.0)
    assert detector.update(717241.0) and detector.history == [2.0, 1.5, 1.8, 19.0]
    off = SpikeDetector(window=50, min_history=20, early_history=0)
    for value in (2.0, 1.5, 1.8):
        off.update(value)
    assert not off.update(717241.0)  # early_history=0: the rule is off


def test_a_clear_spike_is_flagged_and_not_learned():
    detector = filled([1.0 + 0.01 * (i % 5) for i in range(30)])
    before = detector.history
    assert detector.update(50.0)
    assert detector.history == before  # a suspect never drags the baseline up
    assert not detector.update(1.02)


def test_flat_window_does_not_flag_tiny_noise():
    detector = filled([2.0] * 30)  # MAD is 0: the floor rel_eps * median keeps it sane
    assert not detector.update(2.0 * (1 + 1e-6))
    assert not detector.update(3.9)  # above the MAD bound but under min_ratio * median
    assert detector.update(4.1)


def test_min_ratio_guards_noisy_windows():
    values = [1.0 + (i % 2) * 0.1 for i in range(30)]  # median 1.0, MAD 0 -> floor 1e-3
    detector = filled(values, threshold=10.0, min_ratio=2.0)
    # the MAD bound alone (1 + 10 * 1.4826 * 1e-3) would flag 1.9; min_ratio * median does not
    assert not detector.is_spike(1.9)
    assert detector.is_spike(2.5)
    assert detector.bound() == pytest.approx(2.0)


def test_downward_moves_and_non_finite_values_are_never_spikes():
    detector = filled([10.0] * 25)
    assert not detector.update(0.0)
    for value in (math.nan, math.inf, -math.inf):
        assert not detector.update(value)
    assert len(detector.history) == 26  # the 0.0 was accepted, the non-finite ones were not


def test_window_keeps_only_the_last_values():
    detector = filled(range(1, 101), window=10, min_history=5, min_ratio=100.0)
    assert detector.history == [float(v) for v in range(91, 101)]


def test_state_dict_round_trip_through_json():
    detector = filled([1.0, 1.1, 0.9] * 10, window=20, min_history=5, threshold=8.0)
    restored = SpikeDetector()
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.state_dict() == detector.state_dict()
    for value in (1.0, 30.0, 1.2, 0.5, 100.0):
        assert restored.update(value) == detector.update(value)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        SpikeDetector(window=10, min_history=20)
    with pytest.raises(ValueError):
        SpikeDetector(threshold=0.0)


def reference(values, window=50, min_history=20, threshold=10.0, min_ratio=2.0, rel_eps=1e-3,
              early_history=3, early_ratio=10.0):
    """Brute force, straight from the docstring: recompute everything from the full accepted list."""
    accepted: list[float] = []
    flags = []
    for x in values:
        if not math.isfinite(x):
            flags.append(False)
            continue
        recent = accepted[-window:]
        flag = False
        if len(recent) >= min_history:
            ordered = sorted(recent)
            median = ordered[(len(ordered) - 1) // 2]
            deviations = sorted(abs(v - median) for v in recent)
            mad = deviations[(len(deviations) - 1) // 2]
            scale = max(mad, rel_eps * abs(median))
            flag = x > median + threshold * 1.4826 * scale and x > min_ratio * median
        elif early_history and len(recent) >= early_history:
            flag = x > early_ratio * max(recent)
        if not flag:
            accepted.append(x)
        flags.append(flag)
    return flags


values = st.one_of(
    st.floats(min_value=0.0, max_value=10.0),
    st.floats(min_value=0.0, max_value=1e6),
    st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 1.0]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, max_size=200), st.integers(1, 30), st.integers(1, 30),
       st.floats(0.5, 20.0), st.floats(0.0, 4.0), st.integers(0, 6), st.floats(1.0, 100.0))
def test_matches_brute_force_reference(series, window, min_history, threshold, min_ratio, early_history,
                                       early_ratio):
    min_history = min(min_history, window)
    detector = SpikeDetector(window=window, min_history=min_history, threshold=threshold,
                             min_ratio=min_ratio, early_history=early_history, early_ratio=early_ratio)
    got = [detector.update(x) for x in series]
    assert got == reference(series, window, min_history, threshold, min_ratio, early_history=early_history,
                            early_ratio=early_ratio)
