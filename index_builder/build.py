"""Reference catalog -> FAISS inner-product index: build, add, info, and calibration.

Each reference is embedded as overlapping segments (IndexBuildConfig.segment_s every
segment_hop_s, the last one aligned to the track's end) so that a short live excerpt can
match any part of a song, plus optionally the whole track. Nothing is written until every
reference has been embedded; then `save_index` replaces the index atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from index_builder.refs import Reference
from index_builder.store import IndexStore, SongEntry, load_index, read_manifest, save_index
from streamer.audio import frames_to_seconds, seconds_to_frames
from streamer.config import IndexBuildConfig
from streamer.decode import load_audio
from streamer.embedder import Embedder

log = logging.getLogger(__name__)

WHOLE_TRACK_MAX_S = 600.0  # longer tracks are embedded whole only up to this length
IMPOSTOR_NEIGHBOURS = 64  # neighbours searched per vector when calibrating


def segment_spans(n_frames: int, segment_frames: int, hop_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame spans of segments covering n_frames; the last ends at n_frames.

    A track shorter than one segment gives the single span (0, n_frames).
    """
    if n_frames <= segment_frames:
        return [(0, n_frames)]
    starts = list(range(0, n_frames - segment_frames + 1, hop_frames))
    if starts[-1] + segment_frames < n_frames:
        starts.append(n_frames - segment_frames)
    return [(s, s + segment_frames) for s in starts]


def embed_reference(embedder: Embedder, frames: np.ndarray, cfg: IndexBuildConfig) -> tuple[np.ndarray, np.ndarray]:
    """(T, F) log-CQT of one reference -> (vectors (S, D), spans (S, 2) in seconds)."""
    spans = segment_spans(len(frames), seconds_to_frames(cfg.segment_s), seconds_to_frames(cfg.segment_hop_s))
    whole_end = min(len(frames), seconds_to_frames(WHOLE_TRACK_MAX_S))
    if cfg.whole_track and (0, whole_end) not in spans:
        spans.append((0, whole_end))
    vectors = np.empty((len(spans), embedder.dim), dtype=np.float32)
    by_length: dict[int, list[int]] = {}
    for i, (start, end) in enumerate(spans):
        by_length.setdefault(end - start, []).append(i)
    for rows in by_length.values():  # equal-length segments go through the encoder together
        for first in range(0, len(rows), cfg.batch_size):
            batch_rows = rows[first : first + cfg.batch_size]
            batch = np.stack([frames[spans[r][0] : spans[r][1]] for r in batch_rows]).astype(np.float32)
            vectors[batch_rows] = embedder.embed(batch)
    seconds = np.array([[frames_to_seconds(a), frames_to_seconds(b)] for a, b in spans], dtype=np.float32)
    return vectors, seconds


def make_faiss_index(index_type: str, dim: int, n_expected: int) -> faiss.Index:
    """An empty inner-product FAISS index of the configured type."""
    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        return faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    if index_type == "ivf":
        n_lists = max(1, int(np.sqrt(max(1, n_expected))))
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n_lists, faiss.METRIC_INNER_PRODUCT)
    raise ValueError(f"unknown index type {index_type!r}")


def embed_references(embedder: Embedder, refs: list[Reference], cfg: IndexBuildConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Embed every reference; an unreadable file aborts with an AudioError naming it."""
    all_vectors, all_spans = [], []
    for ref in tqdm(refs, desc="embedding references", unit="song"):
        frames = embedder.cqt_whole(load_audio(ref.path))
        vectors, spans = embed_reference(embedder, frames, cfg)
        all_vectors.append(vectors)
        all_spans.append(spans)
    return all_vectors, all_spans


def stored_vectors(index: faiss.Index) -> np.ndarray:
    """(V, D) float32 copy of the vectors held by a flat, HNSW or IVF index."""
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


def calibrate(store: IndexStore, cfg: IndexBuildConfig) -> dict:
    """Impostor statistics: for each indexed vector, the best score of any *other* song.

    These are scores between different songs, i.e. what a non-matching query can reach.
    The start threshold is their `impostor_quantile` quantile; the end threshold their
    median halfway to it, so a match ends only when the score has fallen well back.
    """
    if len(store.songs) < 2:
        return {"n_scores": 0, "start_threshold": 0.9, "end_threshold": 0.8, "note": "fewer than 2 songs: default thresholds"}
    scores, ids = store.search(stored_vectors(store.faiss_index), IMPOSTOR_NEIGHBOURS)
    best_other = []
    for row, (s_row, i_row) in enumerate(zip(scores, ids)):
        other = (i_row >= 0) & (store.vector_song[np.clip(i_row, 0, None)] != store.vector_song[row])
        if other.any():
            best_other.append(float(s_row[other].max()))
    impostor = np.asarray(best_other)
    start = float(np.quantile(impostor, cfg.impostor_quantile))
    median = float(np.median(impostor))
    return {
        "n_scores": int(len(impostor)),
        "impostor_median": median,
        "impostor_p99": float(np.quantile(impostor, 0.99)),
        "impostor_max": float(impostor.max()),
        "quantile": cfg.impostor_quantile,
        "start_threshold": start,
        "end_threshold": median + 0.5 * (start - median),
    }


def _assemble(
    embedder: Embedder, songs: list[SongEntry], vectors: list[np.ndarray], spans: list[np.ndarray], cfg: IndexBuildConfig, index_type: str
) -> IndexStore:
    stacked = np.concatenate(vectors).astype(np.float32)
    index = make_faiss_index(index_type, embedder.dim, len(stacked))
    if not index.is_trained:
        index.train(stacked)
    index.add(stacked)
    store = IndexStore(
        faiss_index=index,
        songs=songs,
        vector_song=np.concatenate([np.full(len(v), i, dtype=np.int32) for i, v in enumerate(vectors)]),
        vector_span=np.concatenate(spans),
        model_hash=embedder.info.model_hash,
        settings={"segment_s": cfg.segment_s, "segment_hop_s": cfg.segment_hop_s, "whole_track": cfg.whole_track, "index_type": index_type},
        calibration={},
    )
    store.calibration = calibrate(store, cfg)
    return store


def build_index(refs: list[Reference], index_dir: Path, embedder: Embedder, cfg: IndexBuildConfig) -> IndexStore:
    """Embed `refs` and write a new index at index_dir (replacing any index there)."""
    vectors, spans = embed_references(embedder, refs, cfg)
    songs = [SongEntry(r.song_id, r.title, str(r.path), dict(r.metadata)) for r in refs]
    store = _assemble(embedder, songs, vectors, spans, cfg, cfg.index_type)
    save_index(index_dir, store, embedder.info)
    log.info("built index %s: %d songs, %d vectors", index_dir, len(songs), store.n_vectors)
    return store


def add_to_index(index_dir: Path, refs: list[Reference], embedder: Embedder, cfg: IndexBuildConfig) -> IndexStore:
    """Append new references to an existing index without re-embedding the old ones."""
    store = load_index(index_dir, expected_model_hash=embedder.info.model_hash)
    known = {s.song_id for s in store.songs}
    clashes = sorted(r.song_id for r in refs if r.song_id in known)
    if clashes:
        raise ValueError(f"{index_dir}: song_id(s) already in the index: {', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}")
    vectors, spans = embed_references(embedder, refs, cfg)
    first_song = len(store.songs)
    new_rows = np.concatenate([np.full(len(v), first_song + i, dtype=np.int32) for i, v in enumerate(vectors)])
    store.faiss_index.add(np.concatenate(vectors).astype(np.float32))
    store.songs.extend(SongEntry(r.song_id, r.title, str(r.path), dict(r.metadata)) for r in refs)
    store.vector_song = np.concatenate([store.vector_song, new_rows])
    store.vector_span = np.concatenate([store.vector_span, *spans])
    store.calibration = calibrate(store, cfg)
    save_index(index_dir, store, embedder.info)
    log.info("added %d songs to %s: now %d songs, %d vectors", len(refs), index_dir, len(store.songs), store.n_vectors)
    return store


def index_info(index_dir: Path) -> dict:
    """Summary of an index (verifies the FAISS file against the manifest)."""
    manifest = read_manifest(index_dir)
    store = load_index(index_dir)
    return {
        "index_dir": str(index_dir),
        "songs": len(store.songs),
        "vectors": store.n_vectors,
        "model_hash": store.model_hash,
        "settings": store.settings,
        "calibration": store.calibration,
        "faiss_file": manifest["faiss_file"],
        "faiss_sha256": manifest["faiss_sha256"],
    }
