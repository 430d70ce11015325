"""On-disk index: a FAISS inner-product index plus a JSON manifest, written atomically.

    INDEX_DIR/manifest.json           format, model hash and front end, build settings,
                                      songs, vector -> (song, segment start/end), calibration,
                                      name and sha256 of the FAISS file
    INDEX_DIR/vectors-<sha12>.faiss   the FAISS index (vector id = row in manifest["vectors"])

A write puts the new FAISS file under a temporary name, fsyncs it and renames it to its
content-addressed name, then writes manifest.json the same way (temporary file, fsync,
rename, fsync of the folder), and only then removes the old FAISS file. Whenever the
process dies, the manifest on disk names a complete FAISS file, so a crash never leaves an
index that loads half-written. A damaged file is refused: the FAISS file by the sha256 the
manifest records, the manifest by `manifest_sha256`, a sha256 over its own canonical JSON
(every other field), so a flipped digit in a vector span or a calibration is caught too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from streamer.artifacts import ArtifactError, ModelInfo, atomic_write, canonical_sha256, fsync_dir, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The fields of a manifest written before `manifest_sha256` existed.
UNCHECKED_MANIFEST_KEYS = {"format_version", "model_hash", "model", "settings", "calibration", "faiss_file", "faiss_sha256", "songs", "vectors"}


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
        return self.best_per_song_grouped(queries, np.zeros(len(queries), dtype=np.int64), 1, k)[0]

    def best_per_song_grouped(self, queries: np.ndarray, group: np.ndarray, n_groups: int, k: int) -> list[dict[int, float]]:
        """One FAISS search for (Q, D) queries; query q belongs to group[q] in [0, n_groups).

        Returns per group {song row: best score over the group's queries and retrieved vectors}.
        """
        best: list[dict[int, float]] = [{} for _ in range(n_groups)]
        if len(queries) == 0:
            return best
        scores, ids = self.search(queries, k)
        for g, score_row, id_row in zip(group, scores, ids):
            found = best[g]
            for score, vid in zip(score_row.tolist(), id_row.tolist()):
                if vid >= 0:
                    song = int(self.vector_song[vid])
                    if score > found.get(song, -np.inf):
                        found[song] = score
        return best


def save_index(index_dir: Path, store: IndexStore, model: ModelInfo) -> None:
    """Write `store` into index_dir atomically (see module docstring)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    blob = faiss.serialize_index(store.faiss_index).tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    faiss_name = f"vectors-{digest[:12]}.faiss"
    atomic_write(index_dir / faiss_name, blob)  # may share its name with the live file: never write that in place
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_hash": store.model_hash,
        "model": {k: v for k, v in model.to_dict().items() if k not in ("dims", "sidecar_sha256")},
        "settings": store.settings,
        "calibration": store.calibration,
        "faiss_file": faiss_name,
        "faiss_sha256": digest,
        "songs": [vars(s) for s in store.songs],
        "vectors": [[int(s), round(float(a), 3), round(float(b), 3)] for s, (a, b) in zip(store.vector_song, store.vector_span)],
    }
    manifest["manifest_sha256"] = canonical_sha256(manifest, "manifest_sha256")
    atomic_write(index_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_dir(index_dir)
    for stale in index_dir.glob("vectors-*.faiss"):  # only now is the previous file unreferenced
        if stale.name != faiss_name:
            stale.unlink(missing_ok=True)
    for leftover in index_dir.glob("*.tmp"):  # from a write that was killed half-way
        leftover.unlink(missing_ok=True)


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
    recorded = manifest.get("manifest_sha256")
    if recorded is None:
        unknown = sorted(set(manifest) - UNCHECKED_MANIFEST_KEYS)
        if unknown:  # e.g. the checksum's own key damaged into another name
            raise ArtifactError(f"{path}: no manifest_sha256 and unknown fields {unknown} (manifest altered or damaged); rebuild the index")
        # Written before manifests carried their checksum: still loads, unprotected.
        log.warning("%s: no manifest_sha256 (index from an older coverwatch); rebuild it to protect the manifest", path)
    elif recorded != canonical_sha256(manifest, "manifest_sha256"):
        raise ArtifactError(f"{path}: manifest_sha256 does not match its content (manifest altered or damaged); rebuild the index")
    return manifest


def load_index(index_dir: Path, expected_model_hash: str | None = None, mmap: bool = True) -> IndexStore:
    """Load and verify an index; with expected_model_hash, refuse one built by another model.

    mmap: map IVF lists read-only instead of reading them (searching only); pass False to add vectors.
    """
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
        # mapped IVF lists load page by page as searched (a 1M-song IVF-SQ8 is a 5 GB file); other types are read whole
        index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as exc:
        raise ArtifactError(f"{faiss_path}: FAISS cannot read the index ({exc})") from None
    if index.ntotal != len(vectors):
        raise ArtifactError(f"{index_dir}: FAISS holds {index.ntotal} vectors but the manifest lists {len(vectors)}")
    recorded_dim = manifest.get("model", {}).get("embedding_dim", index.d)
    if index.d != recorded_dim:
        raise ArtifactError(f"{index_dir}: FAISS vectors have {index.d} dims but the manifest's model has {recorded_dim}")
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
