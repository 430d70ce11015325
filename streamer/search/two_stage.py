"""Two-stage catalog search: songs first, then their segments.

A large catalog holds ~10 segment vectors a song, and an IVF over all of them has to scan
a large share of its lists to keep recall (the embeddings spread over many directions),
which costs ~300 ms a query at 10M vectors. Segments of one song lie close together, so:

    stage 1   one vector a song (the L2-normalised mean of its segments) in an HNSW graph:
              the `candidates` songs nearest the query, with their exact scores
    stage 2   every segment of those songs scored against the query: the song's score plus
              the query's product with the segment's 8-bit residual from the song vector;
              the best k segments are the answer (vector ids, as a flat index gives)

Residual codes are per-dimension 8-bit, over the range the catalog's residuals span. A
residual is ~4x narrower than a raw vector (segments of a song lie close together), so
the rounding moves a score by ~0.0003, against ~0.002 for the same 8 bits on raw vectors:
measured at 10k songs, recall@10 0.991 against 0.944 (ranks 8-10 are often ~0.001 apart).

Memory: D bytes of codes a segment (memory-mapped; 512 B at D = 512) plus, per song, the
HNSW node: 4*D + ~2*M*4 bytes (2.3 kB at D = 512, M = 32). 1M songs of 10 segments:
5.1 GB of codes on disk (pages of candidate songs only are touched) + 2.3 GB of graph.

`TwoStageIndex` answers the calls IndexStore and the index builder make of a FAISS index
(ntotal, d, search, reconstruct_n), so the rest of the code does not know it is there.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

CODE_LEVELS = 255  # uint8 codes


@dataclass(frozen=True)
class ResidualQuantizer:
    """Per-dimension 8-bit codes of a segment's residual from its song vector.

    Residuals are ~4x narrower than the vectors (segments of a song lie close together), so
    the same 8 bits quantise them ~4x finer than a quantiser of the raw vectors would.
    """

    low: np.ndarray  # (D,) float32 smallest residual per dimension
    step: np.ndarray  # (D,) float32 code step per dimension

    @classmethod
    def fit(cls, residuals: np.ndarray) -> ResidualQuantizer:
        """(V, D) residuals -> the quantiser spanning their per-dimension range."""
        low = residuals.min(axis=0) if len(residuals) else np.zeros(residuals.shape[1], np.float32)
        high = residuals.max(axis=0) if len(residuals) else low
        return cls(low.astype(np.float32), np.maximum((high - low) / CODE_LEVELS, 1e-6).astype(np.float32))

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        """(V, D) float32 -> (V, D) uint8; values outside the fitted range are clipped to it."""
        return np.clip(np.rint((residuals - self.low) / self.step), 0, CODE_LEVELS).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(V, D) uint8 -> (V, D) float32 residuals (within step / 2 a dimension)."""
        return codes.astype(np.float32) * self.step + self.low

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "step": self.step.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> ResidualQuantizer:
        return cls(np.asarray(d["low"], dtype=np.float32), np.asarray(d["step"], dtype=np.float32))


def song_vectors(vectors: np.ndarray, vector_song: np.ndarray, n_songs: int) -> np.ndarray:
    """(V, D) segment vectors, (V,) song rows -> (n_songs, D) unit song vectors (normalised means).

    A song without segments gets a zero vector (it scores 0 against every query).
    """
    sums = np.zeros((n_songs, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, vector_song, vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def song_offsets(vector_song: np.ndarray, n_songs: int) -> tuple[np.ndarray, np.ndarray]:
    """(V,) song rows -> (order (V,) vector ids grouped by song, offsets (n_songs + 1,)):
    song s's vectors are order[offsets[s]:offsets[s + 1]]."""
    order = np.argsort(vector_song, kind="stable")
    offsets = np.zeros(n_songs + 1, dtype=np.int64)
    np.cumsum(np.bincount(vector_song, minlength=n_songs), out=offsets[1:])
    return order, offsets


@dataclass(frozen=True)
class TwoStageParams:
    hnsw_m: int  # graph neighbours per song node
    ef_construction: int
    ef_search: int  # stage-1 beam; at least `candidates`
    candidates: int  # songs whose segments stage 2 scores


def song_codes(
    vectors: np.ndarray, vector_song: np.ndarray, n_songs: int, quantizer: ResidualQuantizer | None = None
) -> tuple[np.ndarray, np.ndarray, ResidualQuantizer]:
    """(V, D) segment vectors of songs 0..n_songs-1 -> (song vectors (n_songs, D), residual codes
    (V, D) uint8, the quantiser: `quantizer`, or one fitted on these residuals)."""
    songs = song_vectors(vectors, vector_song, n_songs)
    residuals = vectors - songs[vector_song]
    quantizer = quantizer or ResidualQuantizer.fit(residuals)
    return songs, quantizer.encode(residuals), quantizer


def song_graph(songs: np.ndarray, params: TwoStageParams) -> faiss.Index:
    """(S, D) unit song vectors -> the stage-1 HNSW graph (ids = rows)."""
    index = faiss.IndexHNSWFlat(songs.shape[1], params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.hnsw.efSearch = params.ef_search
    index.add(np.ascontiguousarray(songs))
    return index


QUERY_BLOCK = 16  # queries re-ranked together: bounds the decoded candidates to ~16 x C x 10 x D floats


class TwoStageIndex:
    """Song-level HNSW + exact re-ranking of the candidates' 8-bit residual codes."""

    def __init__(self, song_index: faiss.Index, codes: np.ndarray, quantizer: ResidualQuantizer, vector_song: np.ndarray, candidates: int):
        """song_index: an inner-product index of one unit vector per song row (ids 0..S-1);
        codes (V, D) uint8 residuals from those vectors (may be a read-only memmap);
        vector_song (V,) the song row of each code row."""
        if len(codes) != len(vector_song):
            raise ValueError(f"{len(codes)} segment codes but {len(vector_song)} vector-table rows")
        if len(vector_song) and (vector_song.min() < 0 or vector_song.max() >= song_index.ntotal):
            raise ValueError(f"a segment points to a song outside the {song_index.ntotal} songs of the first stage")
        self.song_index = song_index
        self.codes = codes
        self.quantizer = quantizer
        self.vector_song = np.asarray(vector_song, dtype=np.int32)
        self.candidates = int(candidates)
        self.order, self.offsets = song_offsets(self.vector_song, song_index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, vector_song: np.ndarray, n_songs: int, params: TwoStageParams) -> TwoStageIndex:
        """(V, D) float32 unit segment vectors of n_songs songs -> a filled index."""
        songs, codes, quantizer = song_codes(vectors, vector_song, n_songs)
        return cls(song_graph(songs, params), codes, quantizer, vector_song, params.candidates)

    @property
    def ntotal(self) -> int:
        return len(self.codes)

    @property
    def d(self) -> int:
        return int(self.song_index.d)

    @property
    def n_songs(self) -> int:
        return int(self.song_index.ntotal)

    def song_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(R,) song rows -> (R, D) float32 stage-1 song vectors."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.song_index.reconstruct_batch(rows) if len(rows) else np.zeros((0, self.d), np.float32)

    def add_songs(self, vectors: np.ndarray, vector_song: np.ndarray) -> None:
        """Append the (V, D) segment vectors of new songs (rows n_songs, n_songs + 1, ...).

        The quantiser keeps its range: a new residual outside it is clipped (the build's range
        spans every residual of the catalog it was fitted on; rebuilds refit it)."""
        first = self.n_songs
        if len(vector_song) == 0:
            return
        if vector_song.min() < first:
            raise ValueError("add_songs takes new songs only (rows after the indexed ones)")
        songs, codes, _ = song_codes(vectors, vector_song - first, int(vector_song.max()) + 1 - first, self.quantizer)
        self.song_index.add(songs)
        self.codes = np.concatenate([np.asarray(self.codes), codes])
        self.vector_song = np.concatenate([self.vector_song, vector_song.astype(np.int32)])
        self.order, self.offsets = song_offsets(self.vector_song, self.n_songs)

    def reconstruct_n(self, first: int, n: int) -> np.ndarray:
        """(n, D) float32 decoded segment vectors first..first+n-1."""
        rows = self.vector_song[first : first + n]
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.song_vectors(unique)[inverse] + self.quantizer.decode(np.asarray(self.codes[first : first + n]))

    def candidate_segments(self, songs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q, C) song rows (-1 = none) -> (slot (N,) flat index into `songs`, vector ids (N,)):
        every segment of every candidate, grouped by query; one gather, no loop over songs."""
        flat = songs.ravel()
        slots = np.flatnonzero(flat >= 0)
        starts = self.offsets[flat[slots]]
        lengths = self.offsets[flat[slots] + 1] - starts
        run_begin = np.cumsum(lengths) - lengths  # where each song's run begins in the output
        positions = np.arange(int(lengths.sum())) + np.repeat(starts - run_begin, lengths)
        return np.repeat(slots, lengths), self.order[positions]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 unit queries -> (scores (Q, k) float32, vector ids (Q, k) int64), best
        first; -1 ids (and -inf scores) pad a query whose candidates hold fewer than k segments."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts = [self._search_block(queries[i : i + QUERY_BLOCK], k) for i in range(0, len(queries), QUERY_BLOCK)]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_block(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_query, n_cand = len(queries), min(max(self.candidates, 1), max(self.n_songs, 1))
        song_scores, songs = self.song_index.search(queries, n_cand)
        slot, ids = self.candidate_segments(songs)
        owner = slot // n_cand
        # q . segment = q . song vector (stage 1's exact score) + q . decoded residual
        scaled = queries * self.quantizer.step
        offset = queries @ self.quantizer.low
        codes = np.asarray(self.codes[ids], dtype=np.float32)
        scores = song_scores.ravel()[slot] + offset[owner] + np.einsum("ij,ij->i", codes, scaled[owner])
        # lay the candidates out as a (Q, widest) matrix padded with -inf, then take each row's top k
        counts = np.bincount(owner, minlength=n_query)
        column = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
        width = max(k, int(counts.max()))
        table = np.full((n_query, width), -np.inf, dtype=np.float32)
        table_ids = np.full((n_query, width), -1, dtype=np.int64)
        table[owner, column] = scores
        table_ids[owner, column] = ids
        top = np.argpartition(-table, k - 1, axis=1)[:, :k] if width > k else np.tile(np.arange(width), (n_query, 1))
        top_scores = np.take_along_axis(table, top, 1)
        best_first = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, best_first, 1), np.take_along_axis(np.take_along_axis(table_ids, top, 1), best_first, 1)
