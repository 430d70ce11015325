"""The alignment check (streamer/decide/alignment.py) on hand-made sequences, and through the index."""

from __future__ import annotations

import numpy as np
import pytest

from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.decide.alignment import (
    LOG_FLOOR,
    POOL_FRAMES,
    STEP_RATE,
    alignment_match,
    alignment_matches,
    alignment_score,
    chroma,
    cross_recurrence,
    delay_embed,
    embedded_similarity,
    fuse_scores,
    key_shift,
    qmax,
    qmax_path,
    qmax_paths,
)
from coverwatch.streamer.frontend.audio import N_BINS

DELAY, NEIGHBOURS = 3, 0.1


def melody_chroma(seed: int, n_notes: int = 40, steps_per_note: tuple[int, int] = (2, 6)) -> np.ndarray:
    """(S, 12) chroma of a random melody: one strong pitch class per note, a weak fifth, a little noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for pitch in rng.integers(0, 12, n_notes):
        row = np.full(12, 0.05)
        row[pitch] = 1.0
        row[(pitch + 7) % 12] += 0.3
        rows.extend([row] * int(rng.integers(*steps_per_note)))
    return (np.array(rows) + 0.02 * rng.random((len(rows), 12))).astype(np.float32)


def stretch(steps: np.ndarray, ratio: float) -> np.ndarray:
    """Play `steps` `ratio` times slower (nearest step)."""
    return steps[np.minimum((np.arange(int(len(steps) * ratio)) / ratio).astype(int), len(steps) - 1)]


def test_chroma_folds_octaves_onto_pitch_classes_and_pools_frames():
    frames = np.full((POOL_FRAMES * 3 + 2, N_BINS), np.log(LOG_FLOOR), np.float32)  # silence: magnitude 0
    frames[:, 12 * 2 + 7] = np.log(1.0 + LOG_FLOOR)  # G2
    frames[:, 12 * 5 + 7] = np.log(0.5 + LOG_FLOOR)  # G5: the same pitch class
    frames[:, 12 * 3 + 0] = np.log(0.25 + LOG_FLOOR)  # C3
    c = chroma(frames)
    assert c.shape == (3, 12)  # the 2 leftover frames do not make a step
    np.testing.assert_allclose(c[:, 7], 1.5, rtol=1e-4)
    np.testing.assert_allclose(c[:, 0], 0.25, rtol=1e-4)
    assert np.abs(np.delete(c, [0, 7], axis=1)).max() < 1e-6
    with pytest.raises(ValueError, match="whole octaves"):
        chroma(np.zeros((20, 30), np.float32))


def test_key_shift_undoes_a_transposition():
    reference = melody_chroma(1)
    assert key_shift(np.roll(reference, -5, axis=1), reference) == 5


def test_qmax_counts_the_longest_path_and_follows_tempo_changes():
    assert qmax(np.eye(12, dtype=bool)) == 12
    assert qmax(np.zeros((12, 20), dtype=bool)) == 0
    slow = np.zeros((20, 10), dtype=bool)  # the query twice as slow: 2 query steps per reference step
    slow[np.arange(0, 20, 2), np.arange(10)] = True
    assert qmax(slow) == 10
    broken = np.eye(12, dtype=bool)
    broken[6, 6] = False  # a one-step break costs GAP_ONSET: the halves do not join
    assert qmax(broken) == 6


def test_a_transposed_slower_excerpt_aligns_and_other_melodies_do_not():
    reference = melody_chroma(1)
    excerpt = stretch(np.roll(reference[30:110], 4, axis=1), 1.2)  # 4 semitones up, 20 % slower
    cover = alignment_score(excerpt, reference, DELAY, NEIGHBOURS)
    others = [alignment_score(excerpt, melody_chroma(seed), DELAY, NEIGHBOURS) for seed in range(2, 12)]
    assert cover > 0.6
    assert max(others) < 0.25, others
    assert alignment_score(excerpt[:5], reference, DELAY, NEIGHBOURS) == 0.0  # too short to say
    assert alignment_score(np.zeros_like(excerpt), reference, DELAY, NEIGHBOURS) == 0.0  # silence


def test_cross_recurrence_is_mutual():
    q, r = delay_embed(melody_chroma(1), DELAY), delay_embed(melody_chroma(2), DELAY)
    both = cross_recurrence(q, r, NEIGHBOURS)
    assert both.shape == (len(q), len(r))
    assert both.sum() <= int(NEIGHBOURS * len(r)) * len(q)  # never more than each row's neighbours (ties aside)
    np.testing.assert_array_equal(both, cross_recurrence(r, q, NEIGHBOURS).T)


def test_embedded_similarity_is_the_cosine_of_delay_embedded_rows():
    q, r = melody_chroma(1), melody_chroma(2, n_notes=60)
    for delay in (1, DELAY, 13):
        expected = delay_embed(q, delay) @ delay_embed(r, delay).T
        np.testing.assert_allclose(embedded_similarity(q, r, delay), expected, rtol=1e-4, atol=1e-5)


def test_candidates_aligned_together_score_as_each_alone():
    reference = melody_chroma(1)
    excerpt = stretch(np.roll(reference[30:110], 4, axis=1), 1.2)
    # the excerpt runs from the end of reference[:70] on into reference[70:], side by side in the table
    candidates = [reference[:70], reference[70:], melody_chroma(3), reference[:5], np.zeros_like(reference), reference]
    for keys in (1, 3):
        together = alignment_matches(excerpt, candidates, DELAY, NEIGHBOURS, keys)
        assert together == [alignment_match(excerpt, c, DELAY, NEIGHBOURS, keys) for c in candidates]
    assert together[5][0] > max(together[0][0], together[1][0]) and together[3] == (0.0, None) and together[4] == (0.0, None)


def test_qmax_paths_keep_candidates_apart():
    # one table holds all candidates: a path ending at one's last column must not run on into the next
    ends_at_edge = np.zeros((20, 10), dtype=bool)
    ends_at_edge[np.arange(10), np.arange(10)] = True  # rows 0-9 reach the last column
    starts_at_edge = np.zeros((20, 10), dtype=bool)
    starts_at_edge[np.arange(11, 17), np.arange(6)] = True  # rows 11-16 from the first column on
    alone = [qmax_path(ends_at_edge), qmax_path(starts_at_edge)]
    assert [a[0] for a in alone] == [10, 6]
    assert qmax_paths([ends_at_edge, starts_at_edge]) == alone


def test_fuse_scores_raises_only_the_best_candidates():
    reference = melody_chroma(1)
    songs = {0: reference, 1: melody_chroma(2), 2: melody_chroma(3)}
    window = np.log(np.repeat(np.tile(reference[:100], (1, N_BINS // 12)), POOL_FRAMES, axis=0) + LOG_FLOOR)  # (T, F) log-CQT
    query = chroma(window)
    np.testing.assert_allclose(query, reference[:100] * (N_BINS // 12), rtol=1e-3)  # the round trip through the CQT's log
    scores = {0: 0.5, 1: 0.45, 2: 0.2}
    cfg = StreamConfig(align_weight=1.0, align_candidates=2, align_delay=DELAY, align_neighbours=NEIGHBOURS)
    fused = fuse_scores(scores, query, songs.__getitem__, cfg)
    assert fused[0] - scores[0] > 0.9  # the window is this song's opening
    assert 0.0 <= fused[1] - scores[1] < 0.35
    assert fused[2] == scores[2]  # not among the 2 best: not aligned
    assert scores == {0: 0.5, 1: 0.45, 2: 0.2}  # the input is left alone


def test_log_floor_matches_the_front_end():
    """chroma() undoes the front end's log(magnitude + floor); the two floors must agree."""
    frontend = pytest.importorskip("coverwatch.model.frontend")  # needs torch (the train extra)
    assert frontend.LOG_FLOOR == LOG_FLOOR


def test_alignment_says_where_in_the_reference_a_window_ends():
    """A window cut from the middle of a transposed, slower cover lines up with the
    reference where its last step was taken from; positions never leave the reference."""
    reference = melody_chroma(4, n_notes=120)
    cover = np.roll(stretch(reference, 1.25), 3, axis=1)  # slower and in another key
    found = []
    for end in range(120, len(cover) - 40, 40):  # (the last window ends in the stretched final note)
        window = cover[end - 100 : end]
        score, position = alignment_match(window, reference, DELAY, NEIGHBOURS, keys=2)
        truth = (end / 1.25) / STEP_RATE  # the reference step the window's last step was stretched from
        assert score > 0.5 and position is not None and abs(position - truth) < 1.0, (end, score, position, truth)
        found.append(position)
    assert found == sorted(found)  # moves forward with the stream
    unrelated = alignment_match(melody_chroma(5)[:100], reference, DELAY, NEIGHBOURS)
    assert unrelated[1] is None or 0.0 <= unrelated[1] <= len(reference) / STEP_RATE
