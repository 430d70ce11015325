"""`coverwatch identify`: offline query of whole files against an index.

A query file is embedded whole (up to WHOLE_TRACK_MAX_S) and as windows of the longest
configured stream window, so that a query that is a part of a song, or contains a song
amid other audio, still finds it; a song's score is its best over all query vectors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.segments import WHOLE_TRACK_MAX_S, segment_spans
from coverwatch.streamer.search.store import IndexStore

log = logging.getLogger(__name__)


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


def identify_file(embedder: Embedder, index: IndexStore, path: Path, top_k: int, window_s: float) -> dict:
    """One result record {"file", "matches": [{"song_id", "title", "score"}, ...]}."""
    frames = embedder.cqt_whole(load_audio(path))
    ranked = rank_songs(index, query_vectors(embedder, frames, window_s), top_k)
    return {
        "file": str(path),
        "matches": [{"song_id": index.songs[s].song_id, "title": index.songs[s].title, "score": round(score, 4)} for s, score in ranked],
    }
