import pytest

from streamer.decision import Hysteresis


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
