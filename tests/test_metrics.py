import numpy as np
import pytest

from coverwatch.evaluation.scoring import Play, score_stream
from coverwatch.model.retrieval_metrics import average_precision, evaluate_similarity, rank_of_first_relevant


def test_average_precision_hand_computed():
    # relevant at ranks 1, 3, 4 -> (1/1 + 2/3 + 3/4) / 3
    assert average_precision(np.array([1, 0, 1, 1, 0], bool)) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision(np.array([0, 0, 1], bool)) == pytest.approx(1 / 3)
    assert average_precision(np.zeros(4, bool)) == 0.0


def test_rank_of_first_relevant():
    assert rank_of_first_relevant(np.array([0, 0, 1, 1], bool)) == 3
    assert rank_of_first_relevant(np.array([0, 0], bool)) == 3


def test_evaluate_similarity_on_hand_made_matrix():
    groups = np.array(["a", "a", "b", "b"])
    sim = np.array(
        [
            [1.0, 0.9, 0.1, 0.2],  # query 0: relevant (1) first -> AP 1
            [0.9, 1.0, 0.95, 0.1],  # query 1: 2 ranks first (wrong), then 0 -> AP 1/2
            [0.1, 0.2, 1.0, 0.8],  # query 2: 3 first -> AP 1
            [0.7, 0.1, 0.6, 1.0],  # query 3: 0 first, then 2 -> AP 1/2
        ]
    )
    scores = evaluate_similarity(sim, groups, groups, exclude_self=True)
    assert scores.map == pytest.approx(0.75)
    assert scores.top1 == pytest.approx(0.5)
    assert scores.mr1 == pytest.approx(1.5)
    assert scores.hr10 == 1.0


def test_stream_scoring_caught_missed_false():
    plays = [Play("x", 10, 50), Play("y", 60, 100), Play("z", 120, 150)]
    events = [
        {"event": "match_start", "song_id": "x", "stream_time_s": 22.5},
        {"event": "match_end", "song_id": "x", "stream_time_s": 55.0},
        {"event": "match_start", "song_id": "x", "stream_time_s": 45.0},  # re-detection inside play: not false
        {"event": "match_start", "song_id": "q", "stream_time_s": 70.0},  # wrong song: false
        {"event": "match_start", "song_id": "y", "stream_time_s": 108.0},  # within the 10-s grace
    ]
    result = score_stream(events, plays, grace_s=10.0)
    assert [p.song_id for p, _ in result.caught] == ["x", "y"]
    assert [lat for _, lat in result.caught] == [12.5, 48.0]
    assert [p.song_id for p in result.missed] == ["z"]
    assert [e["song_id"] for e in result.false_matches] == ["q"]
    assert result.recall == pytest.approx(2 / 3)
