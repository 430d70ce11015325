"""FAISS index types on catalogs of 10k, 100k and 1M songs: build time, memory, latency, recall.

Real part: one version of each of `--groups` validation cover groups
(~/.cache/coverwatch/covers, split "val", never used for training) is indexed through
coverwatch.index_builder.build.build_index, which also gives the index build speed (reference audio
seconds per CPU second). Every other version of those groups gives one query: a
`--query-s` excerpt at a seeded offset, embedded like a live window.

Distractors: the catalog is filled up to N songs with synthetic songs of SEGMENTS_PER_SONG
vectors. A song centre is drawn from a Gaussian fitted to the real song-mean embeddings
(mean + top-RANK PCA directions + isotropic rest), each segment adds a deviation from a
Gaussian fitted the same way to the real within-song deviations, then every vector is
L2-normalised. Chunks are generated from seed (SEED, chunk number), so nothing of the
catalog is ever held whole: exact ground truth is a running top-k over chunks, and every
index is trained on a sample and filled chunk by chunk.

Prints and records in bench/RESULTS.md (section "Index types") with plots bench/index_*.png.

Usage: nice -n 5 python bench/bench_index.py [--sizes 10000 100000 1000000] [--groups 120]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads ran PQ training 10x slower on a busy 2-core machine

import argparse
import csv
import datetime
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import matplotlib
import numpy as np
import soundfile
from report import write_section  # bench/report.py, beside this script

from coverwatch.index_builder.build import build_index
from coverwatch.index_builder.refs import Reference
from coverwatch.streamer.config import IndexBuildConfig
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import seconds_to_samples
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.index_types import (
    INDEX_TYPES,
    IndexSpec,
    add_vectors,
    apply_search_params,
    assign_lists,
    ivf_centroids,
    make_index,
    spec_for,
    train_index,
    training_sample,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger("bench_index")

SECTION = "## Index types (bench/bench_index.py)"
COVERS = Path.home() / ".cache/coverwatch/covers"
CACHE = Path.home() / ".cache/coverwatch/bench_index"
BENCH_DIR = Path(__file__).resolve().parent

SEED = 20261129
SEGMENTS_PER_SONG = 10  # vectors per synthetic song (the issue's ~10 segment vectors)
CHUNK_SONGS = 10_000  # synthetic songs generated per chunk: 100k vectors, 200 MB float32
RANK = 64  # PCA directions kept for the centre and the deviation Gaussians
TOP_K = 20  # neighbours per query, as the stream's top_k
RECALL_K = 10
FLOAT_BYTES = 4
GIB = 2**30

# Which types each catalog size builds; the rest are skipped with the reason in RESULTS.md.
PLAN = {
    10_000: tuple(t for t in INDEX_TYPES if t != "opq_ivf_pq"),
    100_000: ("flat", "ivf", "ivf_sq8", "ivf_pq"),
    1_000_000: ("ivf_sq8", "ivf_pq"),
}
OPQ_SKIP = (
    "training the OPQ rotation (10 iterations on 16k vectors, each a 64 x 256-centroid PQ training) ran for over 10 min "
    "on the shared cores (load average 6-14) at 10k songs before it was stopped; tests/test_index_types.py builds it on small data"
)
SKIPPED = {
    10_000: {"opq_ivf_pq": OPQ_SKIP},
    100_000: {
        "hnsw": "1.1M vectors: HNSW inserts measured at ~1.6k vectors/s on the shared cores (10k-song row) -> ~12 min, over the CPU budget",
        "opq_ivf_pq": OPQ_SKIP,
    },
    1_000_000: {
        "flat": "10M x 512 x 4 B = 20.5 GB of float32: does not fit 24 GiB beside the OS and other jobs",
        "ivf": "same 20.5 GB of full vectors as flat",
        "hnsw": "20.5 GB of vectors + 10M x 64 links x 4 B = 2.6 GB of graph; and hours to build on 2 cores",
        "opq_ivf_pq": "FAISS's own list assignment behind the rotation: 10M x 2048 lists x 1024 flop = 21 TFLOP at ~20 GFLOP/s = ~18 min",
    },
}
NPROBE_SWEEP = (4, 8, 16, 32, 64, 128, 256, 512)
EF_SWEEP = (32, 64, 128, 256, 512)


# ---------------------------------------------------------------- real embeddings


@dataclass
class RealSet:
    ref_vectors: list[np.ndarray]  # per real song: (S_i, D) segment vectors
    queries: np.ndarray  # (Q, D) cover excerpts
    query_song: np.ndarray  # (Q,) row of the query's real song
    audio_s: float  # reference audio seconds embedded
    build_cpu_s: float  # CPU seconds of build_index over those references
    build_wall_s: float


def val_groups(covers: Path, n_groups: int) -> list[list[dict]]:
    """The first n_groups validation groups (sorted by id) with >= 2 versions, versions sorted."""
    with (covers / "manifest.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    chosen = [sorted(v, key=lambda r: int(r["version"])) for _, v in sorted(groups.items()) if len(v) >= 2]
    return chosen[:n_groups]


def embed_excerpt(embedder: Embedder, path: Path, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One live-like query: (D,) embedding of a `seconds` excerpt at a random offset."""
    audio = load_audio(path)
    n = seconds_to_samples(seconds)
    start = int(rng.integers(0, max(1, len(audio) - n)))
    frames = embedder.cqt_whole(audio[start : start + n])
    return embedder.embed(frames[None].astype(np.float32))[0]


def real_cache(model_hash: str, n_groups: int, query_s: float) -> Path:
    return CACHE / f"real-{model_hash}-{n_groups}-{query_s:g}.npz"


def load_real(cache: Path) -> RealSet:
    z = np.load(cache)
    lengths = z["ref_lengths"]
    return RealSet(np.split(z["ref_flat"], np.cumsum(lengths)[:-1]), z["queries"], z["query_song"], *z["timing"])


def real_set(covers: Path, n_groups: int, query_s: float, embedder: Embedder) -> RealSet:
    """Embed references (through build_index, timed) and cover queries; cached on disk."""
    cache = real_cache(embedder.info.model_hash, n_groups, query_s)
    if cache.exists():
        return load_real(cache)
    groups = val_groups(covers, n_groups)
    refs = [Reference(g[0]["group_id"], g[0]["title"], covers / g[0]["path"]) for g in groups]
    audio_s = sum(soundfile.info(str(r.path)).duration for r in refs)
    cfg = IndexBuildConfig(index_type="flat")
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        store, _ = build_index(refs, Path(tmp) / "real", embedder, cfg)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    flat = store.faiss_index.reconstruct_n(0, store.n_vectors)  # a flat index: the exact vectors
    lengths = np.bincount(store.vector_song, minlength=len(refs))
    rng = np.random.default_rng(SEED)
    queries, query_song = [], []
    for song, g in enumerate(groups):
        for version in g[1:]:
            queries.append(embed_excerpt(embedder, covers / version["path"], query_s, rng))
            query_song.append(song)
    CACHE.mkdir(parents=True, exist_ok=True)
    timing = np.array([audio_s, cpu, wall])
    np.savez(cache, ref_flat=flat, ref_lengths=lengths, queries=np.array(queries), query_song=np.array(query_song), timing=timing)
    return real_set(covers, n_groups, query_s, embedder)


# ---------------------------------------------------------------- distractors


@dataclass
class LowRankGaussian:
    """mean + basis @ (scale * z) + rest * eps, for z, eps standard normal."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, R) orthonormal PCA directions
    scale: np.ndarray  # (R,) standard deviations along them
    rest: float  # standard deviation per dim of what the R directions leave

    @classmethod
    def fit(cls, x: np.ndarray, rank: int) -> LowRankGaussian:
        """(N, D) samples -> the Gaussian with their mean, top-`rank` PCA and residual variance."""
        mean = x.mean(axis=0)
        _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = sing**2 / max(1, len(x) - 1)
        rank = min(rank, len(var))
        rest_var = max(0.0, var[rank:].sum()) / (x.shape[1] - rank)
        return cls(
            mean.astype(np.float32), vt[:rank].T.astype(np.float32), np.sqrt(var[:rank]).astype(np.float32), float(np.sqrt(rest_var))
        )

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, D) float32 draws (mean excluded if it is zero)."""
        z = rng.standard_normal((n, len(self.scale)), dtype=np.float32) * self.scale
        eps = rng.standard_normal((n, len(self.mean)), dtype=np.float32)
        eps *= self.rest
        eps += z @ self.basis.T
        eps += self.mean
        return eps


@dataclass
class Distractors:
    centre: LowRankGaussian
    deviation: LowRankGaussian

    @classmethod
    def fit(cls, ref_vectors: list[np.ndarray]) -> Distractors:
        means = np.stack([v.mean(axis=0) for v in ref_vectors])
        devs = np.concatenate([v - v.mean(axis=0) for v in ref_vectors])
        return cls(LowRankGaussian.fit(means, RANK), LowRankGaussian.fit(devs, RANK))

    def songs(self, chunk: int, n_songs: int) -> np.ndarray:
        """(n_songs * SEGMENTS_PER_SONG, D) unit vectors of chunk `chunk` (deterministic)."""
        rng = np.random.default_rng([SEED, chunk])
        centres = self.centre.sample(rng, n_songs)
        x = self.deviation.sample(rng, n_songs * SEGMENTS_PER_SONG)
        x += np.repeat(centres, SEGMENTS_PER_SONG, axis=0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def catalog_chunks(real: RealSet, dist: Distractors, n_songs: int):
    """Yield (first vector id, (V, D) float32) for a catalog of n_songs: the real songs, then distractors."""
    yield 0, np.concatenate(real.ref_vectors).astype(np.float32)
    first = sum(len(v) for v in real.ref_vectors)
    left = n_songs - len(real.ref_vectors)
    chunk = 0
    while left > 0:
        songs = min(CHUNK_SONGS, left)
        x = dist.songs(chunk, songs)
        yield first, x
        first += len(x)
        left -= songs
        chunk += 1


def vector_song(ids: np.ndarray, real: RealSet) -> np.ndarray:
    """Vector ids -> song rows (real songs first, then SEGMENTS_PER_SONG per distractor); -1 stays -1."""
    real_song = np.concatenate([np.full(len(v), i) for i, v in enumerate(real.ref_vectors)])
    n_real = len(real_song)
    safe = np.clip(ids, 0, None)
    out = np.where(safe < n_real, real_song[np.clip(safe, 0, n_real - 1)], len(real.ref_vectors) + (safe - n_real) // SEGMENTS_PER_SONG)
    return np.where(ids >= 0, out, -1)


def score_resemblance(real: RealSet, dist: Distractors) -> dict:
    """Compare score distributions of real and synthetic songs against the real queries.

    For each query: the best score over the real songs other than its own, and the best over
    as many synthetic songs; plus within-song and between-song vector cosines of each set.
    """
    n = len(real.ref_vectors)
    synth = dist.songs(10**6, n)  # a chunk number the catalog never uses
    real_flat = np.concatenate(real.ref_vectors)
    real_song = np.concatenate([np.full(len(v), i) for i, v in enumerate(real.ref_vectors)])
    synth_song = np.repeat(np.arange(n), SEGMENTS_PER_SONG)
    s_real = real.queries @ real_flat.T
    s_real[real_song[None, :] == real.query_song[:, None]] = -np.inf
    best_real_impostor = s_real.max(axis=1)
    best_synth = (real.queries @ synth.T).max(axis=1)
    rng = np.random.default_rng(SEED)

    def pair_cos(x: np.ndarray, song: np.ndarray, same: bool) -> np.ndarray:
        a, b = rng.integers(0, len(x), (2, 20000))
        keep = (song[a] == song[b]) & (a != b) if same else song[a] != song[b]
        if same:  # random pairs rarely share a song: draw pairs inside songs instead
            a = rng.integers(0, len(x), 20000)
            members = [np.flatnonzero(song == s) for s in range(song.max() + 1)]
            b = np.array([rng.choice(members[song[i]]) for i in a])
            keep = a != b
        return np.einsum("ij,ij->i", x[a[keep]], x[b[keep]])

    return {
        "query best impostor (real songs)": best_real_impostor,
        "query best score (synthetic songs)": best_synth,
        "within-song cosine (real)": pair_cos(real_flat, real_song, True),
        "within-song cosine (synthetic)": pair_cos(synth, synth_song, True),
        "between-song cosine (real)": pair_cos(real_flat, real_song, False),
        "between-song cosine (synthetic)": pair_cos(synth, synth_song, False),
    }


# ---------------------------------------------------------------- measuring


def top_k_merge(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k: (Q, k) best so far + (Q, m) candidates -> (Q, k), best first."""
    s = np.concatenate([scores, new_scores], axis=1)
    i = np.concatenate([ids, new_ids], axis=1)
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def exact_update(gt: tuple[np.ndarray, np.ndarray], queries: np.ndarray, first: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold chunk x (vector ids first..) into the exact top-TOP_K of every query."""
    s = queries @ x.T
    part = np.argpartition(-s, TOP_K - 1, axis=1)[:, :TOP_K] if s.shape[1] > TOP_K else np.tile(np.arange(s.shape[1]), (len(s), 1))
    return top_k_merge(*gt, np.take_along_axis(s, part, 1), part + first, TOP_K)


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = RECALL_K) -> float:
    """Mean fraction of each query's exact top-k vector ids found in its approximate top-k."""
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def top1_correct(scores: np.ndarray, ids: np.ndarray, real: RealSet) -> float:
    """Share of queries whose best song (max score over retrieved vectors) is their own."""
    songs = vector_song(ids, real)
    hits = 0
    for s_row, song_row, truth in zip(scores, songs, real.query_song):
        valid = song_row >= 0
        hits += bool(valid.any() and song_row[valid][np.argmax(s_row[valid])] == truth)
    return hits / len(scores)


def single_latencies_ms(index: faiss.Index, queries: np.ndarray) -> np.ndarray:
    """(Q,) ms per one-query search (k = TOP_K)."""
    out = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], TOP_K)
        out.append((time.perf_counter() - t0) * 1000)
    return np.array(out)


def batched_ms(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(ms per query of one batched search, scores, ids)."""
    t0 = time.perf_counter()
    scores, ids = index.search(queries, TOP_K)
    return (time.perf_counter() - t0) * 1000 / len(queries), scores, ids


def load_rss(path: Path, mmap: bool, queries_path: Path) -> dict:
    """Peak RSS (GiB) of a fresh process that loads the index file (mmap or read) and searches once."""
    code = (
        "import faiss, numpy as np, sys, time, json\n"
        "faiss.omp_set_num_threads(2)\n"
        f"flags = {faiss.IO_FLAG_MMAP if mmap else 0}\n"
        "t0 = time.perf_counter(); index = faiss.read_index(sys.argv[1], flags); load_s = time.perf_counter() - t0\n"
        "def hwm_kb():  # peak RSS of this image (ru_maxrss would carry the parent's over exec)\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "after_load = hwm_kb()\n"
        "index.search(np.load(sys.argv[2]), 20)\n"
        "print(json.dumps({'load_s': load_s, 'after_load_kb': after_load, 'after_search_kb': hwm_kb()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(queries_path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    r = json.loads(proc.stdout)
    return {"load_s": r["load_s"], "rss_load_gib": r["after_load_kb"] / 2**20, "rss_search_gib": r["after_search_kb"] / 2**20}


def param_sweep(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, gt_ids: np.ndarray) -> list[dict]:
    """Recall and batched latency over nprobe (IVF) or efSearch (HNSW); the spec's value is restored."""
    rows = []
    if spec.nprobe:
        ivf = faiss.extract_index_ivf(index)
        for p in [p for p in NPROBE_SWEEP if p <= spec.nlist]:
            ivf.nprobe = p
            ms, _, ids = batched_ms(index, queries)
            rows.append({"param": "nprobe", "value": p, "recall": recall_at(ids, gt_ids), "batched_ms": ms})
    elif spec.ef_search:
        hnsw = faiss.downcast_index(index).hnsw
        for ef in EF_SWEEP:
            hnsw.efSearch = ef
            ms, _, ids = batched_ms(index, queries)
            rows.append({"param": "efSearch", "value": ef, "recall": recall_at(ids, gt_ids), "batched_ms": ms})
    apply_search_params(index, spec)
    return rows


def cpu_s() -> float:
    """CPU seconds of this process (all threads) and its finished children."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def run_size(n_songs: int, types: tuple[str, ...], real: RealSet, dist: Distractors, workdir: Path) -> tuple[list[dict], dict]:
    """Build every type for a catalog of n_songs chunk by chunk; measure each (rows) and the catalog."""
    dim = real.queries.shape[1]
    queries = np.ascontiguousarray(real.queries, dtype=np.float32)
    n_vectors = sum(len(v) for v in real.ref_vectors) + (n_songs - len(real.ref_vectors)) * SEGMENTS_PER_SONG
    specs = {t: spec_for(t, dim, n_vectors) for t in types}
    indexes = {t: make_index(s, dim) for t, s in specs.items()}
    build = {t: {"wall": 0.0, "cpu": 0.0} for t in types}
    # training sample: the first vectors of the catalog (real songs, then distractors)
    need = max([len(training_sample(np.empty((n_vectors, 0)), s)) for s in specs.values()] + [1])
    sample, have = [], 0
    for _, x in catalog_chunks(real, dist, n_songs):
        sample.append(x[: need - have])
        have += len(sample[-1])
        if have >= need:
            break
    sample = np.concatenate(sample)
    shared_centroids: dict[int, np.ndarray] = {}  # nlist -> coarse centroids trained once per size
    for t, index in indexes.items():
        if index.is_trained:
            continue
        w0, c0 = time.perf_counter(), cpu_s()
        ivf = faiss.downcast_index(index)
        nlist = specs[t].nlist
        if isinstance(ivf, faiss.IndexIVF) and nlist in shared_centroids:
            ivf.quantizer.add(shared_centroids[nlist])  # same coarse k-means for every plain IVF of this size
        train_index(index, specs[t], training_sample(sample, specs[t], SEED), SEED)
        centroids = ivf_centroids(index)
        if centroids is not None:
            shared_centroids.setdefault(nlist, centroids)
        build[t]["wall"] += time.perf_counter() - w0
        build[t]["cpu"] += cpu_s() - c0
    del sample
    gt = (np.full((len(queries), 0), -np.inf, dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64))
    gen_s = 0.0
    t_gen = time.perf_counter()
    for first, x in catalog_chunks(real, dist, n_songs):
        gen_s += time.perf_counter() - t_gen
        gt = exact_update(gt, queries, first, x)
        lists: dict[int, tuple[np.ndarray, float, float]] = {}  # nlist -> (assignment, wall s, cpu s)
        for t, index in indexes.items():
            centroids = ivf_centroids(index)
            nlist = specs[t].nlist
            if centroids is not None and nlist not in lists:  # once per chunk for the IVFs sharing centroids
                w0, c0 = time.perf_counter(), cpu_s()
                assignment = assign_lists(centroids, x)
                lists[nlist] = (assignment, time.perf_counter() - w0, cpu_s() - c0)
            w0, c0 = time.perf_counter(), cpu_s()
            add_vectors(index, x, lists[nlist][0] if centroids is not None else None)
            # each IVF is charged the full assignment time, as if it were built alone
            build[t]["wall"] += time.perf_counter() - w0 + (lists[nlist][1] if centroids is not None else 0.0)
            build[t]["cpu"] += cpu_s() - c0 + (lists[nlist][2] if centroids is not None else 0.0)
        log.info("%d songs: vectors up to %d added", n_songs, first + len(x))
        t_gen = time.perf_counter()
    gt_scores, gt_ids = gt
    exact_top1 = top1_correct(gt_scores, gt_ids, real)
    queries_path = workdir / "queries.npy"
    np.save(queries_path, queries)
    rows = []
    for t in list(indexes):
        index, spec = indexes.pop(t), specs[t]  # each index is freed once measured
        assert index.ntotal == n_vectors, (t, index.ntotal, n_vectors)
        sweep = param_sweep(index, spec, queries, gt_ids)
        single = single_latencies_ms(index, queries)
        ms, scores, ids = batched_ms(index, queries)
        path = workdir / f"{t}-{n_songs}.faiss"
        faiss.write_index(index, str(path))
        size = path.stat().st_size
        rss_mmap = load_rss(path, True, queries_path)
        rss_read = load_rss(path, False, queries_path) if size < 6 * GIB else {"skipped": "file > 6 GiB"}
        path.unlink()
        rows.append(
            {
                "songs": n_songs,
                "vectors": n_vectors,
                "type": t,
                "spec": spec.to_settings(),
                "build_wall_s": build[t]["wall"],
                "build_cpu_s": build[t]["cpu"],
                "file_gib": size / GIB,
                "rss_mmap": rss_mmap,
                "rss_read": rss_read,
                "single_ms_p50": float(np.median(single)),
                "single_ms_p99": float(np.percentile(single, 99)),
                "batched_ms": ms,
                "recall10": recall_at(ids, gt_ids),
                "top1": top1_correct(scores, ids, real),
                "sweep": sweep,
                "load": os.getloadavg(),
            }
        )
        log.info("%s", {k: v for k, v in rows[-1].items() if k != "sweep"})
    catalog = {"songs": n_songs, "vectors": n_vectors, "exact_top1": exact_top1, "generate_s": gen_s}
    return rows, catalog


# ---------------------------------------------------------------- report


def quantiles(x: np.ndarray) -> str:
    return " / ".join(f"{q:.3f}" for q in np.quantile(x, [0.05, 0.5, 0.95, 1.0]))


def plot_scores(resemblance: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(resemblance)
    for ax, (a, b) in zip(axes, zip(names[::2], names[1::2])):
        bins = np.linspace(min(resemblance[a].min(), resemblance[b].min()), max(resemblance[a].max(), resemblance[b].max()), 40)
        ax.hist(resemblance[a], bins, alpha=0.55, density=True, label="real")
        ax.hist(resemblance[b], bins, alpha=0.55, density=True, label="synthetic")
        ax.set_title(a.replace(" (real songs)", "").replace(" (real)", ""), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Real vs synthetic distractor score distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall_latency(rows: list[dict], path: Path) -> None:
    sizes = sorted({r["songs"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in [r for r in rows if r["songs"] == n]:
            colour = f"C{INDEX_TYPES.index(r['type'])}"  # one colour per type across the panels
            if r["sweep"]:
                ax.plot([s["batched_ms"] for s in r["sweep"]], [s["recall"] for s in r["sweep"]], "o-", ms=3, color=colour, label=r["type"])
            else:
                ax.plot([r["batched_ms"]], [r["recall10"]], "s", color=colour, label=r["type"])
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (batched search, 2 threads)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{n:,} songs")
        ax.legend(fontsize=7)
    fig.suptitle("Recall against latency over nprobe (IVF) / efSearch (HNSW)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_build_memory(rows: list[dict], path: Path) -> None:
    types = [t for t in INDEX_TYPES if any(r["type"] == t for r in rows)]
    sizes = sorted({r["songs"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    figures = (("build_cpu_s", "build CPU s"), ("rss", "RSS after mmap load + search (GiB)"), ("single_ms_p50", "single-query ms (median)"))
    for ax, (key, label) in zip(axes, figures):
        for t in types:
            pts = [(r["songs"], r["rss_mmap"].get("rss_search_gib", np.nan) if key == "rss" else r[key]) for r in rows if r["type"] == t]
            ax.plot(*zip(*pts), "o-", label=t)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.set_xlabel("catalog songs")
        ax.set_title(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_rss(r: dict) -> str:
    if "rss_load_gib" not in r:
        return r.get("skipped") or r.get("error", "?")
    return f"{r['rss_load_gib']:.2f} / {r['rss_search_gib']:.2f}"


def fmt_params(spec: dict) -> str:
    parts = [f"nprobe {spec['nprobe']}" if spec["nprobe"] else "", f"efSearch {spec['ef_search']}" if spec["ef_search"] else ""]
    return f"`{spec['factory']}` {' '.join(p for p in parts if p)}".strip()


def extrapolate_1m(rows: list[dict], catalogs: list[dict]) -> list[str]:
    """Lines judging the 1M-song targets by linear scaling of the largest size run (when 1M was not run)."""
    if any(c["songs"] >= 1_000_000 for c in catalogs):
        return []
    top = max(c["songs"] for c in catalogs)
    scale = 1_000_000 * SEGMENTS_PER_SONG / max(r["vectors"] for r in rows if r["songs"] == top)
    lines = [
        "",
        f"### 1M songs: not run; linear extrapolation from {top:,} songs (x{scale:.1f} vectors, same share of lists scanned)",
        "",
        (
            "The 1M sweep (`--sizes 1000000`) did not fit the session on the shared cores. Targets: < 5 ms per query, "
            "recall@10 >= 0.95, < 8 GiB. Memory and IVF scan cost grow linearly with the vectors at a fixed share of lists scanned:"
        ),
        "",
        "| type | file GiB | single ms p50 | recall@10 measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in [r for r in rows if r["songs"] == top]:
        gib, ms = r["file_gib"] * scale, r["single_ms_p50"] * scale
        misses = [
            f"memory {gib / 8:.1f}x over" if gib > 8 else "",
            f"latency {ms / 5:.0f}x over" if ms > 5 else "",
            f"recall {r['recall10']:.2f}" if r["recall10"] < 0.95 else "",
        ]
        lines.append(
            f"| {r['type']} | {gib:.1f} | {ms:.0f} | {r['recall10']:.3f} | {', '.join(m for m in misses if m) or 'meets all three'} |"
        )
    return lines


def to_markdown(ctx: dict, rows: list[dict], catalogs: list[dict], resemblance: dict) -> str:
    real = ctx["real"]
    speed = real["audio_s"] / real["build_cpu_s"]
    lines = [
        SECTION,
        "",
        (
            f"Date: {ctx['date']} · model {ctx['model_hash']} · machine: {ctx['machine']} · FAISS {faiss.__version__}, {ctx['threads']} OpenMP threads · "
            f"load average at start {ctx['load_start']} and end {ctx['load_end']} (other jobs shared the 2 cores, so wall times are pessimistic) · "
            f"command: `{ctx['command']}` · total {ctx['total_wall_s'] / 60:.1f} min wall, {ctx['total_cpu_s'] / 60:.1f} min CPU"
        ),
        "",
        (
            f"Real songs: version 0 of {real['songs']} validation cover groups (never trained on), {real['vectors']} segment vectors "
            f"({real['vectors'] / real['songs']:.1f} per song: 20-s segments every 10 s plus the whole track). "
            f"Queries: {real['queries']} other versions of the same groups (covers), one {ctx['query_s']:g}-s excerpt each at a seeded offset. "
            f"The catalog is filled with synthetic distractor songs of {SEGMENTS_PER_SONG} vectors: centre ~ Gaussian fitted to the real "
            f"song means (mean + top {RANK} PCA directions + isotropic rest), plus per-segment deviations ~ Gaussian fitted the same way to the "
            "real within-song deviations, L2-normalised; generated in seeded chunks of "
            f"{CHUNK_SONGS:,} songs, never held whole. Exact ground truth is a chunked brute-force top-{TOP_K}."
        ),
        "",
        "### Index build speed (coverwatch.index_builder.build.build_index on real rendered references)",
        "",
        f"{real['audio_s']:.0f} s of reference audio ({real['songs']} FLAC files) embedded and indexed in {real['build_cpu_s']:.1f} CPU s "
        f"({real['build_wall_s']:.1f} s wall): **{speed:.1f}x real time per CPU second** (target >= 50x: "
        + ("met)." if speed >= 50 else f"missed by {50 / speed:.1f}x)."),
        "",
        "### Do the synthetic distractors look like real songs?",
        "",
        "Quantiles p5 / p50 / p95 / max (plot: `index_synthetic_scores.png`):",
        "",
        "| distribution | real | synthetic |",
        "|---|---|---|",
    ]
    names = list(resemblance)
    for a, b in zip(names[::2], names[1::2]):
        lines.append(f"| {a.split(' (')[0]} | {quantiles(resemblance[a])} | {quantiles(resemblance[b])} |")
    lines += [
        "",
        "### Sweep (default search parameters of each type)",
        "",
        (
            "Build = train on a sample + add chunk by chunk (IVFs of one size share one coarse k-means, but each is charged the full "
            "list-assignment time). File = serialized index. RSS = peak resident memory of a fresh process that loads the file "
            "memory-mapped (`faiss.IO_FLAG_MMAP`) / then searches all queries once; 'read' = loaded without mmap. Latency: k = "
            f"{TOP_K}; single = one query per call; batched = all queries in one call, per query. recall@10 = share of the exact top-10 "
            "vector ids found. top-1 = the query's own song ranks first by best vector score (exact search in brackets)."
        ),
        "",
        "| songs | vectors | type | index | build wall / CPU s | file GiB | RSS mmap load / search GiB | RSS read load / search GiB | single ms p50 / p99 | batched ms/q | recall@10 | top-1 (exact) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    exact = {c["songs"]: c["exact_top1"] for c in catalogs}
    for r in rows:
        lines.append(
            f"| {r['songs']:,} | {r['vectors']:,} | {r['type']} | {fmt_params(r['spec'])} | {r['build_wall_s']:.1f} / {r['build_cpu_s']:.1f} | "
            f"{r['file_gib']:.3f} | {fmt_rss(r['rss_mmap'])} | {fmt_rss(r['rss_read'])} | {r['single_ms_p50']:.2f} / {r['single_ms_p99']:.2f} | "
            f"{r['batched_ms']:.3f} | {r['recall10']:.3f} | {r['top1']:.3f} ({exact[r['songs']]:.3f}) | {r['load'][0]:.1f} |"
        )
    for c in catalogs:
        if SKIPPED.get(c["songs"]):
            lines += ["", f"Not built at {c['songs']:,} songs:", ""]
            lines += [f"* {t}: {why}" for t, why in SKIPPED[c["songs"]].items()]
    lines += extrapolate_1m(rows, catalogs)
    lines += [
        "",
        "### Search-parameter sweeps (plot: `index_recall_latency.png`)",
        "",
        "| songs | type | parameter | value | recall@10 | batched ms/q |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in r["sweep"]:
            lines.append(f"| {r['songs']:,} | {r['type']} | {s['param']} | {s['value']} | {s['recall']:.3f} | {s['batched_ms']:.3f} |")
    lines += [
        "",
        "### What `--type auto` picks (streamer/search/index_types.py)",
        "",
        "| songs | vectors | auto picks | measured here |",
        "|---|---|---|---|",
    ]
    for c in catalogs:
        spec = spec_for("auto", ctx["dim"], c["vectors"])
        match = [r for r in rows if r["songs"] == c["songs"] and r["type"] == spec.index_type]
        got = "not built at this size"
        if match:
            r = match[0]
            got = f"recall@10 {r['recall10']:.3f}, single {r['single_ms_p50']:.2f} ms, RSS {fmt_rss(r['rss_mmap'])} GiB, build {r['build_cpu_s']:.0f} CPU s"
            setting = spec.nprobe or spec.ef_search
            swept = [p for p in r["sweep"] if p["value"] == setting]
            if r["spec"] != spec.to_settings() and swept:  # measured with other search parameters: use the sweep's point
                got = f"recall@10 {swept[0]['recall']:.3f}, batched {swept[0]['batched_ms']:.2f} ms/q (sweep), build {r['build_cpu_s']:.0f} CPU s"
        lines.append(f"| {c['songs']:,} | {c['vectors']:,} | {fmt_params(spec.to_settings())} ({spec.index_type}) | {got} |")
    lines += ["", "Plots: `index_recall_latency.png`, `index_build_memory.png`, `index_synthetic_scores.png`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(PLAN))
    parser.add_argument("--types", nargs="+", default=None, help="only these index types (default: PLAN per size)")
    parser.add_argument("--groups", type=int, default=120, help="real validation cover groups (references + queries)")
    parser.add_argument("--query-s", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--covers", type=Path, default=COVERS)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch for index files (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plots alone")
    parser.add_argument("--report-only", action="store_true", help="re-render the last run's measurements (after editing index_types)")
    parser.add_argument("--keep-other-sizes", action="store_true", help="report the last run's rows for sizes not measured now beside the new ones")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    faiss.omp_set_num_threads(args.threads)
    load_start = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), cpu_s()
    if args.report_only:  # the real embeddings of the model the last run measured
        last = json.loads((CACHE / "last_rows.json").read_text())
        real = load_real(real_cache(last["ctx"]["model_hash"], args.groups, args.query_s))
    else:
        embedder = Embedder(DEFAULT_MODEL_DIR, args.threads)
        real = real_set(args.covers, args.groups, args.query_s, embedder)
    dist = Distractors.fit(real.ref_vectors)
    resemblance = score_resemblance(real, dist)
    for name, x in resemblance.items():
        log.info("%-40s p5/p50/p95/max %s", name, quantiles(x))
    if args.report_only:
        write_report(last["ctx"], last["rows"], last["catalogs"], resemblance, args.no_write)
        return
    rows, catalogs = [], []
    if args.keep_other_sizes and (CACHE / "last_rows.json").exists():  # e.g. add the 1M run to an earlier 10k/100k one
        last = json.loads((CACHE / "last_rows.json").read_text())
        rows = [r for r in last["rows"] if r["songs"] not in args.sizes]
        catalogs = [c for c in last["catalogs"] if c["songs"] not in args.sizes]
        log.info("keeping the last run's rows for %s songs (measured %s, model %s)", sorted({r["songs"] for r in rows}), last["ctx"]["date"], last["ctx"]["model_hash"])
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            types = tuple(t for t in PLAN.get(n, INDEX_TYPES) if args.types is None or t in args.types)
            size_rows, catalog = run_size(n, types, real, dist, Path(tmp))
            rows += size_rows
            catalogs.append(catalog)
            # reported after every size, so a long run that is stopped still leaves what it measured
            report(args, embedder.info.model_hash, real, resemblance, rows, catalogs, load_start, wall0, cpu0)


def report(
    args: argparse.Namespace,
    model_hash: str,
    real: RealSet,
    resemblance: dict,
    rows: list[dict],
    catalogs: list[dict],
    load_start,
    wall0: float,
    cpu0: float,
) -> None:
    """Print the section; unless --no-write, write it into RESULTS.md with the plots."""
    ctx = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "threads": args.threads,
        "model_hash": model_hash,
        "load_start": " ".join(f"{x:.1f}" for x in load_start),
        "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": "python " + " ".join(["bench/bench_index.py", *sys.argv[1:]]),
        "query_s": args.query_s,
        "dim": real.queries.shape[1],
        "total_wall_s": time.perf_counter() - wall0,
        "total_cpu_s": cpu_s() - cpu0,
        "real": {
            "songs": len(real.ref_vectors),
            "vectors": int(sum(len(v) for v in real.ref_vectors)),
            "queries": len(real.queries),
            "audio_s": float(real.audio_s),
            "build_cpu_s": float(real.build_cpu_s),
            "build_wall_s": float(real.build_wall_s),
        },
    }
    (CACHE / "last_rows.json").write_text(json.dumps({"ctx": ctx, "rows": rows, "catalogs": catalogs}, indent=1, default=float))
    write_report(ctx, rows, catalogs, resemblance, args.no_write)


def write_report(ctx: dict, rows: list[dict], catalogs: list[dict], resemblance: dict, no_write: bool) -> None:
    markdown = to_markdown(ctx, rows, catalogs, resemblance)
    print(markdown)
    if not no_write:
        plot_scores(resemblance, BENCH_DIR / "index_synthetic_scores.png")
        plot_recall_latency(rows, BENCH_DIR / "index_recall_latency.png")
        plot_build_memory(rows, BENCH_DIR / "index_build_memory.png")
        write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
