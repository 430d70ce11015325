"""The two_stage index (streamer/search/two_stage.py) on bench_index.py's catalogs: songs first, then segments.

Same catalog and queries as bench/bench_index.py (real leave-out or validation songs + synthetic
distractors of 10 segments, 20-s cover excerpts as queries; exact ground truth by chunked
brute force), so its rows sit beside the IVF-SQ8 row of the "Index types" section. The catalog
is built chunk by chunk, never held as float32: per chunk, song vectors and residual codes with
a quantiser fitted on the first chunks; then one HNSW graph over the song vectors.

Prints and records in bench/RESULTS.md (section "Two-stage search").

Usage: nice -n 5 python bench/bench_two_stage.py --covers /work/sim/leaveout --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
from bench_index import (  # bench/bench_index.py, beside this script
    Distractors,
    batched_ms,
    catalog_chunks,
    cpu_s,
    exact_update,
    real_set,
    recall_at,
    single_latencies_ms,
    top1_correct,
    vector_song,
)
from report import publish, run_context

from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.index_types import (
    TWO_STAGE_CANDIDATES,
    TWO_STAGE_EF_CONSTRUCTION,
    TWO_STAGE_EF_SEARCH,
    TWO_STAGE_LARGE_CANDIDATES,
    TWO_STAGE_LARGE_EF_SEARCH,
    TWO_STAGE_LARGE_VECTORS,
    spec_for,
    two_stage_params,
)
from coverwatch.streamer.search.two_stage import ResidualQuantizer, TwoStageIndex, song_codes, song_graph

log = logging.getLogger("bench_two_stage")

SECTION = "## Two-stage search (bench/bench_two_stage.py)"
SWEEP = ((128, 50), (256, 50), (256, 100), (256, 200), (320, 120), (384, 150), (512, 200))  # (efSearch, candidates)
GIB = 2**30


def timed_graph(songs: np.ndarray, n_vectors: int, ef_construction: int) -> tuple[faiss.Index, float, float]:
    """The shipped stage-1 graph of (S, D) song vectors, but built with `ef_construction`; its build wall and CPU s."""
    params = dataclasses.replace(two_stage_params(spec_for("two_stage", songs.shape[1], n_vectors)), ef_construction=ef_construction)
    w0, c0 = time.perf_counter(), cpu_s()
    graph = song_graph(songs, params)
    return graph, time.perf_counter() - w0, cpu_s() - c0


def build(real, dist: Distractors, n_songs: int, queries: np.ndarray, ef_construction: int) -> tuple[TwoStageIndex, tuple, dict]:
    """Chunked build + exact ground truth; returns the index, (gt scores, gt ids), build timings."""
    gt = (np.full((len(queries), 0), -np.inf, dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64))
    songs, codes, rows = [], [], []
    quantizer: ResidualQuantizer | None = None
    encode_cpu = exact_wall = 0.0
    pending: list[tuple[int, np.ndarray]] = []
    for first, x in catalog_chunks(real, dist, n_songs):
        e0 = time.perf_counter()
        gt = exact_update(gt, queries, first, x)
        exact_wall += time.perf_counter() - e0
        pending.append((first, x))
        if quantizer is None and len(pending) < 2 and n_songs > len(real.ref_vectors):
            continue  # fit the quantiser on the real songs and the first distractor chunk together
        c0 = cpu_s()
        if quantizer is None:
            both = np.concatenate([p[1] for p in pending])
            ids = np.arange(len(both))
            owner = vector_song(ids, real)
            _, _, quantizer = song_codes(both, owner, int(owner.max()) + 1)
        for first_id, chunk in pending:
            owner = vector_song(np.arange(first_id, first_id + len(chunk)), real)
            base = int(owner.min())
            s, c, _ = song_codes(chunk, owner - base, int(owner.max()) + 1 - base, quantizer)
            songs.append(s)
            codes.append(c)
            rows.append(owner.astype(np.int32))
        encode_cpu += cpu_s() - c0
        pending = []
        log.info("%d songs: vectors up to %d encoded", n_songs, first + len(x))
    graph, graph_wall, graph_cpu = timed_graph(np.concatenate(songs), sum(len(c) for c in codes), ef_construction)
    del songs
    index = TwoStageIndex(graph, np.concatenate(codes), quantizer, np.concatenate(rows), spec_for("two_stage", graph.d, sum(len(c) for c in codes)).candidates)
    timing = {"encode_cpu_s": encode_cpu, "graph_wall_s": graph_wall, "graph_cpu_s": graph_cpu}
    return index, gt, {**timing, "exact_ms_per_query": 1000 * exact_wall / max(1, len(queries))}


def measure(n_songs: int, real, dist: Distractors, ef_constructions: list[int]) -> dict:
    queries = np.ascontiguousarray(real.queries, dtype=np.float32)
    index, (gt_scores, gt_ids), timing = build(real, dist, n_songs, queries, ef_constructions[0])
    songs = index.song_index.reconstruct_n(0, index.n_songs)
    sweep, graph_s = [], {ef_constructions[0]: (timing["graph_wall_s"], timing["graph_cpu_s"])}
    for ef_construction in ef_constructions:
        if ef_construction not in graph_s:  # the first graph came with the build
            index.song_index, *graph_s[ef_construction] = timed_graph(songs, index.ntotal, ef_construction)
        for ef, cand in SWEEP:
            index.song_index.hnsw.efSearch, index.candidates = ef, cand
            ms, scores, ids = batched_ms(index, queries)
            single = single_latencies_ms(index, queries)
            sweep.append(
                {
                    "ef_construction": ef_construction,
                    "ef": ef,
                    "candidates": cand,
                    "recall10": recall_at(ids, gt_ids),
                    "top1": top1_correct(scores, ids, real),
                    "single_p50": float(np.median(single)),
                    "single_p99": float(np.percentile(single, 99)),
                    "batched_ms": ms,
                }
            )
            log.info("%s", sweep[-1])
    graph_bytes = len(faiss.serialize_index(index.song_index))
    timing["graph_s"] = graph_s
    return {
        "songs": n_songs,
        "vectors": index.ntotal,
        "exact_top1": top1_correct(gt_scores, gt_ids, real),
        "codes_gib": index.codes.nbytes / GIB,
        "graph_gib": graph_bytes / GIB,
        "sweep": sweep,
        "load": os.getloadavg(),
        **timing,
    }


def to_markdown(ctx: dict, results: list[dict]) -> str:
    lines = [
        SECTION,
        "",
        (
            f"Date: {ctx['date']} · model {ctx['model_hash']} · {ctx['machine']} · FAISS {faiss.__version__}, 2 OpenMP threads · "
            f"command: `{ctx['command']}` · total {ctx['wall_s'] / 60:.1f} min wall"
        ),
        "",
        (
            f"Catalog and queries as in \"Index types\" ({ctx['real_songs']} real songs from `{ctx['covers']}`, "
            f"{ctx['queries']} 20-s cover excerpts as queries, synthetic distractors of 10 segments). Stage 1: HNSW32 over one "
            "vector a song (normalised mean of its segments); stage 2: every segment of the candidate songs scored from 8-bit "
            "residual codes. recall@10 = share of the exact top-10 segment ids found (exact = brute force over float32). "
            f"Shipped default (bold): graph efConstruction {TWO_STAGE_EF_CONSTRUCTION}; efSearch {TWO_STAGE_EF_SEARCH} and "
            f"{TWO_STAGE_CANDIDATES} candidates, {TWO_STAGE_LARGE_EF_SEARCH} and {TWO_STAGE_LARGE_CANDIDATES} from "
            f"{TWO_STAGE_LARGE_VECTORS / 1e6:g}M vectors on. Latency: single = one query a call; "
            "batched = all queries in one call, per query. Graph build wall s per efConstruction: "
            + "; ".join(f"{r['songs']:,} songs: " + ", ".join(f"{e} -> {w:.0f} s" for e, (w, _) in r["graph_s"].items()) for r in ctx["results"])
        ),
        "",
        "| songs | vectors | efConstruction | efSearch | candidates | recall@10 | top-1 (exact) | single ms p50 / p99 | batched ms/q |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        default = spec_for("two_stage", 512, r["vectors"])
        for s in r["sweep"]:
            shipped = (s["ef_construction"], s["ef"], s["candidates"]) == (TWO_STAGE_EF_CONSTRUCTION, default.ef_search, default.candidates)
            mark = "**" if shipped else ""
            lines.append(
                f"| {r['songs']:,} | {r['vectors']:,} | {s['ef_construction']} | {s['ef']} | {s['candidates']} | {mark}{s['recall10']:.3f}{mark} | "
                f"{s['top1']:.3f} ({r['exact_top1']:.3f}) | {mark}{s['single_p50']:.2f}{mark} / {s['single_p99']:.2f} | {s['batched_ms']:.3f} |"
            )
    lines += ["", "| songs | segment codes GiB (memory-mapped) | song graph GiB (in memory) | build: encode CPU s / graph wall s (CPU s) |", "|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['songs']:,} | {r['codes_gib']:.2f} | {r['graph_gib']:.2f} | {r['encode_cpu_s']:.0f} / {r['graph_wall_s']:.0f} ({r['graph_cpu_s']:.0f}) |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--groups", type=int, default=120)
    parser.add_argument("--covers", type=Path, required=True, help="a cover dataset folder (manifest.csv, split val)")
    parser.add_argument("--ef-construction", type=int, nargs="+", default=[TWO_STAGE_EF_CONSTRUCTION], help="song-graph build beams to compare")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    faiss.omp_set_num_threads(2)
    wall0 = time.perf_counter()
    embedder = Embedder(DEFAULT_MODEL_DIR, 2)
    real = real_set(args.covers, args.groups, 20.0, embedder)
    dist = Distractors.fit(real.ref_vectors)
    results = []
    for n in args.sizes:
        results.append(measure(n, real, dist, args.ef_construction))
        ctx = {
            **run_context("bench_two_stage.py", embedder.info.model_hash, wall0),
            "real_songs": len(real.ref_vectors),
            "queries": len(real.queries),
            "covers": str(args.covers),
            "results": results,
        }
        markdown = to_markdown(ctx, results)
        publish(SECTION, markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
