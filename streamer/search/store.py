"""On-disk index: a FAISS inner-product index, a binary vector table and a JSON manifest,
written atomically.

    INDEX_DIR/manifest.json           format, model hash and front end, build settings,
                                      songs, calibration, names and sha256s of the two files
    INDEX_DIR/vectors-<sha12>.faiss   the FAISS index (vector id = row of the vector table)
    INDEX_DIR/table-<sha12>.npy       vector -> (song row, segment start, end in seconds):
                                      a structured .npy (`VECTOR_TABLE_DTYPE`, no pickle),
                                      12 bytes a vector, so a 1M-song catalog's ~20M
                                      segments stay a 240 MB file, not gigabytes of JSON
    INDEX_DIR/chroma-<sha12>.npy      every song's chroma sequence (streamer/decide/alignment.py),
                                      uint8 (steps, 12) codes one song after another
                                      (`encode_chroma`); the manifest's `chroma_offsets` say
                                      where each song starts. ~57 bytes a second of audio:
                                      14 kB a 4-min song, 13 GiB for 1M songs, memory-mapped
                                      (only the candidates' rows are read)
    INDEX_DIR/codes-<sha12>.npy       two_stage only (streamer/search/two_stage.py): (V, D)
                                      uint8 segment residual codes; the FAISS file then holds
                                      the song-level graph, and the manifest's `two_stage`
                                      entry the codes' quantiser

A write puts each new data file under a temporary name, fsyncs it and renames it to its
content-addressed name, then writes manifest.json the same way (temporary file, fsync,
rename, fsync of the folder), and only then removes the old data files. Whenever the
process dies, the manifest on disk names complete files, so a crash never leaves an index
that loads half-written. A damaged file is refused: the data files by the sha256s the
manifest records, the manifest by `manifest_sha256`, a sha256 over its own canonical JSON
(every other field), so a flipped digit in a calibration or a song title is caught too.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from coverwatch.streamer.embed.artifacts import ArtifactError, ModelInfo, atomic_write, canonical_sha256, fsync_dir, read_json_file, sha256_file
from coverwatch.streamer.search.two_stage import ResidualQuantizer, TwoStageIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 1: vector table inside the JSON manifest (could not hold a large catalog); 2: no chroma
READABLE_FORMATS = (3, 4)  # 3: float16 chroma (twice the bytes of 4's codes), still read as it is
CHROMA_LEVELS = 255  # uint8 chroma codes
MANIFEST = "manifest.json"
VECTOR_TABLE_DTYPE = np.dtype([("song", "<i4"), ("start", "<f4"), ("end", "<f4")])


@dataclass
class SongEntry:
    song_id: str
    title: str
    source: str  # the reference audio path it was built from
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class IndexStore:
    """A loaded index: FAISS + the vector and song tables."""

    faiss_index: faiss.Index | TwoStageIndex  # what `search` asks; vector id = row of the vector table
    songs: list[SongEntry]
    vector_song: np.ndarray  # (V,) int32 row in `songs` per vector
    vector_span: np.ndarray  # (V, 2) float32 segment start/end in seconds
    model_hash: str
    settings: dict  # build settings (segment length, index type, ...)
    calibration: dict  # impostor statistics and thresholds
    chroma: np.ndarray  # (steps of all songs, 12) uint8 codes (`encode_chroma`; float16 in format 3)
    chroma_offsets: np.ndarray  # (songs + 1,) int64: song row r's chroma is chroma[offsets[r]:offsets[r + 1]]
    manifest_sha256: str = ""  # of the manifest it was loaded from ("" before the first save)

    def song_chroma(self, row: int) -> np.ndarray:
        """(S, 12) float32 chroma of song `row` (streamer/decide/alignment.py)."""
        return decode_chroma(self.chroma[self.chroma_offsets[row] : self.chroma_offsets[row + 1]])

    def song_rows(self) -> dict[str, int]:
        """song_id -> row in `songs`."""
        return {song.song_id: row for row, song in enumerate(self.songs)}

    @property
    def n_vectors(self) -> int:
        return int(self.faiss_index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 unit vectors -> (scores (Q, k), vector ids (Q, k)); -1 ids pad short results."""
        assert queries.ndim == 2 and queries.dtype == np.float32
        return self.faiss_index.search(np.ascontiguousarray(queries), min(k, max(1, self.n_vectors)))

    def best_per_song(self, queries: np.ndarray, k: int) -> dict[int, float]:
        """(Q, D) queries -> {song row: best score over all queries and that song's retrieved vectors}."""
        return self.best_per_song_grouped(queries, np.zeros(len(queries), dtype=np.int64), 1, k)[0]

    def best_per_song_grouped(self, queries: np.ndarray, group: np.ndarray, n_groups: int, k: int) -> list[dict[int, float]]:
        """One FAISS search for (Q, D) queries; query q belongs to group[q] in [0, n_groups).

        Returns per group {song row: best score over the group's queries and retrieved vectors}.
        """
        return best_per_song_of(*self.search_songs(queries, k), group, n_groups)

    def search_songs(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 unit vectors -> (scores (Q, k') float32, the hits' song rows (Q, k') int32,
        -1 = no hit); k' = 0 for an empty index."""
        if len(queries) == 0 or self.n_vectors == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int32)
        scores, ids = self.search(queries, k)
        return scores.astype(np.float32), np.where(ids >= 0, self.vector_song[np.clip(ids, 0, None)], -1).astype(np.int32)


def best_per_song_of(scores: np.ndarray, songs: np.ndarray, group: np.ndarray, n_groups: int) -> list[dict[int, float]]:
    """(Q, k) hit scores and their song rows (-1 = no hit), query q in group[q] -> per group
    {song row: best score over the group's hits}."""
    best: list[dict[int, float]] = [{} for _ in range(n_groups)]
    for g, score_row, song_row in zip(group, scores.tolist(), songs.tolist()):
        found = best[g]
        for score, song in zip(score_row, song_row):
            if song >= 0 and score > found.get(song, -np.inf):
                found[song] = score
    return best


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes of `array` as an .npy file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def vector_table_bytes(vector_song: np.ndarray, vector_span: np.ndarray) -> bytes:
    """(V,) song rows and (V, 2) spans -> the bytes of a `VECTOR_TABLE_DTYPE` .npy file."""
    table = np.empty(len(vector_song), dtype=VECTOR_TABLE_DTYPE)
    table["song"] = vector_song
    table["start"], table["end"] = vector_span[:, 0], vector_span[:, 1]
    return npy_bytes(table)


def encode_chroma(steps: np.ndarray) -> np.ndarray:
    """(S, 12) chroma of one song -> (S, 12) uint8 codes of sqrt(chroma / the song's maximum).

    The alignment check compares directions of stacked steps (cosine), so the song's level
    does not matter; the square root spends more codes on the quiet pitch classes, which lie
    up to two orders of magnitude below a step's loudest (linear codes measured as well).
    On real plays against float32 chroma, alignment scores move by 0.0013 on average (p99
    0.03), the true-vs-impostor AUC stays 0.903, and the 54 events of four simulated
    broadcast streams are the same (bench/RESULTS.md, "Reference chroma"); 4-bit codes move
    scores ten times more.
    """
    top = float(steps.max()) if len(steps) else 0.0
    unit = np.clip(steps / top, 0.0, 1.0) if top > 0 else np.zeros_like(steps)
    return np.rint(np.sqrt(unit) * CHROMA_LEVELS).astype(np.uint8)


def decode_chroma(codes: np.ndarray) -> np.ndarray:
    """(S, 12) uint8 codes (or format 3's float16 rows) -> (S, 12) float32 chroma, maximum ~1.

    encode_chroma(decode_chroma(c)) == c: a song copied into a grown index keeps its codes."""
    if codes.dtype == np.float16:
        return codes.astype(np.float32)
    unit = codes.astype(np.float32) / CHROMA_LEVELS
    return unit * unit


def pack_chroma(per_song: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-song (S_i, 12) chroma -> (all steps, 12) uint8 codes (`encode_chroma`) and
    (songs + 1,) int64 offsets."""
    coded = [encode_chroma(np.asarray(c, dtype=np.float32).reshape(-1, 12)) for c in per_song]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in coded])]).astype(np.int64)
    packed = np.concatenate(coded) if coded else np.zeros((0, 12), np.uint8)
    return packed, offsets


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to exactly `path`, streamed (the codes run to GBs: `npy_bytes` would hold them twice).
    Through a handle, since np.save given a name appends ".npy" to the temporary name."""
    with path.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _write_content_addressed(index_dir: Path, prefix: str, suffix: str, write: Callable[[Path], None]) -> tuple[str, str]:
    """Write a file through `write(tmp_path)`, fsync it and rename it to prefix-<sha12>suffix.

    Returns (name, sha256). The name may be the live file's (same content): the new file
    is never written in place, only renamed over it."""
    tmp = index_dir / f"{prefix}-new{suffix}.tmp"
    write(tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    name = f"{prefix}-{digest[:12]}{suffix}"
    tmp.replace(index_dir / name)
    return name, digest


def save_index(index_dir: Path, store: IndexStore, model: ModelInfo) -> None:
    """Write `store` into index_dir atomically (see module docstring)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    # FAISS writes straight to the file: a large index is never held twice in memory.
    two_stage = store.faiss_index if isinstance(store.faiss_index, TwoStageIndex) else None
    graph = two_stage.song_index if two_stage else store.faiss_index  # two_stage: FAISS holds the song graph
    faiss_name, faiss_digest = _write_content_addressed(index_dir, "vectors", ".faiss", lambda p: faiss.write_index(graph, str(p)))
    live = {faiss_name}
    extra = {}
    if two_stage:
        codes_name, codes_digest = _write_content_addressed(index_dir, "codes", ".npy", lambda p: _save_npy(p, np.asarray(two_stage.codes)))
        live.add(codes_name)
        extra["two_stage"] = {"codes_file": codes_name, "codes_sha256": codes_digest, "quantizer": two_stage.quantizer.to_dict()}
    table = vector_table_bytes(store.vector_song, store.vector_span)
    table_name, table_digest = _write_content_addressed(index_dir, "table", ".npy", lambda p: p.write_bytes(table))
    if store.chroma.dtype != np.uint8:  # a format-3 index being rewritten (index add / remove / calibrate)
        store.chroma = np.concatenate([encode_chroma(store.song_chroma(row)) for row in range(len(store.songs))] or [np.zeros((0, 12), np.uint8)])
    chroma_name, chroma_digest = _write_content_addressed(index_dir, "chroma", ".npy", lambda p: _save_npy(p, np.ascontiguousarray(store.chroma)))
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_hash": store.model_hash,
        "model": {k: v for k, v in model.to_dict().items() if k not in ("dims", "sidecar_sha256")},
        "settings": store.settings,
        "calibration": store.calibration,
        "faiss_file": faiss_name,
        "faiss_sha256": faiss_digest,
        "table_file": table_name,
        "table_sha256": table_digest,
        "chroma_file": chroma_name,
        "chroma_sha256": chroma_digest,
        "chroma_offsets": store.chroma_offsets.tolist(),
        "n_vectors": int(store.n_vectors),
        "songs": [vars(s) for s in store.songs],
        **extra,
    }
    manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")
    atomic_write(index_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_dir(index_dir)
    live |= {table_name, chroma_name}
    for stale in [
        *index_dir.glob("vectors-*.faiss"),
        *index_dir.glob("table-*.npy"),
        *index_dir.glob("chroma-*.npy"),
        *index_dir.glob("codes-*.npy"),
    ]:  # only now unreferenced
        if stale.name not in live:
            stale.unlink(missing_ok=True)
    for leftover in index_dir.glob("*.tmp"):  # from a write that was killed half-way
        leftover.unlink(missing_ok=True)


def read_manifest(index_dir: Path) -> dict:
    path = index_dir / MANIFEST
    manifest = read_json_file(path, f"index manifest not found (is {index_dir} an index built by `coverwatch index build`?)", "corrupt index manifest")
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMATS:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{path}: unsupported index format {found!r} (this coverwatch reads format_version {' and '.join(map(str, READABLE_FORMATS))}); "
            "rebuild the index with `coverwatch index build`"
        )
    recorded = manifest.get("manifest_sha256")
    if recorded is None or recorded != canonical_sha256(manifest, "manifest_sha256"):
        raise ArtifactError(f"{path}: manifest_sha256 does not match its content (manifest altered or damaged); rebuild the index")
    return manifest


def read_vector_table(path: Path) -> np.ndarray:
    """A vector table .npy (sha256 already checked) -> (V,) `VECTOR_TABLE_DTYPE` array."""
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: not a readable vector table ({exc})") from None
    if table.dtype != VECTOR_TABLE_DTYPE or table.ndim != 1:
        raise ArtifactError(f"{path}: vector table has dtype {table.dtype} and shape {table.shape}, expected ({VECTOR_TABLE_DTYPE}) rows")
    return table


def read_chroma(path: Path, format_version: int, mmap: bool) -> np.ndarray:
    """A chroma .npy (sha256 already checked) -> (steps, 12) uint8 codes (float16 in format 3),
    memory-mapped read-only with `mmap`."""
    try:
        chroma = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: not a readable chroma file ({exc})") from None
    expected = np.float16 if format_version == 3 else np.uint8
    if chroma.dtype != expected or chroma.ndim != 2 or chroma.shape[1] != 12:
        raise ArtifactError(f"{path}: chroma has dtype {chroma.dtype} and shape {chroma.shape}, expected {np.dtype(expected)} (steps, 12)")
    return chroma


def load_index(index_dir: Path, expected_model_hash: str | None = None, mmap: bool = True) -> IndexStore:
    """Load and verify an index; with expected_model_hash, refuse one built by another model.

    mmap: map IVF lists, two_stage codes and chroma read-only instead of reading them (searching
    only); pass False to add vectors.
    """
    manifest = read_manifest(index_dir)
    try:
        model_hash = manifest["model_hash"]
        faiss_path = index_dir / manifest["faiss_file"]
        songs = [SongEntry(**s) for s in manifest["songs"]]
        digest = manifest["faiss_sha256"]
        table_path, table_digest = index_dir / manifest["table_file"], manifest["table_sha256"]
        n_vectors = int(manifest["n_vectors"])
        chroma_path, chroma_digest = index_dir / manifest["chroma_file"], manifest["chroma_sha256"]
        chroma_offsets = np.asarray(manifest["chroma_offsets"], dtype=np.int64)
        two_stage = manifest.get("two_stage")
        data_files = [(faiss_path, digest), (table_path, table_digest), (chroma_path, chroma_digest)]
        if two_stage is not None:
            codes_path = index_dir / two_stage["codes_file"]
            data_files.append((codes_path, two_stage["codes_sha256"]))
            quantizer = ResidualQuantizer.from_dict(two_stage["quantizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{index_dir / MANIFEST}: index manifest is missing or has malformed fields ({exc})") from None
    if expected_model_hash is not None and model_hash != expected_model_hash:
        raise ArtifactError(
            f"{index_dir}: index was built with model {model_hash}, but the loaded model is {expected_model_hash}; "
            "rebuild the index with this model (`coverwatch index build`)"
        )
    for data_path, data_digest in data_files:
        if not data_path.is_file():
            raise ArtifactError(f"{data_path}: file named by the manifest is missing")
        if sha256_file(data_path) != data_digest:
            raise ArtifactError(f"{data_path}: sha256 does not match the manifest (file truncated or altered)")
    table = read_vector_table(table_path)
    if len(table) != n_vectors:
        raise ArtifactError(f"{table_path}: {len(table)} rows but the manifest counts {n_vectors} vectors")
    try:
        # mapped IVF lists load page by page as searched (a 1M-song IVF-SQ8 is a 5 GB file); other types are read whole
        index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as exc:
        raise ArtifactError(f"{faiss_path}: FAISS cannot read the index ({exc})") from None
    song_rows = table["song"].astype(np.int32)
    if two_stage is not None:
        index = _two_stage_index(index_dir, index, codes_path, quantizer, song_rows, len(songs), manifest.get("settings", {}), mmap)
    if index.ntotal != n_vectors:
        raise ArtifactError(f"{index_dir}: FAISS holds {index.ntotal} vectors but the manifest counts {n_vectors}")
    recorded_dim = manifest.get("model", {}).get("embedding_dim", index.d)
    if index.d != recorded_dim:
        raise ArtifactError(f"{index_dir}: FAISS vectors have {index.d} dims but the manifest's model has {recorded_dim}")
    chroma = read_chroma(chroma_path, manifest["format_version"], mmap)
    if (
        chroma_offsets.shape != (len(songs) + 1,)
        or chroma_offsets[0] != 0
        or chroma_offsets[-1] != len(chroma)
        or np.any(np.diff(chroma_offsets) < 0)
    ):
        raise ArtifactError(f"{index_dir / MANIFEST}: chroma_offsets do not describe {len(songs)} songs in {len(chroma)} chroma rows")
    if len(song_rows) and (song_rows.min() < 0 or song_rows.max() >= len(songs)):
        raise ArtifactError(f"{index_dir / MANIFEST}: a vector points to a song that is not listed")
    return IndexStore(
        index,
        songs,
        song_rows,
        np.stack([table["start"], table["end"]], axis=1).astype(np.float32),
        model_hash,
        manifest.get("settings", {}),
        manifest.get("calibration", {}),
        chroma,
        chroma_offsets,
        manifest["manifest_sha256"],
    )


def _two_stage_index(
    index_dir: Path, graph: faiss.Index, codes_path: Path, quantizer: ResidualQuantizer, song_rows: np.ndarray,
    n_songs: int, settings: dict, mmap: bool,
) -> TwoStageIndex:
    """The two_stage index of a manifest: its song graph (the FAISS file) and segment codes."""
    if graph.ntotal != n_songs:
        raise ArtifactError(f"{index_dir}: the song graph holds {graph.ntotal} songs but the manifest lists {n_songs}")
    try:
        codes = np.load(codes_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{codes_path}: not a readable codes file ({exc})") from None
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != graph.d or quantizer.low.shape != (graph.d,):
        raise ArtifactError(f"{codes_path}: codes have dtype {codes.dtype} and shape {codes.shape}, expected uint8 (vectors, {graph.d})")
    try:
        return TwoStageIndex(graph, codes, quantizer, song_rows, int(settings.get("index", {}).get("candidates", 0)) or 1)
    except ValueError as exc:
        raise ArtifactError(f"{index_dir}: {exc}") from None
