"""On-disk index: a FAISS inner-product index plus a JSON manifest, written atomically.

    INDEX_DIR/manifest.json           format, model hash and front end, build settings,
                                      songs, vector -> (song, segment start/end), calibration,
                                      name and sha256 of the FAISS file
    INDEX_DIR/vectors-<sha12>.faiss   the FAISS index (vector id = row in manifest["vectors"])

A write puts the new FAISS file under a new name, fsyncs it, then atomically replaces
manifest.json, and only then removes the old FAISS file. Whenever the process dies, the
manifest on disk names a complete FAISS file, so a crash never leaves an index that loads
half-written; a damaged file is refused by its sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from streamer.artifacts import ArtifactError, ModelInfo, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class SongEntry:
    song_id: str
    title: str
    source: str  # the reference audio path it was built from
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class IndexStore:
    """A loaded index: FAISS + the vector and song tables."""

    faiss_index: faiss.Index
    songs: list[SongEntry]
    vector_song: np.ndarray  # (V,) int32 row in `songs` per vector
    vector_span: np.ndarray  # (V, 2) float32 segment start/end in seconds
    model_hash: str
    settings: dict  # build settings (segment length, index type, ...)
    calibration: dict  # impostor statistics and thresholds

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
        scores, ids = self.search(queries, k)
        best: dict[int, float] = {}
        for score, vid in zip(scores.ravel(), ids.ravel()):
            if vid >= 0:
                song = int(self.vector_song[vid])
                best[song] = max(best.get(song, -np.inf), float(score))
        return best


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_index(index_dir: Path, store: IndexStore, model: ModelInfo) -> None:
    """Write `store` into index_dir atomically (see module docstring)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    blob = faiss.serialize_index(store.faiss_index).tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    faiss_name = f"vectors-{digest[:12]}.faiss"
    _fsync_write(index_dir / faiss_name, blob)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_hash": store.model_hash,
        "model": {k: v for k, v in model.to_dict().items() if k != "dims"},
        "settings": store.settings,
        "calibration": store.calibration,
        "faiss_file": faiss_name,
        "faiss_sha256": digest,
        "songs": [vars(s) for s in store.songs],
        "vectors": [[int(s), round(float(a), 3), round(float(b), 3)] for s, (a, b) in zip(store.vector_song, store.vector_span)],
    }
    tmp = index_dir / (MANIFEST + ".tmp")
    _fsync_write(tmp, (json.dumps(manifest, indent=1) + "\n").encode())
    tmp.replace(index_dir / MANIFEST)
    dir_fd = os.open(index_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in index_dir.glob("vectors-*.faiss"):  # only now is the previous file unreferenced
        if stale.name != faiss_name:
            stale.unlink(missing_ok=True)


def read_manifest(index_dir: Path) -> dict:
    path = index_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: index manifest not found (is {index_dir} an index built by `coverwatch index build`?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported index format (expected format_version {FORMAT_VERSION})")
    return manifest


def load_index(index_dir: Path, expected_model_hash: str | None = None) -> IndexStore:
    """Load and verify an index; with expected_model_hash, refuse one built by another model."""
    manifest = read_manifest(index_dir)
    try:
        model_hash = manifest["model_hash"]
        faiss_path = index_dir / manifest["faiss_file"]
        songs = [SongEntry(**s) for s in manifest["songs"]]
        vectors = np.asarray(manifest["vectors"], dtype=np.float64).reshape(-1, 3)
        digest = manifest["faiss_sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{index_dir / MANIFEST}: index manifest is missing or has malformed fields ({exc})") from None
    if expected_model_hash is not None and model_hash != expected_model_hash:
        raise ArtifactError(
            f"{index_dir}: index was built with model {model_hash}, but the loaded model is {expected_model_hash}; "
            "rebuild the index with this model (`coverwatch index build`)"
        )
    if not faiss_path.is_file():
        raise ArtifactError(f"{faiss_path}: FAISS file named by the manifest is missing")
    if sha256_file(faiss_path) != digest:
        raise ArtifactError(f"{faiss_path}: sha256 does not match the manifest (file truncated or altered)")
    try:
        index = faiss.deserialize_index(np.fromfile(faiss_path, dtype=np.uint8))
    except RuntimeError as exc:
        raise ArtifactError(f"{faiss_path}: FAISS cannot read the index ({exc})") from None
    if index.ntotal != len(vectors):
        raise ArtifactError(f"{index_dir}: FAISS holds {index.ntotal} vectors but the manifest lists {len(vectors)}")
    song_rows = vectors[:, 0].astype(np.int32)
    if len(song_rows) and (song_rows.min() < 0 or song_rows.max() >= len(songs)):
        raise ArtifactError(f"{index_dir / MANIFEST}: a vector points to a song that is not listed")
    return IndexStore(
        index,
        songs,
        song_rows,
        vectors[:, 1:].astype(np.float32),
        model_hash,
        manifest.get("settings", {}),
        manifest.get("calibration", {}),
    )
