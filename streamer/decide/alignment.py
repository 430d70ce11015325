"""Alignment check of embedding candidates: does the live window's pitch-class sequence
line up, in order, with a candidate reference? (pure numpy, no model)

The embedding says "this sounds like song X"; on short broadcast windows it also says so,
now and then, about unrelated music that happens to lie near a few catalog songs. A cover
keeps the melody's succession of pitch classes, transposed and stretched in time; other
music does not. So each candidate song's score gets a second, independent term: the
longest locally aligned path between the window's chroma and the reference's chroma, in
the manner of Serra et al. (2009, "Cross recurrence quantification for cover song
identification", the Qmax measure):

1. chroma: the log-CQT frames the daemon already holds are turned back into magnitude,
   folded onto 12 pitch classes and averaged over `POOL_FRAMES` (~0.21 s per step);
2. key: the query is rolled by the optimal transposition index (the roll that best
   matches the two global pitch-class profiles);
3. delay embedding: `align_delay` consecutive steps are stacked, so a step carries a short
   melodic gesture rather than one chord;
4. cross recurrence: step i of the query and step j of the reference recur when each is
   among the other's `align_neighbours` fraction of nearest steps (mutual, cosine);
5. Qmax: the longest path through recurrences moving by (1,1), (2,1) or (1,2) steps
   (tempo ratios 1/2..2), with penalties for entering and staying in a gap.

`alignment_score` is Qmax over the query's steps, in [0, 1]: about the fraction of the
window that follows the reference. A path grows by one per *reference* step, so a query
played slower than the reference tops out below 1 (~0.83 at 1.2x slower, 0.5 at 2x) while
a faster one can reach 1; the settings were tuned with this scale. The daemon adds
`stream.align_weight` times it to the embedding score of each of the
`stream.align_candidates` best songs (`fuse_scores`), and calibration measures the fused
score the same way, so thresholds stay in the units the decisions use.

Letters: T CQT frames, F CQT bins, S chroma steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.frontend.audio import BINS_PER_OCTAVE, FRAME_RATE, seconds_to_frames

LOG_FLOOR = 1e-4  # the front end's floor inside log(magnitude + floor) (model/frontend.py)
POOL_FRAMES = 9  # CQT frames per chroma step: 9 / FRAME_RATE ~ 0.209 s
STEP_RATE = FRAME_RATE / POOL_FRAMES  # ~4.79 chroma steps per second
GAP_ONSET = 5.0  # Qmax penalty for leaving a recurrence (Serra et al. 2009)
GAP_EXTENSION = 0.5  # Qmax penalty per further step without recurrence
MIN_STEPS = 8  # shorter sequences (under ~1.7 s) are not aligned: score 0
MAX_EXTENSION_STEPS = 10  # a path ending further (~2 s) before the query's end gives no reference position


def chroma(frames: np.ndarray) -> np.ndarray:
    """(T, F) log-CQT frames (F a multiple of 12, lowest bin a C) -> (T // POOL_FRAMES, 12) float32."""
    n_bins = frames.shape[1]
    if n_bins % BINS_PER_OCTAVE:
        raise ValueError(f"chroma needs whole octaves of {BINS_PER_OCTAVE} bins, got {n_bins} bins")
    usable = len(frames) // POOL_FRAMES * POOL_FRAMES
    magnitude = np.clip(np.exp(frames[:usable].astype(np.float32)) - LOG_FLOOR, 0.0, None)
    folded = magnitude.reshape(usable, n_bins // BINS_PER_OCTAVE, BINS_PER_OCTAVE).sum(axis=1)
    return folded.reshape(-1, POOL_FRAMES, BINS_PER_OCTAVE).mean(axis=1).astype(np.float32)


def key_shifts(query: np.ndarray, reference: np.ndarray, n: int) -> list[int]:
    """The `n` rolls (0..11) of the query's pitch classes whose global profile best matches
    the reference's, best first."""
    q, r = query.sum(axis=0), reference.sum(axis=0)
    q = q / (q.max() + 1e-9)
    r = r / (r.max() + 1e-9)
    fit = np.array([np.dot(np.roll(q, k), r) for k in range(BINS_PER_OCTAVE)])
    return [int(k) for k in np.argsort(-fit, kind="stable")[:n]]


def key_shift(query: np.ndarray, reference: np.ndarray) -> int:
    """Roll (0..11) of the query's pitch classes whose global profile best matches the reference's."""
    return key_shifts(query, reference, 1)[0]


def delay_embed(steps: np.ndarray, delay: int) -> np.ndarray:
    """(S, 12) -> (S - delay + 1, 12 * delay): consecutive steps stacked, rows unit length."""
    n = len(steps) - delay + 1
    stacked = np.concatenate([steps[i : i + n] for i in range(delay)], axis=1)
    return stacked / (np.linalg.norm(stacked, axis=1, keepdims=True) + 1e-9)


def embedded_similarity(query: np.ndarray, reference: np.ndarray, delay: int) -> np.ndarray:
    """(Sq, 12), (Sr, 12) chroma -> (Sq - delay + 1, Sr - delay + 1) cosine similarity of
    their delay embeddings (as `delay_embed` rows), without building them.

    A stacked row's product is the sum of `delay` step products along a diagonal, and its
    squared norm the sum of `delay` squared step norms: one (Sq, Sr) product of 12-d steps
    and `delay` shifted additions instead of a product of 12 * delay-dim rows (~5x faster).
    """
    n_query, n_ref = len(query) - delay + 1, len(reference) - delay + 1
    steps = query @ reference.T
    total = steps[:n_query, :n_ref].copy()
    for k in range(1, delay):
        total += steps[k : k + n_query, k : k + n_ref]
    return total / np.outer(_stacked_norms(query, delay), _stacked_norms(reference, delay))


def _stacked_norms(steps: np.ndarray, delay: int) -> np.ndarray:
    """(S, 12) -> (S - delay + 1,) norms of the delay-embedded rows (+ 1e-9, as `delay_embed`)."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.einsum("ij,ij->i", steps, steps), dtype=np.float64)])
    return (np.sqrt(np.maximum(cumulative[delay:] - cumulative[:-delay], 0.0)) + 1e-9).astype(np.float32)


def cross_recurrence(query: np.ndarray, reference: np.ndarray, neighbours: float) -> np.ndarray:
    """(Sq, D), (Sr, D) unit rows -> (Sq, Sr) bool: mutual nearest neighbours by cosine."""
    # einsum, not BLAS: a multi-threaded BLAS spends ~3x longer waking threads than on these small products
    return mutual_neighbours(np.einsum("id,jd->ij", query, reference), neighbours)


def mutual_neighbours(similarity: np.ndarray, neighbours: float) -> np.ndarray:
    """(Sq, Sr) similarity -> (Sq, Sr) bool: cells among both their row's and their column's
    `neighbours` fraction of highest values."""
    k_row = max(1, int(neighbours * similarity.shape[1]))
    k_col = max(1, int(neighbours * similarity.shape[0]))
    row_cut = np.partition(similarity, -k_row, axis=1)[:, -k_row][:, None]
    col_cut = np.partition(similarity.T, -k_col, axis=1)[:, -k_col][None, :]  # rows of the transpose: contiguous
    return (similarity >= row_cut) & (similarity >= col_cut)


def qmax_paths(recurrences: list[np.ndarray]) -> list[tuple[float, int, int]]:
    """[(Sq, Sr_c) bool cross recurrences, one per candidate, same Sq] -> per candidate (length
    of the best local alignment path (Qmax), query step, reference step where it ends).

    Q[i, j] grows by 1 along recurrences reached from (i-1, j-1), (i-2, j-1) or (i-1, j-2),
    and off them decays by GAP_ONSET after a recurrence and GAP_EXTENSION after a gap,
    floored at 0. Row i needs only rows i-1 and i-2, so each row is one vector operation;
    the candidates sit side by side in one table, each behind two columns held at 0 (a path
    reaches back two columns at most), so a row costs one set of vector operations for all
    of them rather than one each: the per-operation overhead dominates at these sizes.
    """
    if not recurrences:
        return []
    n_query = recurrences[0].shape[0]
    if any(r.shape[0] != n_query for r in recurrences):
        raise ValueError("qmax_paths needs recurrences over the same query steps")
    widths = [r.shape[1] for r in recurrences]
    starts = np.cumsum([0] + [w + 2 for w in widths[:-1]]) + 2  # each block's first column in the table
    hit = np.zeros((n_query + 2, int(starts[-1] + widths[-1])), dtype=bool)
    for start, r in zip(starts, recurrences):
        hit[2:, start : start + r.shape[1]] = r
    barrier = np.ones(hit.shape[1] - 2, dtype=np.float32)  # 0 at the separating columns (table columns 2..)
    for start in starts[1:]:
        barrier[start - 4 : start - 2] = 0.0
    penalty = np.where(hit, GAP_ONSET, GAP_EXTENSION).astype(np.float32)
    q = np.zeros(hit.shape, dtype=np.float32)
    for i in range(2, n_query + 2):
        diagonal, slow, fast = q[i - 1, 1:-1], q[i - 2, 1:-1], q[i - 1, :-2]
        on_path = np.maximum(np.maximum(diagonal, slow), fast) + 1.0
        off_path = np.maximum(
            np.maximum(diagonal - penalty[i - 1, 1:-1], slow - penalty[i - 2, 1:-1]),
            np.maximum(fast - penalty[i - 1, :-2], 0.0),
        )
        q[i, 2:] = np.where(hit[i, 2:], on_path, off_path) * barrier
    results = []
    for start, width in zip(starts, widths):
        block = q[:, start : start + width]
        if block.size == 0:
            results.append((0.0, -2, -2))
            continue
        i, j = np.unravel_index(int(np.argmax(block)), block.shape)
        results.append((float(block[i, j]), int(i) - 2, int(j)))
    return results


def qmax_path(recurrence: np.ndarray) -> tuple[float, int, int]:
    """(Sq, Sr) bool cross recurrence -> (Qmax, query step, reference step where that path ends)."""
    return qmax_paths([recurrence])[0]


def qmax(recurrence: np.ndarray) -> float:
    """(Sq, Sr) bool cross recurrence -> length of the best local alignment path (Qmax)."""
    return qmax_path(recurrence)[0]


def alignment_matches(
    query: np.ndarray, references: list[np.ndarray], delay: int, neighbours: float, keys: int = 1
) -> list[tuple[float, float | None]]:
    """(Sq, 12) chroma, [(Sr, 12) chroma] -> per reference (Qmax / query steps in [0, 1],
    reference time in s that lines up with the query's last step, or None).

    The score is 0 when either is too short or silent. `keys` transpositions are tried
    (`key_shifts`, best profile fit first) and the longest path wins: on a short window the
    global profiles can rank the right key second. The reference time extends the best
    path from where it ends to the query's end at the reference's own pace; it is None
    without a path or when the path ends more than MAX_EXTENSION_STEPS before the query
    does (the window's end then follows no part of the reference). All (reference, key)
    pairs share one `qmax_paths` table."""
    too_short = len(query) < max(MIN_STEPS, delay + 1) or not query.any()
    usable = [
        i for i, r in enumerate(references) if not too_short and len(r) >= max(MIN_STEPS, delay + 1) and r.any()
    ]
    pairs = [(i, shift) for i in usable for shift in key_shifts(query, references[i], keys)]
    recurrences = [
        mutual_neighbours(embedded_similarity(np.roll(query, shift, axis=1), references[i], delay), neighbours) for i, shift in pairs
    ]
    best: dict[int, tuple[float, int, int]] = {}
    for (i, _), path in zip(pairs, qmax_paths(recurrences)):
        best[i] = max(best.get(i, (0.0, 0, 0)), path)
    n_embedded = len(query) - delay + 1
    return [_match_result(best.get(i, (0.0, 0, 0)), n_embedded, len(r), delay) for i, r in enumerate(references)]


def _match_result(path: tuple[float, int, int], n_embedded: int, n_reference: int, delay: int) -> tuple[float, float | None]:
    """Best (Qmax, query end, reference end) of one reference -> (score, reference time or None)."""
    length, query_end, reference_end = path
    if length <= 0:
        return 0.0, None
    score, extension = min(1.0, length / n_embedded), n_embedded - 1 - query_end
    if extension > MAX_EXTENSION_STEPS:
        return score, None
    # an embedded step ends delay - 1 steps after it starts
    reference_step = min(n_reference - 1, reference_end + extension + delay - 1)
    return score, (reference_step + 1) / STEP_RATE


def alignment_match(query: np.ndarray, reference: np.ndarray, delay: int, neighbours: float, keys: int = 1) -> tuple[float, float | None]:
    """One reference of `alignment_matches`."""
    return alignment_matches(query, [reference], delay, neighbours, keys)[0]


def alignment_score(query: np.ndarray, reference: np.ndarray, delay: int, neighbours: float) -> float:
    """(Sq, 12), (Sr, 12) chroma -> Qmax / query steps in [0, 1]; 0 when either is too short or silent."""
    return alignment_match(query, reference, delay, neighbours)[0]


def align_frames(cfg: StreamConfig) -> int:
    """CQT frames aligned per hop: align_window_s, cut to the longest window (all the ring holds)."""
    return seconds_to_frames(min(cfg.align_window_s, max(cfg.windows_s)))


def fuse_scores(
    scores: dict[int, float],
    query: np.ndarray,
    song_chroma: Callable[[int], np.ndarray],
    cfg: StreamConfig,
    positions: dict[int, float] | None = None,
    keys: int = 1,
) -> dict[int, float]:
    """One hop's {song row: embedding score} -> the same with the `align_candidates` best
    songs raised by align_weight * alignment of `query` ((S, 12) chroma of the last
    align_window_s of audio) with `song_chroma(row)` ((S', 12)); other songs keep theirs.
    `positions`, if given, receives {row: reference time (s) at the query's end} for the
    aligned songs that have one, and `keys` transpositions are tried (`alignment_match`)."""
    fused = dict(scores)
    rows = sorted(scores, key=scores.__getitem__, reverse=True)[: cfg.align_candidates]
    matches = alignment_matches(query, [song_chroma(row) for row in rows], cfg.align_delay, cfg.align_neighbours, keys)
    for row, (score, reference_s) in zip(rows, matches):
        fused[row] = scores[row] + cfg.align_weight * score
        if positions is not None and reference_s is not None:
            positions[row] = reference_s
    return fused
