"""Reference catalog -> FAISS inner-product index: build, add, info (calibration: calibrate.py).

Each reference is embedded as overlapping segments (IndexBuildConfig.segment_s every
segment_hop_s, the last one aligned to the track's end) so that a short live excerpt can
match any part of a song, plus optionally the whole track. Nothing is written until every
reference has been embedded; then `save_index` replaces the index atomically. `build`
refuses a folder that holds an index unless forced; `add` (with `replace`: upsert) and
`remove` change an index in place, reusing the stored vectors of the songs they keep. Each
reference's chroma sequence (streamer/decide/alignment.py) is kept beside its vectors for the
daemon's alignment check.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coverwatch.index_builder.calibrate import impostor_calibration, recalibrate_if_needed, stored_vectors
from coverwatch.index_builder.refs import Reference
from coverwatch.streamer.config import DecisionConfig, IndexBuildConfig, StreamConfig
from coverwatch.streamer.decide.alignment import chroma
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import AudioError, frames_to_seconds, seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.index_types import build_catalog_index, spec_for
from coverwatch.streamer.search.segments import WHOLE_TRACK_MAX_S, segment_spans
from coverwatch.streamer.service.pipeline import resolve_thresholds
from coverwatch.streamer.search.store import MANIFEST, IndexStore, SongEntry, load_index, pack_chroma, read_manifest, save_index
from coverwatch.streamer.search.two_stage import TwoStageIndex

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


class IndexExistsError(ValueError):
    """`index build --out DIR` where DIR already holds an index or other files (no --force)."""


@dataclass(frozen=True)
class Skipped:
    """A reference left out of the index: which, and why."""

    song_id: str
    path: str
    error: str


@dataclass
class Embedded:
    """Per embedded reference: its (S, D) vectors, (S, 2) spans in s and (steps, 12) chroma."""

    refs: list[Reference] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    spans: list[np.ndarray] = field(default_factory=list)
    chroma: list[np.ndarray] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def embed_references(embedder: Embedder, refs: list[Reference], cfg: IndexBuildConfig, skip_errors: bool = False) -> Embedded:
    """Embed every reference. A file that cannot be decoded is skipped with a warning when
    `skip_errors`; otherwise every such file is named in one AudioError at the end (after
    the others were tried, so that one run lists them all) and nothing is returned."""
    out = Embedded()
    for ref in tqdm(refs, desc="embedding references", unit="song"):
        try:
            frames = embedder.cqt_whole(load_audio(ref.path))
        except AudioError as exc:
            log.warning("%s (song_id %s): %s", "skipped" if skip_errors else "cannot use", ref.song_id, exc)
            out.skipped.append(Skipped(ref.song_id, str(ref.path), str(exc)))
            continue
        vectors, spans = embed_reference(embedder, frames, cfg)
        out.refs.append(ref)
        out.vectors.append(vectors)
        out.spans.append(spans)
        out.chroma.append(chroma(frames))
    if out.skipped and not skip_errors:
        listed = "; ".join(s.error for s in out.skipped[:3]) + (f"; and {len(out.skipped) - 3} more" if len(out.skipped) > 3 else "")
        raise AudioError(f"{len(out.skipped)} of {len(refs)} reference(s) cannot be decoded, nothing written: {listed} (fix them, or pass --skip-errors to index the rest)")
    if not out.refs:
        raise AudioError(f"none of the {len(refs)} reference(s) could be decoded; nothing written")
    return out


def _assemble(
    embedder: Embedder,
    songs: list[SongEntry],
    embedded: Embedded,
    cfg: IndexBuildConfig,
    stream: StreamConfig | None,
) -> IndexStore:
    stacked = np.concatenate(embedded.vectors).astype(np.float32)
    chroma_rows, chroma_offsets = pack_chroma(embedded.chroma)
    spec = spec_for(cfg.index_type, embedder.dim, len(stacked))
    vector_song = np.concatenate([np.full(len(v), i, dtype=np.int32) for i, v in enumerate(embedded.vectors)])
    store = IndexStore(
        faiss_index=build_catalog_index(spec, stacked, vector_song, len(songs)),
        songs=songs,
        vector_song=vector_song,
        vector_span=np.concatenate(embedded.spans),
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


def _song_entry(ref: Reference) -> SongEntry:
    return SongEntry(ref.song_id, ref.title, str(ref.path), dict(ref.metadata))


def refuse_existing(index_dir: Path) -> None:
    """Raise IndexExistsError if index_dir holds an index or anything else."""
    if index_dir.is_file():
        raise IndexExistsError(f"{index_dir} is a file, not an index folder")
    if (index_dir / MANIFEST).exists():
        songs = len(read_manifest(index_dir).get("songs", []))
        raise IndexExistsError(
            f"{index_dir} already holds an index ({songs} songs): pass --force to replace it, "
            f"or change it with `coverwatch index add|remove {index_dir}`"
        )
    if index_dir.is_dir() and any(index_dir.iterdir()):
        raise IndexExistsError(f"{index_dir} is not empty and holds no index: choose an empty or new folder, or pass --force")


def build_index(
    refs: list[Reference],
    index_dir: Path,
    embedder: Embedder,
    cfg: IndexBuildConfig,
    stream: StreamConfig | None = None,
    force: bool = False,
    skip_errors: bool = False,
) -> tuple[IndexStore, list[Skipped]]:
    """Embed `refs` and write a new index at index_dir; an existing one is replaced only
    with `force` (checked before the embedding work). The impostor calibration scores as a
    daemon with `stream`'s settings would. Returns the store and the references skipped."""
    if not force:
        refuse_existing(index_dir)
    embedded = embed_references(embedder, refs, cfg, skip_errors)
    store = _assemble(embedder, [_song_entry(r) for r in embedded.refs], embedded, cfg, stream)
    save_index(index_dir, store, embedder.info)
    log.info("built index %s: %d songs, %d vectors, %d skipped", index_dir, len(store.songs), store.n_vectors, len(embedded.skipped))
    return store, embedded.skipped


def _stored_songs(store: IndexStore, rows: list[int]) -> Embedded:
    """The stored vectors, spans and chroma of song `rows`, as if just embedded."""
    vectors = stored_vectors(store.faiss_index)
    kept = Embedded()
    for row in rows:
        mine = store.vector_song == row
        kept.vectors.append(vectors[mine])
        kept.spans.append(store.vector_span[mine])
        kept.chroma.append(store.song_chroma(row))  # codes -> float32 -> codes is exact (decode_chroma)
    return kept


def _rebuilt(store: IndexStore, keep_rows: list[int], added: Embedded, added_songs: list[SongEntry], embedder: Embedder,
             cfg: IndexBuildConfig, stream: StreamConfig | None) -> IndexStore:
    """A new store of the kept songs (stored vectors, not re-embedded) then the added ones,
    with the index's own FAISS type, sized again; a stream calibration is kept (callers
    re-run it when the catalog moved enough)."""
    kept = _stored_songs(store, keep_rows)
    both = Embedded(vectors=kept.vectors + added.vectors, spans=kept.spans + added.spans, chroma=kept.chroma + added.chroma)
    songs = [store.songs[r] for r in keep_rows] + added_songs
    same_type = dataclasses.replace(cfg, index_type=store.settings.get("index_type", cfg.index_type))
    rebuilt = _assemble(embedder, songs, both, same_type, stream)
    rebuilt.settings = {**rebuilt.settings, **{k: store.settings[k] for k in ("segment_s", "segment_hop_s", "whole_track") if k in store.settings}}
    rebuilt.calibration = {**store.calibration, **rebuilt.calibration}
    return rebuilt


def _id_list(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")


def add_to_index(
    index_dir: Path,
    refs: list[Reference],
    embedder: Embedder,
    cfg: IndexBuildConfig,
    stream: StreamConfig | None = None,
    replace: bool = False,
    skip_errors: bool = False,
) -> tuple[IndexStore, list[Skipped]]:
    """Add new references to an existing index without re-embedding the old ones; with
    `replace`, a reference whose song_id is already indexed replaces that song (upsert)."""
    store = load_index(index_dir, expected_model_hash=embedder.info.model_hash, mmap=False)  # mapped IVF lists are read-only
    rows = store.song_rows()
    clashes = sorted(r.song_id for r in refs if r.song_id in rows)
    if clashes and not replace:
        raise ValueError(f"{index_dir}: song_id(s) already in the index: {_id_list(clashes)} (pass --replace to update them)")
    embedded = embed_references(embedder, refs, cfg, skip_errors)
    new_songs = [_song_entry(r) for r in embedded.refs]
    replaced = {rows[r.song_id] for r in embedded.refs if r.song_id in rows}  # a skipped file leaves its old version in place
    if replaced:
        store = _rebuilt(store, [r for r in range(len(store.songs)) if r not in replaced], embedded, new_songs, embedder, cfg, stream)
    else:
        first_song = len(store.songs)
        new_rows = np.concatenate([np.full(len(v), first_song + i, dtype=np.int32) for i, v in enumerate(embedded.vectors)])
        added = np.concatenate(embedded.vectors).astype(np.float32)
        if isinstance(store.faiss_index, TwoStageIndex):
            store.faiss_index.add_songs(added, new_rows)
        else:
            store.faiss_index.add(added)
        store.songs.extend(new_songs)
        store.vector_song = np.concatenate([store.vector_song, new_rows])
        store.vector_span = np.concatenate([store.vector_span, *embedded.spans])
        old_chroma = [store.song_chroma(row) for row in range(first_song)]  # codes -> float32 -> codes is exact (decode_chroma)
        store.chroma, store.chroma_offsets = pack_chroma(old_chroma + embedded.chroma)
        store.calibration = {**store.calibration, **impostor_calibration(store, cfg, stream)}  # a stream calibration stays
    save_index(index_dir, store, embedder.info)
    store.calibration = recalibrate_if_needed(index_dir, store, embedder, cfg)
    log.info("%s: added %d, replaced %d songs: now %d songs, %d vectors", index_dir, len(new_songs) - len(replaced), len(replaced), len(store.songs), store.n_vectors)
    return store, embedded.skipped


def remove_from_index(
    index_dir: Path, song_ids: list[str], embedder: Embedder, cfg: IndexBuildConfig, stream: StreamConfig | None = None
) -> IndexStore:
    """Drop songs from an index (the others keep their stored vectors; nothing is re-embedded)."""
    store = load_index(index_dir, expected_model_hash=embedder.info.model_hash, mmap=False)
    rows = store.song_rows()
    unknown = sorted({s for s in song_ids if s not in rows})
    if unknown:
        raise ValueError(f"{index_dir}: no such song_id(s) in the index: {_id_list(unknown)} (nothing removed)")
    drop = {rows[s] for s in song_ids}
    if len(drop) == len(store.songs):
        raise ValueError(f"{index_dir}: removing all {len(drop)} songs would leave an empty index; build a new one instead")
    store = _rebuilt(store, [r for r in range(len(store.songs)) if r not in drop], Embedded(), [], embedder, cfg, stream)
    save_index(index_dir, store, embedder.info)
    store.calibration = recalibrate_if_needed(index_dir, store, embedder, cfg)
    log.info("%s: removed %d songs: now %d songs, %d vectors", index_dir, len(drop), len(store.songs), store.n_vectors)
    return store


def index_info(index_dir: Path) -> dict:
    """Summary of an index (verifies its data files against the manifest)."""
    manifest = read_manifest(index_dir)
    store = load_index(index_dir)
    thresholds = resolve_thresholds(DecisionConfig(), store.calibration)
    stream = store.calibration.get("stream")
    how = (
        f"stream calibration on {stream['audio_s']:.0f} s of non-catalog audio, for {stream.get('target_false_alarms_per_day', '?')} false alarms/day"
        if stream
        else thresholds.detail or "impostor scores"
    )
    return {
        "index_dir": str(index_dir),
        "songs": len(store.songs),
        "vectors": store.n_vectors,
        "model_hash": store.model_hash,
        "thresholds": {"start": round(thresholds.start, 4), "end": round(thresholds.end, 4), "set_by": how},
        "settings": store.settings,
        "calibration": store.calibration,
        "faiss_file": manifest["faiss_file"],
        "faiss_sha256": manifest["faiss_sha256"],
        "table_file": manifest["table_file"],
        "table_sha256": manifest["table_sha256"],
    }
