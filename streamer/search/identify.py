"""`coverwatch identify`: offline query of whole files against an index.

A query file is embedded whole (up to WHOLE_TRACK_MAX_S) and as windows of the longest
configured stream window, so that a query that is a part of a song, or contains a song
amid other audio, still finds it; a song's score is its best over all query vectors.
A query shorter than the daemon's shortest window, or with less sound than that above the
silence gate, is refused (`QueryError`): what it would rank is noise, not a match.

The `ALIGN_RERANK` best songs by embedding score are then re-scored as the daemon scores
its candidates: + `[stream] align_weight` x the alignment of the query's chroma with the
reference's (streamer/decide/alignment.py), the whole query rather than the daemon's
last `align_window_s`. The alignment is not learned: it follows the melody's pitch-class
succession in any key and at tempo ratios 0.5-2, so it holds on renderings, instruments
and arrangements the model never heard.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.config import StreamConfig
from coverwatch.streamer.decide.alignment import chroma, fuse_scores
from coverwatch.streamer.frontend.audio import HOP_LENGTH, SAMPLE_RATE, AudioError, seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.segments import WHOLE_TRACK_MAX_S, segment_spans
from coverwatch.streamer.frontend.rolling import hop_energy
from coverwatch.streamer.search.store import IndexStore

log = logging.getLogger(__name__)

ALIGN_RERANK = 20  # songs re-scored with the alignment term per query (~10-30 ms each for whole tracks)
ALIGN_KEYS = 2  # transpositions tried per alignment (the daemon tries 1): +0.005-0.015 mAP for twice the time
ALIGN_MAX_S = 180.0  # the middle this-many seconds of a longer query are aligned (cost grows with query x reference length)


def identify_stream(stream: StreamConfig) -> StreamConfig:
    """The [stream] settings with `align_candidates` widened to ALIGN_RERANK for identify."""
    return dataclasses.replace(stream, align_candidates=max(stream.align_candidates, ALIGN_RERANK))


def query_vectors(embedder: Embedder, frames: np.ndarray, window_s: float) -> np.ndarray:
    """(T, F) -> (Q, D): the whole query plus half-overlapping windows of window_s."""
    window = seconds_to_frames(window_s)
    spans = segment_spans(len(frames), window, max(1, window // 2))
    whole = (0, min(len(frames), seconds_to_frames(WHOLE_TRACK_MAX_S)))
    vectors = [embedder.embed(np.stack([frames[a:b] for a, b in spans]).astype(np.float32))]
    if whole not in spans:
        vectors.append(embedder.embed(frames[None, whole[0] : whole[1]].astype(np.float32)))
    return np.concatenate(vectors)


def rank_songs(index: IndexStore, vectors: np.ndarray, top_k: int, neighbours: int = 64) -> list[tuple[int, float]]:
    """(Q, D) query vectors -> [(song row, score)] best first, song score = max over hits."""
    best = index.best_per_song(vectors.astype(np.float32), neighbours)
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


def middle(frames: np.ndarray, n: int) -> np.ndarray:
    """(T, F) -> (min(T, n), F): the middle n frames, or all of them if fewer."""
    start = max(0, (len(frames) - n) // 2)
    return frames[start : start + n]


class QueryError(AudioError):
    """A query file that decodes but cannot be identified: too short, or silence."""


def check_query(path: Path, audio: np.ndarray, stream: StreamConfig) -> None:
    """Refuse (N,) audio at SAMPLE_RATE holding less than the shortest stream window of sound."""
    needed_s = min(stream.windows_s)
    seconds = len(audio) / SAMPLE_RATE
    if seconds < needed_s:
        raise QueryError(f"{path}: too short ({round(seconds, 3):g} s; at least {needed_s:g} s)")
    hops = hop_energy(audio[: len(audio) // HOP_LENGTH * HOP_LENGTH])
    sound_s = float((hops >= 10.0 ** (stream.silence_dbfs / 10.0)).sum()) * HOP_LENGTH / SAMPLE_RATE
    if sound_s < needed_s:
        loudest = 10.0 * np.log10(max(float(hops.max()), 1e-30)) if len(hops) else float("-inf")
        raise QueryError(
            f"{path}: silence ({sound_s:.1f} s above the {stream.silence_dbfs:g} dBFS gate, loudest {loudest:.0f} dBFS; "
            f"at least {needed_s:g} s of sound needed)"
        )


def identify_file(embedder: Embedder, index: IndexStore, path: Path, top_k: int, stream: StreamConfig) -> dict:
    """One result record {"file", "seconds", "matches": [{"song_id", "title", "score", "metadata"}, ...]}."""
    audio = load_audio(path)
    check_query(path, audio, stream)
    frames = embedder.cqt_whole(audio)
    ranked = rank_songs(index, query_vectors(embedder, frames, max(stream.windows_s)), max(top_k, ALIGN_RERANK))
    if stream.align_weight > 0:
        fused = fuse_scores(dict(ranked), chroma(middle(frames, seconds_to_frames(ALIGN_MAX_S))), index.song_chroma, identify_stream(stream), keys=ALIGN_KEYS)
        ranked = sorted(fused.items(), key=lambda kv: -kv[1])
    ranked = ranked[:top_k]
    return {
        "file": str(path),
        "seconds": round(len(audio) / SAMPLE_RATE, 3),
        "matches": [
            {"song_id": index.songs[s].song_id, "title": index.songs[s].title, "score": round(score, 4), "metadata": index.songs[s].metadata}
            for s, score in ranked
        ],
    }
