import pytest

from coverwatch.streamer.decide.hysteresis import Hysteresis


def run(scores_per_hop, **kw):
    params = dict(start_threshold=0.8, end_threshold=0.6, start_hops=2, end_hops=2)
    params.update(kw)
    h = Hysteresis(**params)
    out = []
    for t, scores in enumerate(scores_per_hop):
        out += [(d.kind, d.song_index, t) for d in h.update(scores, float(t))]
    return out, h


def test_start_needs_consecutive_hops_above_threshold():
    events, _ = run([{1: 0.9}, {1: 0.5}, {1: 0.9}, {1: 0.85}])
    assert events == [("match_start", 1, 3)]


def test_below_start_threshold_never_starts():
    events, _ = run([{1: 0.79}] * 10)
    assert events == []


def test_end_after_end_hops_below_end_threshold_not_between_thresholds():
    hops = [{1: 0.9}, {1: 0.9}, {1: 0.7}, {1: 0.7}, {1: 0.7}, {1: 0.5}, {}, {}]
    events, h = run(hops)
    assert events == [("match_start", 1, 1), ("match_end", 1, 6)]
    assert h.current is None


def test_single_dip_does_not_end_match():
    events, _ = run([{1: 0.9}, {1: 0.9}, {1: 0.5}, {1: 0.9}, {1: 0.5}, {1: 0.9}])
    assert events == [("match_start", 1, 1)]


def test_switch_to_another_song_ends_then_starts():
    hops = [{1: 0.9}, {1: 0.9}, {1: 0.7, 2: 0.85}, {1: 0.7, 2: 0.9}]
    events, h = run(hops)
    assert events == [("match_start", 1, 1), ("match_end", 1, 3), ("match_start", 2, 3)]
    assert h.current == 2


def test_challenger_below_current_score_does_not_switch():
    events, _ = run([{1: 0.95}, {1: 0.95}, {1: 0.95, 2: 0.9}, {1: 0.95, 2: 0.9}, {1: 0.95, 2: 0.9}])
    assert events == [("match_start", 1, 1)]


def test_reset_closes_open_match():
    _, h = run([{1: 0.9}, {1: 0.9}])
    decisions = h.reset(10.0)
    assert [(d.kind, d.song_index, d.started_s) for d in decisions] == [("match_end", 1, 1.0)]
    assert h.reset(11.0) == []


def test_song_restart_after_end_starts_again():
    hops = [{1: 0.9}, {1: 0.9}, {}, {}, {1: 0.9}, {1: 0.9}]
    events, _ = run(hops)
    assert events == [("match_start", 1, 1), ("match_end", 1, 3), ("match_start", 1, 5)]


def test_inverted_thresholds_rejected():
    with pytest.raises(ValueError):
        Hysteresis(start_threshold=0.5, end_threshold=0.6, start_hops=1, end_hops=1)


# --- edge cases: song switches, restarts, gaps ------------------------------------------


def test_alternating_challengers_never_build_a_streak():
    """Two songs taking turns above the start threshold: neither leads start_hops hops in a row."""
    hops = [{1: 0.9}, {1: 0.9}, {1: 0.5, 2: 0.85}, {1: 0.5, 3: 0.85}, {2: 0.85}, {3: 0.85}, {2: 0.85}]
    events, h = run(hops)
    assert events == [("match_start", 1, 1), ("match_end", 1, 3)]
    assert h.current is None


def test_switch_when_current_song_vanishes_from_results():
    """The current song leaves the top-k (score absent) while another takes over: end, then start, same hop."""
    events, h = run([{1: 0.9}, {1: 0.9}, {2: 0.9}, {2: 0.9}])
    assert events == [("match_start", 1, 1), ("match_end", 1, 3), ("match_start", 2, 3)]
    assert h.current_started_s == 3.0


def test_switch_needs_challenger_above_current_every_hop():
    """A challenger that drops below the current song for one hop restarts its streak."""
    hops = [{1: 0.9}, {1: 0.9}, {1: 0.8, 2: 0.85}, {1: 0.88, 2: 0.85}, {1: 0.8, 2: 0.85}, {1: 0.8, 2: 0.86}]
    events, _ = run(hops)
    assert events == [("match_start", 1, 1), ("match_end", 1, 5), ("match_start", 2, 5)]


def test_restart_within_end_hops_continues_the_match():
    """Gaps shorter than end_hops (a break in the song, talk-over) keep one match with its start time."""
    events, h = run([{1: 0.9}, {1: 0.9}, {}, {1: 0.9}, {}, {1: 0.9}, {1: 0.9}])
    assert events == [("match_start", 1, 1)]
    assert h.current == 1 and h.current_started_s == 1.0


def test_back_to_back_plays_of_one_song_are_one_match():
    """A song played twice without its score falling is indistinguishable from one long play."""
    events, _ = run([{1: 0.9}] * 12)
    assert events == [("match_start", 1, 1)]


def test_gap_resets_streak_so_a_start_cannot_span_it():
    h = Hysteresis(start_threshold=0.8, end_threshold=0.6, start_hops=2, end_hops=2)
    assert h.update({1: 0.9}, 0.0) == []
    assert h.reset(1.0) == []  # nothing open: no event
    assert h.update({1: 0.9}, 2.0) == []  # the hop before the gap does not count
    assert [(d.kind, d.song_index, d.time_s) for d in h.update({1: 0.9}, 3.0)] == [("match_start", 1, 3.0)]


def test_gap_closes_the_match_at_the_gap_and_the_song_starts_anew_after():
    h = Hysteresis(start_threshold=0.8, end_threshold=0.6, start_hops=2, end_hops=2)
    for t in range(3):
        h.update({1: 0.9}, float(t))
    closing = h.reset(5.0)
    assert [(d.kind, d.time_s, d.started_s, d.score) for d in closing] == [("match_end", 5.0, 1.0, 0.9)]
    later = [d for t in (6.0, 7.0) for d in h.update({1: 0.9}, t)]
    assert [(d.kind, d.started_s) for d in later] == [("match_start", 7.0)]


def test_remap_drops_a_match_whose_song_left_the_index():
    _, h = run([{1: 0.9}, {1: 0.9}, {1: 0.9, 2: 0.7}])
    h.remap({1: None, 2: 0})
    assert h.current is None and set(h.history) == {0}
    assert h.update({0: 0.9}, 10.0) == []  # a remapped song needs a fresh streak
