"""FAISS index types for the reference catalog, their parameters, and the `auto` choice.

Every type is an inner-product index over L2-normalised D-dim embeddings:

    flat      exact search (IndexFlatIP); 4*D bytes per vector
    hnsw      HNSW graph over full vectors; 4*D + ~2*M*4 bytes per vector
    ivf       IVF-Flat: k-means lists of full vectors, `nprobe` lists scanned per query
    ivf_sq8   IVF with 8-bit scalar-quantised vectors; D bytes per vector
    ivf_pq    IVF with product-quantised vectors (PQ_SUBVECTOR_DIMS dims per byte); D/8 bytes
    opq_ivf_pq  ivf_pq behind a learned OPQ rotation (better codes, slower to build)
    two_stage HNSW over one vector a song, then the candidates' segments re-ranked from 8-bit
              residual codes (streamer/search/two_stage.py); D bytes a segment + ~2.3 kB a song

`spec_for(type, dim, n_vectors)` turns a type (or "auto") and the catalog size into an
IndexSpec: the faiss factory string plus the search-time parameters. The spec is written
into the index manifest (settings["index"]), and the search parameters are also stored in
the FAISS file itself (nprobe and efSearch are serialised), so a loaded index searches
exactly as it was measured.

The numbers below come from bench/bench_index.py (see bench/RESULTS.md, "Index types"),
run on 2 cores with real embeddings of rendered covers plus synthetic distractors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from coverwatch.streamer.config import INDEX_TYPE_CHOICES
from coverwatch.streamer.search.two_stage import TwoStageIndex, TwoStageParams

log = logging.getLogger(__name__)

TYPE_CHOICES = INDEX_TYPE_CHOICES  # what config and `index build --type` accept
INDEX_TYPES = tuple(t for t in TYPE_CHOICES if t != "auto")

HNSW_M = 32  # graph neighbours per node: ~2*M*4 bytes of links per vector
HNSW_EF_CONSTRUCTION = 80  # build-time beam: 100k vectors in ~44 CPU s on the shared 2 cores
HNSW_EF_SEARCH = 128  # query beam: recall@10 0.976 at 10k songs (64: 0.916, 256: 0.995), 0.76 ms single query

# two_stage: stage-1 songs re-ranked, and the stage-1 beam, by catalog size. Measured with
# bench/bench_two_stage.py (bench/RESULTS.md, "Two-stage search"), recall@10 against exact search,
# single-query latency on the shared 2 cores:
#   100k songs (1M vectors): efSearch 256 / 100 candidates 0.980 (graph efConstruction 80, 1.4 ms), 0.987 (200);
#   1M songs (10M vectors), song graph built with efConstruction 80: efSearch 256 / 100 0.925
#   (2.3 ms), 512 / 200 0.967 (3.8-4.5 ms, p99 4.7-9.7); built with 200: 320 / 120 0.964 in
#   2.6 ms (p99 3.1), 512 / 200 0.981 in 4.3 ms. The misses at 1M are stage-1 misses, so the
#   better graph buys the recall, and large catalogs get the wider beam. A 4x dearer graph
#   build (845 s wall at 1M songs) is small beside embedding 1M songs (~25 CPU h).
TWO_STAGE_EF_CONSTRUCTION = 200
TWO_STAGE_CANDIDATES = 100
TWO_STAGE_EF_SEARCH = 256
TWO_STAGE_LARGE_VECTORS = 3_000_000  # from here on (~300k songs) the wider beam below
TWO_STAGE_LARGE_CANDIDATES = 120
TWO_STAGE_LARGE_EF_SEARCH = 320

IVF_LISTS_PER_SQRT = 4  # nlist ~ 4 * sqrt(n_vectors) (power of two), the usual FAISS range
IVF_MAX_LISTS = 2048  # assigning 10M vectors to 2048 lists is ~21 TFLOP (~5 min on 2 idle cores); 4096 doubles it
IVF_MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
IVF_TRAIN_POINTS_PER_LIST = 40  # k-means is trained on at most this many points per list
# Lists scanned per query, as a fraction of nlist. Measured at 10k songs (1024 lists): recall@10
# 0.930 (ivf) / 0.924 (ivf_sq8) at 1/8, 0.977 / 0.967 at 1/4. The embeddings spread over many
# directions, so IVF needs to scan a large share of the lists; 1/4 is the smallest power of two >= 0.95.
IVF_PROBE_FRACTION = 1 / 4
IVF_MIN_PROBES = 8
KMEANS_ITERS = 10  # k-means iterations for IVF lists and PQ codebooks (FAISS defaults to 25)

PQ_SUBVECTOR_DIMS = 8  # dims per PQ code byte: D=512 -> PQ64, 64 bytes per vector
PQ_MAX_BITS = 8  # bits per PQ sub-code (256 centroids); fewer when there is little to train on
PQ_MIN_BITS = 4
PQ_TRAIN_POINTS_PER_CENTROID = 64  # PQ codebooks train on <= 64 * 256 residuals (FAISS: 256 *; 4 min at 10k songs here)
OPQ_TRAIN_POINTS = 16_384  # rows the OPQ rotation is fitted on (FAISS default 65536: minutes on 2 cores)

# `auto`, by number of indexed vectors (a synthetic song is 10 vectors; the rendered test songs
# are ~3.6: 20-s segments every 10 s plus the whole track). Measured on the shared 2 cores
# (bench/RESULTS.md, "Index types"):
#  * flat: a single query costs ~0.29 us per vector (28 ms at 99k vectors), so exact search keeps
#    the < 5 ms per query target only up to ~15k vectors;
#  * hnsw: 0.76 ms per query and recall 0.976 at 99k vectors, 2.2 KB per vector (4.4 GB at 2M,
#    within the 8 GiB budget) but ~44 CPU s per 100k vectors to build: up to 2M vectors;
#  * beyond that two_stage: 512 B per segment (memory-mapped) + ~2.3 kB per song, recall@10 0.967
#    at 1M songs / 10M vectors in 4.1 ms a query (bench/RESULTS.md, "Two-stage search"), where
#    ivf_sq8 (same 512 B per vector) needs 314 ms for 0.983. ivf_pq is smaller (64 B per vector)
#    but its codes cap recall@10 at 0.47 here (top-1 0.233 vs 0.328 exact), so `auto` never picks it.
AUTO_FLAT_MAX_VECTORS = 15_000
AUTO_HNSW_MAX_VECTORS = 2_000_000


@dataclass(frozen=True)
class IndexSpec:
    """What to build and how to search it; recorded in the index manifest."""

    index_type: str  # one of INDEX_TYPES ("auto" is resolved before a spec exists)
    factory: str  # faiss.index_factory description
    nlist: int = 0  # IVF lists (0: not IVF)
    nprobe: int = 0  # IVF lists scanned per query
    ef_search: int = 0  # HNSW beam width at query time (0: not HNSW)
    candidates: int = 0  # two_stage: songs whose segments are re-ranked (0: not two_stage)
    chosen_by: str = "config"  # "config" or "auto (<n> vectors)"

    def to_settings(self) -> dict:
        return asdict(self)


def auto_type(n_vectors: int) -> str:
    """The index type `auto` picks for a catalog of n_vectors (thresholds above)."""
    if n_vectors <= AUTO_FLAT_MAX_VECTORS:
        return "flat"
    if n_vectors <= AUTO_HNSW_MAX_VECTORS:
        return "hnsw"
    return "two_stage"


def ivf_lists(n_vectors: int) -> int:
    """Number of IVF lists: a power of two near 4*sqrt(n), with >= 39 points per list."""
    target = IVF_LISTS_PER_SQRT * math.sqrt(max(1, n_vectors))
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, IVF_MAX_LISTS, n_vectors // IVF_MIN_POINTS_PER_LIST)))


def ivf_probes(nlist: int) -> int:
    return int(min(nlist, max(IVF_MIN_PROBES, round(nlist * IVF_PROBE_FRACTION))))


def pq_bits(n_vectors: int) -> int:
    """Bits per PQ sub-code: 8, or fewer when the catalog is too small to train 256 centroids."""
    bits = min(PQ_MAX_BITS, int(math.log2(max(1, n_vectors // IVF_MIN_POINTS_PER_LIST))))
    if bits < PQ_MIN_BITS:
        raise ValueError(f"a PQ index needs at least {IVF_MIN_POINTS_PER_LIST << PQ_MIN_BITS} vectors to train; got {n_vectors} (use flat)")
    return bits


def spec_for(index_type: str, dim: int, n_vectors: int) -> IndexSpec:
    """Resolve a configured type ("auto" included) for a catalog of n_vectors D-dim vectors."""
    chosen_by = "config"
    if index_type == "auto":
        index_type = auto_type(n_vectors)
        chosen_by = f"auto ({n_vectors} vectors)"
    if index_type == "flat":
        return IndexSpec("flat", "Flat", chosen_by=chosen_by)
    if index_type == "hnsw":
        return IndexSpec("hnsw", f"HNSW{HNSW_M},Flat", ef_search=HNSW_EF_SEARCH, chosen_by=chosen_by)
    if index_type == "two_stage":
        large = n_vectors >= TWO_STAGE_LARGE_VECTORS
        return IndexSpec(
            "two_stage", f"songs HNSW{HNSW_M},Flat + segments residual SQ8",
            ef_search=TWO_STAGE_LARGE_EF_SEARCH if large else TWO_STAGE_EF_SEARCH,
            candidates=TWO_STAGE_LARGE_CANDIDATES if large else TWO_STAGE_CANDIDATES, chosen_by=chosen_by,
        )
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r} (expected one of {', '.join(TYPE_CHOICES)})")
    nlist = ivf_lists(n_vectors)
    if index_type == "ivf":
        codes = "Flat"
    elif index_type == "ivf_sq8":
        codes = "SQ8"
    else:
        if dim % PQ_SUBVECTOR_DIMS:
            raise ValueError(f"PQ needs the embedding size ({dim}) to be a multiple of {PQ_SUBVECTOR_DIMS}")
        codes = f"PQ{dim // PQ_SUBVECTOR_DIMS}x{pq_bits(n_vectors)}"
    prefix = f"OPQ{dim // PQ_SUBVECTOR_DIMS}," if index_type == "opq_ivf_pq" else ""
    return IndexSpec(index_type, f"{prefix}IVF{nlist},{codes}", nlist=nlist, nprobe=ivf_probes(nlist), chosen_by=chosen_by)


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Set nprobe / efSearch on `index` (they are serialised with it)."""
    if spec.nprobe:
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    if spec.ef_search:
        faiss.downcast_index(index).hnsw.efSearch = spec.ef_search


def two_stage_params(spec: IndexSpec) -> TwoStageParams:
    return TwoStageParams(HNSW_M, TWO_STAGE_EF_CONSTRUCTION, spec.ef_search, spec.candidates)


def make_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An empty (untrained) inner-product FAISS index for `spec` (not two_stage: see build_catalog_index)."""
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.ef_search:
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    apply_search_params(index, spec)
    return index


def training_sample(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> np.ndarray:
    """(V, D) -> (<=V, D) rows to train on: k-means needs tens of points per list, not all."""
    limit = max(spec.nlist * IVF_TRAIN_POINTS_PER_LIST, (1 << PQ_MAX_BITS) * IVF_TRAIN_POINTS_PER_LIST)
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), limit, replace=False))
    return vectors[rows]


def assign_lists(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(L, D) IVF centroids, (V, D) vectors -> (V,) int64 list of the highest inner product.

    One BLAS matmul per block: FAISS's own assignment (IndexFlatIP.search) ran at ~15-30
    GFLOP/s here against ~75-130 for numpy's matmul, and assignment dominates adding
    millions of vectors to thousands of lists.
    """
    assert centroids.ndim == 2 and vectors.ndim == 2 and centroids.shape[1] == vectors.shape[1]
    block = 32_768  # rows per matmul: 32768 x 2048 float32 scores = 256 MiB
    lists = np.empty(len(vectors), dtype=np.int64)
    for first in range(0, len(vectors), block):
        lists[first : first + block] = np.argmax(vectors[first : first + block] @ centroids.T, axis=1)
    return lists


def plain_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """The index as an IVF with a flat quantizer, or None (a transform in front, a graph, flat)."""
    ivf = faiss.downcast_index(index)
    if isinstance(ivf, faiss.IndexIVF) and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
        return ivf
    return None


def ivf_centroids(index: faiss.Index) -> np.ndarray | None:
    """(L, D) coarse centroids of a trained plain IVF, else None (FAISS assigns itself)."""
    ivf = plain_ivf(index)
    return None if ivf is None else ivf.quantizer.reconstruct_n(0, ivf.nlist)


def add_vectors(index: faiss.Index, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
    """Add (V, D) float32 rows; a plain IVF gets its lists from `assign_lists` (or `lists`)."""
    assert vectors.ndim == 2 and vectors.dtype == np.float32, (vectors.shape, vectors.dtype)
    vectors = np.ascontiguousarray(vectors)
    centroids = ivf_centroids(index) if lists is None else None
    if lists is None and centroids is None:
        index.add(vectors)
        return
    lists = np.ascontiguousarray(assign_lists(centroids, vectors) if lists is None else lists, dtype=np.int64)
    faiss.downcast_index(index).add_core(len(vectors), faiss.swig_ptr(vectors), None, faiss.swig_ptr(lists))


def spherical_kmeans(vectors: np.ndarray, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> np.ndarray:
    """(V, D) unit vectors -> (k, D) unit centroids maximising inner product (numpy matmuls).

    Replaces FAISS's coarse k-means, which runs its assignment at a fraction of BLAS speed
    here (see assign_lists). Empty clusters are re-seeded from random points.
    """
    assert vectors.ndim == 2 and len(vectors) >= k, (vectors.shape, k)
    rng = np.random.default_rng(seed)
    centroids = vectors[rng.choice(len(vectors), k, replace=False)].copy()
    for _ in range(iters):
        lists = assign_lists(centroids, vectors)
        sums = np.zeros_like(centroids)
        np.add.at(sums, lists, vectors)
        empty = ~sums.any(axis=1)
        sums[empty] = vectors[rng.choice(len(vectors), int(empty.sum()), replace=False)]
        centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return centroids.astype(np.float32)


def train_index(index: faiss.Index, spec: IndexSpec, sample: np.ndarray, seed: int = 0) -> None:
    """Train on (N, D) float32 rows: numpy k-means for a plain IVF's lists, FAISS for the rest."""
    ivf = plain_ivf(index)
    if ivf is not None and ivf.quantizer.ntotal == 0:
        ivf.quantizer.add(spherical_kmeans(sample, spec.nlist, seed=seed))  # FAISS then skips its own k-means
    inner = faiss.try_extract_index_ivf(index)
    if isinstance(inner, faiss.IndexIVFPQ):
        inner.pq.cp.niter = KMEANS_ITERS
        inner.pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # OPQ: 50 rotation updates by default, each a PQ training
        opq = faiss.downcast_VectorTransform(outer.chain.at(0))
        opq.niter = KMEANS_ITERS
        opq.max_train_points = OPQ_TRAIN_POINTS
    index.train(np.ascontiguousarray(sample))


def build_faiss_index(spec: IndexSpec, vectors: np.ndarray, seed: int = 0) -> faiss.Index:
    """Train (on a sample) and fill an index of `spec` with (V, D) float32 unit vectors."""
    assert vectors.ndim == 2 and vectors.dtype == np.float32, (vectors.shape, vectors.dtype)
    index = make_index(spec, vectors.shape[1])
    if not index.is_trained:
        train_index(index, spec, training_sample(vectors, spec, seed), seed)
    add_vectors(index, vectors)
    return index


def build_catalog_index(spec: IndexSpec, vectors: np.ndarray, vector_song: np.ndarray, n_songs: int) -> faiss.Index | TwoStageIndex:
    """The search index of a catalog: (V, D) float32 unit vectors, (V,) song row of each."""
    if spec.index_type == "two_stage":
        return TwoStageIndex.build(vectors, vector_song, n_songs, two_stage_params(spec))
    return build_faiss_index(spec, vectors)
