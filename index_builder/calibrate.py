"""Decision thresholds from score statistics, stored in the index manifest's calibration.

Two calibrations, both per index (the best score of unrelated audio is a maximum over the
catalog's songs, so it grows with the catalog):

- *impostor* (`impostor_calibration`, at every build/add): reference segments against the
  other songs' segments; the start threshold is a high quantile. Cheap, needs no audio,
  but reference-vs-reference scores are not what a broadcast feeds the daemon.
- *stream* (`calibrate_index`, `coverwatch calibrate`): non-catalog audio runs through
  the daemon's scoring (windows ending at every hop, silence gating, top-k search). A
  start needs one song to lead for `start_hops` hops, so the statistic per hop is the
  lowest top score over the last `start_hops` hops when one song led all of them. Its
  maxima over blocks of `calibration_block_s` are fitted with a Gumbel law (the law of
  maxima); a block whose maximum passes the start threshold is one false alarm, so

      false alarms per day (t) = blocks per day * share of usable blocks * (1 - G(t))

  and the start threshold solves that for `target_false_alarms_per_day`. The end
  threshold is the median block maximum: below it, a score is what unrelated audio
  reaches anyway. A 1-per-day threshold lies far beyond the handful of maxima a short
  calibration sees, so the fit is redone on resampled maxima (bootstrap) and the start
  threshold's 90 % interval is stored beside it, and logged. An event's `p_value` is
  1 - G(score): the chance that one block of unrelated audio scores this high.

Letters: H hops, N samples, T frames, F CQT bins.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_builder.store import IndexStore, load_index, save_index
from streamer.alignment import POOL_FRAMES, STEP_RATE, align_frames, chroma, fuse_scores
from streamer.audio import HOP_LENGTH, SAMPLE_RATE, seconds_to_frames
from streamer.config import Config, IndexBuildConfig, StreamConfig
from streamer.rolling import hop_energy

log = logging.getLogger(__name__)

IMPOSTOR_NEIGHBOURS = 64  # neighbours searched per vector for the impostor calibration
IMPOSTOR_ALIGNED = 2000  # with the alignment term (~20 ms a vector), a larger catalog's impostors are sampled
IMPOSTOR_SAMPLE_SEED = 0  # that sample is reproducible
SECONDS_PER_DAY = 86400.0
EULER_GAMMA = 0.5772156649015329
MIN_BLOCKS = 10  # fewer usable blocks than this cannot be fitted
STEADY_BLOCKS = 60  # fewer blocks than this (1 h at 60-s blocks): warn that the start threshold is loose
BOOTSTRAP_RESAMPLES = 1000  # refits behind the start threshold's interval
BOOTSTRAP_SEED = 0  # the interval is reproducible for the same audio
HOPS_PER_SEARCH = 256  # hops embedded and searched per batch (bounds memory)
EMBED_BATCH = 64  # windows per encoder call (offline: larger calls than the daemon's)
# [stream] settings of the alignment term: part of the score, so recorded with a calibration
ALIGNMENT_KEYS = ("align_weight", "align_window_s", "align_candidates", "align_delay", "align_neighbours")


# --- impostor calibration (reference vs reference) -----------------------------------


def stored_vectors(index) -> np.ndarray:
    """(V, D) float32 copy of the vectors held by a flat, HNSW or IVF index."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def impostor_calibration(store: IndexStore, cfg: IndexBuildConfig, stream: StreamConfig | None = None) -> dict:
    """Impostor statistics: for each indexed vector, the best score of any *other* song.

    These are scores between different songs, i.e. what a non-matching query can reach.
    With `stream.align_weight` > 0 the score is the daemon's: the best
    `align_candidates` other songs also get the alignment term for the segment's last
    `align_window_s` (on a seeded sample of `IMPOSTOR_ALIGNED` vectors in a larger catalog).
    That query is cut from the stored float16 chroma of the segment, without a silence
    gate and shorter when segments are shorter than the window: close to, not exactly,
    what the daemon would score; `coverwatch calibrate` measures the daemon's own.
    The start threshold is their `impostor_quantile` quantile; the end threshold their
    median halfway to it, so a match ends only when the score has fallen well back.
    """
    stream = stream or StreamConfig()
    align = {key: getattr(stream, key) for key in ALIGNMENT_KEYS}
    if len(store.songs) < 2:
        return {"n_scores": 0, "start_threshold": 0.9, "end_threshold": 0.8, "note": "fewer than 2 songs: default thresholds", **align}
    rows = np.arange(store.n_vectors)
    if stream.align_weight > 0 and len(rows) > IMPOSTOR_ALIGNED:
        rows = np.sort(np.random.default_rng(IMPOSTOR_SAMPLE_SEED).choice(rows, IMPOSTOR_ALIGNED, replace=False))
    vectors = stored_vectors(store.faiss_index)[rows]
    per_song = store.best_per_song_grouped(vectors, np.arange(len(rows)), len(rows), IMPOSTOR_NEIGHBOURS)
    best_other = []
    for row, found in zip(rows, per_song):
        own = int(store.vector_song[row])
        found.pop(own, None)  # the vector's own song is no impostor
        if found and stream.align_weight > 0:
            start_s, end_s = (float(x) for x in store.vector_span[row])
            steps = store.song_chroma(own)[int(start_s * STEP_RATE) : int(end_s * STEP_RATE)]
            query = steps[-(align_frames(stream) // POOL_FRAMES) :]  # as many steps as the daemon aligns
            found = fuse_scores(found, query, store.song_chroma, stream)
        if found:
            best_other.append(max(found.values()))
    impostor = np.asarray(best_other)
    start = float(np.quantile(impostor, cfg.impostor_quantile))
    median = float(np.median(impostor))
    return {
        "n_scores": len(impostor),
        "impostor_median": median,
        "impostor_p99": float(np.quantile(impostor, 0.99)),
        "impostor_max": float(impostor.max()),
        "quantile": cfg.impostor_quantile,
        "start_threshold": start,
        "end_threshold": median + 0.5 * (start - median),
        **align,
    }


# --- the extreme-value model (pure) ---------------------------------------------------


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


# --- measuring scores on audio ---------------------------------------------------------


def hop_scores(embedder, index: IndexStore, audio: np.ndarray, stream_cfg: StreamConfig) -> tuple[np.ndarray, list[dict[int, float]]]:
    """(N,) float32 audio at SAMPLE_RATE -> ((H,) decision times in s, per hop {song row: score}),
    as the daemon scores a file: `embedding_hop_scores`, then the daemon's alignment term
    (streamer/alignment.py) for each hop's best `align_candidates` songs."""
    times, scores, queries = embedding_hop_scores(embedder, index, audio, stream_cfg)
    return times, fuse_hops(scores, queries, index, stream_cfg)


def fuse_hops(
    scores: list[dict[int, float]], queries: list[np.ndarray | None], index: IndexStore, stream_cfg: StreamConfig
) -> list[dict[int, float]]:
    """Per hop embedding scores and alignment-window chroma -> the daemon's fused scores."""
    if stream_cfg.align_weight <= 0:
        return scores
    return [fuse_scores(s, q, index.song_chroma, stream_cfg) if s and q is not None else s for s, q in zip(scores, queries)]


def embedding_hop_scores(
    embedder, index: IndexStore, audio: np.ndarray, stream_cfg: StreamConfig
) -> tuple[np.ndarray, list[dict[int, float]], list[np.ndarray | None]]:
    """(N,) float32 audio at SAMPLE_RATE -> ((H,) decision times in s, per hop {song row:
    embedding score}, per hop the (S, 12) chroma of the alignment window or None if silent).

    Hop h decides at time h * hop_s (from the first hop whose shortest window is filled)
    with every configured window ending there that is filled and not silent; a song's
    embedding score is its best over those windows' top_k hits. The alignment window is the
    last `align_window_s` (cut to the longest window, less while filling), as the daemon's
    ring gives it. Whole-file CQT frames equal the daemon's incremental ones, and a window
    ends at the first frame count whose audio reaches the decision time, as in the daemon.
    """
    assert audio.ndim == 1 and audio.dtype == np.float32
    frames = embedder.cqt_whole(audio)
    kernel = embedder.kernel_length
    n_frames = len(frames)
    energy = np.zeros(n_frames, np.float32)  # of each frame's newest HOP samples, as the daemon's silence gate measures it
    tail = audio[kernel - HOP_LENGTH : kernel - HOP_LENGTH + n_frames * HOP_LENGTH]
    energy[: len(tail) // HOP_LENGTH] = hop_energy(tail[: len(tail) // HOP_LENGTH * HOP_LENGTH])
    window_frames = [seconds_to_frames(s) for s in stream_cfg.windows_s]
    silence = 10.0 ** (stream_cfg.silence_dbfs / 10.0)
    ends, times = [], []
    h = 1
    while True:
        end = math.ceil((h * stream_cfg.hop_s * SAMPLE_RATE - kernel) / HOP_LENGTH - 1e-6) + 1  # frames reaching that time
        if end > n_frames:
            break
        if end >= min(window_frames):
            ends.append(end)
            times.append(h * stream_cfg.hop_s)
        h += 1
    aligned = align_frames(stream_cfg)
    results: list[dict[int, float]] = []
    queries: list[np.ndarray | None] = []
    for first in range(0, len(ends), HOPS_PER_SEARCH):
        batch = ends[first : first + HOPS_PER_SEARCH]
        windows = [
            (g, frames[end - n : end])
            for g, end in enumerate(batch)
            for n in window_frames
            if n <= end and float(energy[end - n : end].mean()) >= silence
        ]
        queries_batch, groups = embedder.embed_windows(windows, EMBED_BATCH)
        results.extend(index.best_per_song_grouped(queries_batch, groups, len(batch), stream_cfg.top_k))
        for end in batch:
            start = max(0, end - aligned)
            queries.append(chroma(frames[start:end]) if float(energy[start:end].mean()) >= silence else None)
    return np.asarray(times), results, queries


def leaders(scores: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-hop score dicts -> ((H,) leading song row or -1, (H,) its score or -inf)."""
    top = [max(s.items(), key=lambda kv: kv[1]) if s else (-1, -np.inf) for s in scores]
    return np.array([t[0] for t in top], dtype=np.int64), np.array([t[1] for t in top], dtype=np.float64)


def fit_statistics(stats: list[np.ndarray], cfg: Config) -> dict:
    """Per calibration file, the (H,) `run_statistic` of its hops -> `thresholds_for_rate`'s fit
    over their `calibration_block_s` block maxima, for `target_false_alarms_per_day`."""
    build = cfg.index_build
    hops_per_block = max(1, round(build.calibration_block_s / cfg.stream.hop_s))
    maxima, n_blocks = zip(*(block_maxima(s, hops_per_block) for s in stats))
    return thresholds_for_rate(np.concatenate(maxima), sum(n_blocks), hops_per_block * cfg.stream.hop_s, build.target_false_alarms_per_day)


def calibrate_index(index_dir: Path, audio_paths: list[Path], embedder, cfg: Config) -> dict:
    """Measure non-catalog audio against the index; store thresholds in its manifest.

    Returns the new calibration (the impostor figures stay; `stream` holds the fit, the
    audio used, the catalog size and the stream settings it was measured with).
    """
    from streamer.decode import load_audio

    store = load_index(index_dir, expected_model_hash=embedder.info.model_hash)
    stats, seconds = [], 0.0
    for path in audio_paths:
        audio = load_audio(path)
        seconds += len(audio) / SAMPLE_RATE
        top_song, top_score = leaders(hop_scores(embedder, store, audio, cfg.stream)[1])
        stats.append(run_statistic(top_song, top_score, cfg.decision.start_hops))
        log.info(
            "calibration audio %s: %.0f s, top score median %.3f",
            path,
            len(audio) / SAMPLE_RATE,
            float(np.median(top_score[np.isfinite(top_score)])),
        )
    fit = fit_statistics(stats, cfg)
    fit.update(
        audio=[str(p) for p in audio_paths],
        audio_s=round(seconds, 1),
        n_songs=len(store.songs),
        windows_s=list(cfg.stream.windows_s),
        hop_s=cfg.stream.hop_s,
        top_k=cfg.stream.top_k,
        silence_dbfs=cfg.stream.silence_dbfs,
        **{key: getattr(cfg.stream, key) for key in ALIGNMENT_KEYS},
        start_hops=cfg.decision.start_hops,
    )
    store.calibration = {**store.calibration, "stream": fit}
    save_index(index_dir, store, embedder.info)
    low, high = fit["start_threshold_interval"]
    log.info(
        "calibrated %s on %.0f s of non-catalog audio: start %.3f (90 %% interval %.3f-%.3f), end %.3f for %g false alarms/day",
        index_dir, seconds, fit["start_threshold"], low, high, fit["end_threshold"], cfg.index_build.target_false_alarms_per_day,
    )  # fmt: skip
    if fit["n_blocks"] < STEADY_BLOCKS:
        log.warning(
            "%s: only %d usable %g-s blocks of calibration audio; the start threshold could lie anywhere in %.3f-%.3f. "
            "Calibrate on %d min or more of non-catalog audio for a steadier one",
            index_dir, fit["n_blocks"], fit["block_s"], low, high, round(STEADY_BLOCKS * fit["block_s"] / 60.0),
        )  # fmt: skip
    return store.calibration


def needs_recalibration(calibration: dict, n_songs: int, growth: float) -> bool:
    """Whether the catalog size moved by more than `growth` (a fraction) since the stream calibration."""
    stream = calibration.get("stream")
    return bool(stream) and abs(n_songs - stream["n_songs"]) > growth * stream["n_songs"]


def stream_settings(calibration: dict, cfg: Config) -> Config:
    """`cfg` with the stream and decision settings a stream calibration was measured with."""
    from streamer.config import replace_section

    stream = calibration["stream"]
    cfg = replace_section(
        cfg,
        "stream",
        windows_s=stream["windows_s"],
        hop_s=stream["hop_s"],
        top_k=stream["top_k"],
        silence_dbfs=stream["silence_dbfs"],
        **{key: stream.get(key, getattr(cfg.stream, key)) for key in ALIGNMENT_KEYS},
    )
    return replace_section(cfg, "decision", start_hops=stream["start_hops"])


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


def recalibrate_if_needed(index_dir: Path, store: IndexStore, embedder, build: IndexBuildConfig) -> dict:
    """After `index add`: re-run the stream calibration when the catalog size moved by more
    than `recalibrate_growth`, on the same audio and settings; warn if that audio is gone.
    Returns the index's calibration as it now stands."""
    if not needs_recalibration(store.calibration, len(store.songs), build.recalibrate_growth):
        return store.calibration
    stream = store.calibration["stream"]
    missing = [p for p in stream["audio"] if not Path(p).exists()]
    if missing:
        log.warning(
            "%s: catalog went from %d to %d songs since the stream calibration, whose audio is gone (%s); "
            "its thresholds are stale: run `coverwatch calibrate %s --audio ...`",
            index_dir, stream["n_songs"], len(store.songs), missing[0], index_dir,
        )  # fmt: skip
        return store.calibration
    log.info("%s: catalog went from %d to %d songs; re-running the stream calibration", index_dir, stream["n_songs"], len(store.songs))
    return calibrate_index(
        index_dir, [Path(p) for p in stream["audio"]], embedder, stream_settings(store.calibration, Config(index_build=build))
    )
