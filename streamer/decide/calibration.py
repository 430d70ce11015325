"""Calibration statistics: what a score means against unrelated audio.

Everything here is pure arithmetic on scores and on the calibration a manifest stores, so
the daemon (p-values, the fused score, drift warnings) and the index builder (fitting
thresholds, `coverwatch.index_builder.calibrate`) share one home for it.

A start needs one song to lead for `start_hops` hops, so the statistic per hop is the
lowest top score over the last `start_hops` hops when one song led all of them
(`run_statistic`). Its maxima over blocks of `calibration_block_s` are fitted with a Gumbel
law (the law of maxima); a block whose maximum passes the start threshold is one false
alarm, so

    false alarms per day (t) = blocks per day * share of usable blocks * (1 - G(t))

and the start threshold solves that for `target_false_alarms_per_day`. The end threshold
is the median block maximum: below it, a score is what unrelated audio reaches anyway. A
1-per-day threshold lies far beyond the handful of maxima a short calibration sees, so the
fit is redone on resampled maxima (bootstrap) and the start threshold's 90 % interval is
stored beside it. An event's `p_value` is 1 - G(score): the chance that one block of
unrelated audio scores this high.

Letters: H hops, B blocks, S chroma steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.decide.alignment import fuse_scores
from coverwatch.streamer.search.store import IndexStore

SECONDS_PER_DAY = 86400.0
EULER_GAMMA = 0.5772156649015329
MIN_BLOCKS = 10  # fewer usable blocks than this cannot be fitted
BOOTSTRAP_RESAMPLES = 1000  # refits behind the start threshold's interval
BOOTSTRAP_SEED = 0  # the interval is reproducible for the same audio
# [stream] settings of the alignment term: part of the score, so recorded with a calibration
ALIGNMENT_KEYS = ("align_weight", "align_window_s", "align_candidates", "align_delay", "align_neighbours")


@dataclass(frozen=True)
class Gumbel:
    loc: float
    scale: float

    def sf(self, x: float) -> float:
        """P(block maximum > x)."""
        return float(-np.expm1(-np.exp(-(x - self.loc) / self.scale)))

    def isf(self, p: float) -> float:
        """The x with P(block maximum > x) = p, 0 < p < 1."""
        assert 0.0 < p < 1.0, p
        return float(self.loc - self.scale * math.log(-math.log1p(-p)))


def fit_gumbel(maxima: np.ndarray) -> Gumbel:
    """Gumbel law for (B,) block maxima, by the method of moments (robust for small B)."""
    assert maxima.ndim == 1 and len(maxima) >= 2, maxima.shape
    scale = max(float(np.std(maxima, ddof=1)) * math.sqrt(6.0) / math.pi, 1e-6)
    return Gumbel(float(np.mean(maxima)) - EULER_GAMMA * scale, scale)


def run_statistic(top_song: np.ndarray, top_score: np.ndarray, start_hops: int) -> np.ndarray:
    """(H,) leading song (-1 = none) and its score per hop -> (H,) score a start could use.

    At hop h it is the lowest of the last `start_hops` top scores when one song led all of
    them, else -inf: the highest start threshold that would have started a match there.
    """
    assert top_song.shape == top_score.shape and top_song.ndim == 1
    out = np.full(len(top_score), -np.inf)
    if len(top_score) < start_hops:
        return out
    n = len(top_score) - start_hops + 1  # hops with a full run behind them
    same = top_song[start_hops - 1 :] >= 0
    low = top_score[start_hops - 1 :].astype(np.float64)
    for lag in range(1, start_hops):
        same &= top_song[start_hops - 1 - lag : start_hops - 1 - lag + n] == top_song[start_hops - 1 :]
        low = np.minimum(low, top_score[start_hops - 1 - lag : start_hops - 1 - lag + n])
    out[start_hops - 1 :] = np.where(same, low, -np.inf)
    return out


def block_maxima(stat: np.ndarray, hops_per_block: int) -> tuple[np.ndarray, int]:
    """(H,) statistic -> ((B',) maxima of the full blocks that hold a finite value, B total blocks)."""
    n_blocks = len(stat) // hops_per_block
    blocks = stat[: n_blocks * hops_per_block].reshape(n_blocks, hops_per_block).max(axis=1)
    return blocks[np.isfinite(blocks)], n_blocks


def bootstrap_interval(maxima: np.ndarray, p_block: float, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """(B,) block maxima -> 5th and 95th percentile of the fitted start threshold `isf(p_block)`
    over `resamples` refits on maxima drawn with replacement: how far the few blocks of a
    short calibration leave the threshold uncertain."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    # one resample at a time: a (resamples, B) index matrix is 240 MB for a 500-h calibration
    starts = [fit_gumbel(maxima[rng.integers(0, len(maxima), len(maxima))]).isf(p_block) for _ in range(resamples)]
    low, high = np.quantile(starts, [0.05, 0.95])
    return float(low), float(high)


def thresholds_for_rate(maxima: np.ndarray, n_blocks: int, block_s: float, target_per_day: float) -> dict:
    """Gumbel fit of block maxima -> start threshold for `target_per_day` false alarms (with its
    bootstrap interval), end threshold."""
    if len(maxima) < MIN_BLOCKS:
        raise ValueError(f"only {len(maxima)} usable {block_s:g}-s blocks of calibration audio; need {MIN_BLOCKS} (give more audio)")
    gumbel = fit_gumbel(maxima)
    usable = len(maxima) / n_blocks
    blocks_per_day = SECONDS_PER_DAY / block_s
    p_block = min(0.5, target_per_day / (blocks_per_day * usable))
    start = gumbel.isf(p_block)
    return {
        "gumbel_loc": gumbel.loc,
        "gumbel_scale": gumbel.scale,
        "usable_share": usable,
        "block_s": block_s,
        "start_threshold": start,
        "start_threshold_interval": list(bootstrap_interval(maxima, p_block)),
        "n_blocks": len(maxima),
        "end_threshold": min(start, gumbel.isf(0.5)),
        "target_false_alarms_per_day": target_per_day,
    }


def false_alarms_per_day(calibration: dict, threshold: float) -> float:
    """Expected false alarms per day of unrelated audio at start threshold `threshold`."""
    stream = calibration["stream"]
    gumbel = Gumbel(stream["gumbel_loc"], stream["gumbel_scale"])
    return SECONDS_PER_DAY / stream["block_s"] * stream["usable_share"] * gumbel.sf(threshold)


def p_value(calibration: dict, score: float) -> float | None:
    """Chance that one calibration block of unrelated audio scores >= `score` (None: no stream calibration)."""
    stream = calibration.get("stream")
    if not stream:
        return None
    return Gumbel(stream["gumbel_loc"], stream["gumbel_scale"]).sf(score)


def fuse_hops(
    scores: list[dict[int, float]],
    queries: list[np.ndarray | None],
    index: IndexStore,
    stream_cfg: StreamConfig,
    positions: list[dict[int, float]] | None = None,
) -> list[dict[int, float]]:
    """Per hop embedding scores and alignment-window chroma -> the daemon's fused scores;
    `positions`, if given, receives one {song row: aligned reference time} per hop."""
    fused = []
    for s, q in zip(scores, queries):
        hop_positions: dict[int, float] = {}
        fused.append(fuse_scores(s, q, index.song_chroma, stream_cfg, hop_positions) if stream_cfg.align_weight > 0 and s and q is not None else s)
        if positions is not None:
            positions.append(hop_positions)
    return fused


def leaders(scores: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-hop score dicts -> ((H,) leading song row or -1, (H,) its score or -inf)."""
    top = [max(s.items(), key=lambda kv: kv[1]) if s else (-1, -np.inf) for s in scores]
    return np.array([t[0] for t in top], dtype=np.int64), np.array([t[1] for t in top], dtype=np.float64)


def settings_drift(calibration: dict, stream: StreamConfig) -> list[str]:
    """The [stream] settings that differ from those the thresholds in use were measured with
    ("key: calibrated A, configured B"): a stream calibration's scoring settings, else the
    impostor calibration's alignment settings. Thresholds do not hold for other settings."""
    measured = calibration.get("stream") or calibration
    keys = ("windows_s", "hop_s", "top_k", "silence_dbfs", *ALIGNMENT_KEYS) if calibration.get("stream") else ALIGNMENT_KEYS
    return [
        f"stream.{key}: calibrated {measured.get(key, 'without it')}, configured {getattr(stream, key)}"
        for key in keys
        if measured and measured.get(key) != getattr(stream, key)
    ]
