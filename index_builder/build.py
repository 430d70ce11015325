"""Reference catalog -> FAISS inner-product index: build, add, info (calibration: calibrate.py).

Each reference is embedded as overlapping segments (IndexBuildConfig.segment_s every
segment_hop_s, the last one aligned to the track's end) so that a short live excerpt can
match any part of a song, plus optionally the whole track. Nothing is written until every
reference has been embedded; then `save_index` replaces the index atomically. Each
reference's chroma sequence (streamer/decide/alignment.py) is kept beside its vectors for the
daemon's alignment check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coverwatch.index_builder.calibrate import impostor_calibration, recalibrate_if_needed
from coverwatch.index_builder.refs import Reference
from coverwatch.streamer.config import IndexBuildConfig, StreamConfig
from coverwatch.streamer.decide.alignment import chroma
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import frames_to_seconds, seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.index_types import build_faiss_index, spec_for
from coverwatch.streamer.search.segments import WHOLE_TRACK_MAX_S, segment_spans
from coverwatch.streamer.search.store import IndexStore, SongEntry, load_index, pack_chroma, read_manifest, save_index

log = logging.getLogger(__name__)

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


def embed_references(
    embedder: Embedder, refs: list[Reference], cfg: IndexBuildConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Embed every reference -> per reference (vectors, spans, chroma); an unreadable file
    aborts with an AudioError naming it."""
    all_vectors, all_spans, all_chroma = [], [], []
    for ref in tqdm(refs, desc="embedding references", unit="song"):
        frames = embedder.cqt_whole(load_audio(ref.path))
        vectors, spans = embed_reference(embedder, frames, cfg)
        all_vectors.append(vectors)
        all_spans.append(spans)
        all_chroma.append(chroma(frames))
    return all_vectors, all_spans, all_chroma


def _assemble(
    embedder: Embedder,
    songs: list[SongEntry],
    embedded: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
    cfg: IndexBuildConfig,
    stream: StreamConfig | None,
) -> IndexStore:
    vectors, spans, chromas = embedded
    stacked = np.concatenate(vectors).astype(np.float32)
    chroma_rows, chroma_offsets = pack_chroma(chromas)
    spec = spec_for(cfg.index_type, embedder.dim, len(stacked))
    index = build_faiss_index(spec, stacked)
    store = IndexStore(
        faiss_index=index,
        songs=songs,
        vector_song=np.concatenate([np.full(len(v), i, dtype=np.int32) for i, v in enumerate(vectors)]),
        vector_span=np.concatenate(spans),
        model_hash=embedder.info.model_hash,
        settings={
            "segment_s": cfg.segment_s,
            "segment_hop_s": cfg.segment_hop_s,
            "whole_track": cfg.whole_track,
            "index_type": spec.index_type,
            "index": spec.to_settings(),
        },
        calibration={},
        chroma=chroma_rows,
        chroma_offsets=chroma_offsets,
    )
    store.calibration = impostor_calibration(store, cfg, stream)
    return store


def build_index(
    refs: list[Reference], index_dir: Path, embedder: Embedder, cfg: IndexBuildConfig, stream: StreamConfig | None = None
) -> IndexStore:
    """Embed `refs` and write a new index at index_dir (replacing any index there); the
    impostor calibration scores as a daemon with `stream`'s settings would."""
    embedded = embed_references(embedder, refs, cfg)
    songs = [SongEntry(r.song_id, r.title, str(r.path), dict(r.metadata)) for r in refs]
    store = _assemble(embedder, songs, embedded, cfg, stream)
    save_index(index_dir, store, embedder.info)
    log.info("built index %s: %d songs, %d vectors", index_dir, len(songs), store.n_vectors)
    return store


def add_to_index(
    index_dir: Path, refs: list[Reference], embedder: Embedder, cfg: IndexBuildConfig, stream: StreamConfig | None = None
) -> IndexStore:
    """Append new references to an existing index without re-embedding the old ones."""
    store = load_index(index_dir, expected_model_hash=embedder.info.model_hash, mmap=False)  # mapped IVF lists are read-only
    known = {s.song_id for s in store.songs}
    clashes = sorted(r.song_id for r in refs if r.song_id in known)
    if clashes:
        raise ValueError(f"{index_dir}: song_id(s) already in the index: {', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}")
    vectors, spans, chromas = embed_references(embedder, refs, cfg)
    first_song = len(store.songs)
    new_rows = np.concatenate([np.full(len(v), first_song + i, dtype=np.int32) for i, v in enumerate(vectors)])
    store.faiss_index.add(np.concatenate(vectors).astype(np.float32))
    store.songs.extend(SongEntry(r.song_id, r.title, str(r.path), dict(r.metadata)) for r in refs)
    store.vector_song = np.concatenate([store.vector_song, new_rows])
    store.vector_span = np.concatenate([store.vector_span, *spans])
    old_chroma = [store.song_chroma(row) for row in range(first_song)]  # float16 -> float32 -> float16 is exact
    store.chroma, store.chroma_offsets = pack_chroma(old_chroma + chromas)
    store.calibration = {**store.calibration, **impostor_calibration(store, cfg, stream)}  # a stream calibration stays
    save_index(index_dir, store, embedder.info)
    store.calibration = recalibrate_if_needed(index_dir, store, embedder, cfg)
    log.info("added %d songs to %s: now %d songs, %d vectors", len(refs), index_dir, len(store.songs), store.n_vectors)
    return store


def index_info(index_dir: Path) -> dict:
    """Summary of an index (verifies its data files against the manifest)."""
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
        "table_file": manifest["table_file"],
        "table_sha256": manifest["table_sha256"],
    }
