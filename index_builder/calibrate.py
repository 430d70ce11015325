"""Setting an index's decision thresholds, stored in its manifest's calibration.

Two calibrations, both per index (the best score of unrelated audio is a maximum over the
catalog's songs, so it grows with the catalog):

- *impostor* (`impostor_calibration`, at every build/add): reference segments against the
  other songs' segments; the start threshold is a high quantile. Cheap, needs no audio,
  but reference-vs-reference scores are not what a broadcast feeds the daemon.
- *stream* (`calibrate_index`, `coverwatch calibrate`): non-catalog audio runs through
  the daemon's scoring (windows ending at every hop, silence gating, top-k search), and
  the block maxima of the resulting statistic are fitted for a target false-alarm rate.
  The statistics themselves (Gumbel fit, run statistic, p-values) live in
  `coverwatch.streamer.decide.calibration`, which the daemon reads too.

Letters: H hops, N samples, T frames, F CQT bins.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from coverwatch.streamer.config import Config, IndexBuildConfig, StreamConfig
from coverwatch.streamer.decide.alignment import POOL_FRAMES, STEP_RATE, align_frames, chroma, fuse_scores
from coverwatch.streamer.decide.calibration import (
    ALIGNMENT_KEYS,
    block_maxima,
    fuse_hops,
    leaders,
    run_statistic,
    thresholds_for_rate,
)
from coverwatch.streamer.frontend.audio import HOP_LENGTH, SAMPLE_RATE, seconds_to_frames
from coverwatch.streamer.frontend.rolling import hop_energy
from coverwatch.streamer.search.shards import ShardedCatalog, open_catalog
from coverwatch.streamer.search.store import IndexStore, save_index

log = logging.getLogger(__name__)

IMPOSTOR_NEIGHBOURS = 64  # neighbours searched per vector for the impostor calibration
IMPOSTOR_ALIGNED = 2000  # with the alignment term (~20 ms a vector), a larger catalog's impostors are sampled
IMPOSTOR_SAMPLE_SEED = 0  # that sample is reproducible
STEADY_BLOCKS = 60  # fewer blocks than this (1 h at 60-s blocks): warn that the start threshold is loose
HOPS_PER_SEARCH = 256  # hops embedded and searched per batch (bounds memory)
EMBED_BATCH = 64  # windows per encoder call (offline: larger calls than the daemon's)


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
    Fewer scores than `min_impostor_scores` cannot estimate that quantile (2 songs give a
    handful): the thresholds are then `fallback_thresholds`, with a warning.
    """
    stream = stream or StreamConfig()
    align = {key: getattr(stream, key) for key in ALIGNMENT_KEYS}
    if len(store.songs) < 2:
        return {"n_scores": 0, **fallback_thresholds(cfg, 0, None), **align}
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
    if not len(impostor):
        return {"n_scores": 0, **fallback_thresholds(cfg, 0, None), **align}
    start = float(np.quantile(impostor, cfg.impostor_quantile))
    median = float(np.median(impostor))
    measured = {"start_threshold": start, "end_threshold": median + 0.5 * (start - median), "threshold_source": "impostor scores"}
    if len(impostor) < min_impostor_scores(cfg):
        measured = fallback_thresholds(cfg, len(impostor), measured)
    return {
        "n_scores": len(impostor),
        "impostor_median": median,
        "impostor_p99": float(np.quantile(impostor, 0.99)),
        "impostor_max": float(impostor.max()),
        "quantile": cfg.impostor_quantile,
        **measured,
        **align,
    }


def min_impostor_scores(cfg: IndexBuildConfig) -> int:
    """Scores needed before the `impostor_quantile` quantile is more than the sample's maximum:
    one expected score beyond it (1000 for the 0.999 quantile)."""
    return math.ceil(1.0 / (1.0 - cfg.impostor_quantile) - 1e-9) if cfg.impostor_quantile < 1.0 else 10**9


def fallback_thresholds(cfg: IndexBuildConfig, n_scores: int, measured: dict | None) -> dict:
    """The configured fallback thresholds (or the measured ones where those are stricter),
    for an index whose impostor scores are too few to set them; warns once per build."""
    start = max(cfg.fallback_start_threshold, measured["start_threshold"] if measured else 0.0)
    end = min(start, max(cfg.fallback_end_threshold, measured["end_threshold"] if measured else 0.0))
    needed = min_impostor_scores(cfg)
    reason = f"only {n_scores} impostor scores (at least {needed} are needed)"
    log.warning(
        "%s: the thresholds are a safe default (start %.3f, end %.3f), not measured on this catalog. "
        "Set them for your stream with `coverwatch calibrate INDEX_DIR --audio FILE...` on an hour or more of music that is NOT in the catalog",
        reason, start, end,
    )  # fmt: skip
    return {"start_threshold": start, "end_threshold": end, "threshold_source": f"fallback default: {reason}"}


# --- measuring scores on audio ---------------------------------------------------------


def hop_scores(
    embedder, index: IndexStore, audio: np.ndarray, stream_cfg: StreamConfig, positions: list[dict[int, float]] | None = None
) -> tuple[np.ndarray, list[dict[int, float]]]:
    """(N,) float32 audio at SAMPLE_RATE -> ((H,) decision times in s, per hop {song row: score}),
    as the daemon scores a file: `embedding_hop_scores`, then the daemon's alignment term
    (streamer/decide/alignment.py) for each hop's best `align_candidates` songs. `positions`,
    if given, receives per hop {song row: aligned reference time in s}."""
    times, scores, queries = embedding_hop_scores(embedder, index, audio, stream_cfg)
    return times, fuse_hops(scores, queries, index, stream_cfg, positions)


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
    from coverwatch.streamer.frontend.decode import load_audio

    store = open_catalog(index_dir, expected_model_hash=embedder.info.model_hash)  # an index folder or a sharded catalog file
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
    calibration = {**store.calibration, "stream": fit}
    if isinstance(store, ShardedCatalog):  # thresholds on the merged scores, kept in the catalog file
        store.save_calibration(calibration)
    else:
        store.calibration = calibration
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
    from coverwatch.streamer.config import replace_section

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
