"""What a sharded catalog (streamer/search/shards.py) costs a search against one index in-process.

One catalog is indexed whole and as N shards (`index build --shard I/N`); each shard is served
by its own `coverwatch shard serve` process on 127.0.0.1 and searched through a catalog file,
as a daemon would. Timed: the daemon's search call (`best_per_song_grouped`) for one decision
(the 3 windows of one hop) and for a Kafka poll batch's decisions (50 chunks of 0.5 s = 10
hops = 30 windows), with real window embeddings of the catalog's own audio; and one song's
chroma fetched from its shard (uncached). All processes share the machine's cores, so this
measures the fan-out's overhead (HTTP, .npz, merge), not the capacity that separate hosts add.

Prints and records in bench/RESULTS.md (section "Sharded catalog").

Usage: python bench/bench_shards.py --refs /work/sim/SIM/catalog/refs.csv --shards 2 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from report import publish  # bench/report.py, beside this script

from coverwatch.index_builder.build import build_index
from coverwatch.index_builder.refs import keep_shard, read_refs
from coverwatch.streamer.config import IndexBuildConfig, IndexConfig, StreamConfig
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.audio import seconds_to_frames
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.shards import ShardedCatalog, write_catalog
from coverwatch.streamer.search.store import load_index

log = logging.getLogger("bench_shards")
SECTION = "## Sharded catalog (bench/bench_shards.py)"
BATCH_HOPS = 10  # a Kafka poll of 50 chunks of 0.5 s = 25 s of audio = 10 hops of 2.5 s
REPEATS = 200


def window_queries(embedder: Embedder, refs, cfg: StreamConfig, n_hops: int) -> np.ndarray:
    """(n_hops * windows, D) embeddings of `cfg.windows_s` windows ending at hops of the catalog's audio."""
    frames = np.concatenate([embedder.cqt_whole(load_audio(r.path)) for r in refs[:8]])
    longest = seconds_to_frames(max(cfg.windows_s))
    ends = np.linspace(longest, len(frames), n_hops).astype(int)
    windows = [(h, frames[end - seconds_to_frames(w) : end]) for h, end in enumerate(ends) for w in cfg.windows_s]
    queries, _ = embedder.embed_windows(windows, 8)
    return queries.astype(np.float32)


def timed_ms(search, queries: np.ndarray, per_call: int, k: int) -> np.ndarray:
    """ms per call of search(queries of one call, groups, n_groups, k), cycling through `queries`."""
    n_windows = len(queries) // BATCH_HOPS  # windows per hop
    out = []
    for i in range(REPEATS):
        first = (i * per_call) % (len(queries) - per_call + 1)
        batch = queries[first : first + per_call]
        groups = np.arange(len(batch)) // n_windows
        t0 = time.perf_counter()
        search(batch, groups, int(groups.max()) + 1, k)
        out.append((time.perf_counter() - t0) * 1000)
    return np.array(out)


def start_shard(index_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "coverwatch", "shard", "serve", str(index_dir), "--port", "0"], stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())["url"]


def measure(label: str, search, queries: np.ndarray, k: int, windows: int) -> dict:
    search(queries[:windows], np.zeros(windows, int), 1, k)  # warm: connections, pages
    one = timed_ms(search, queries, windows, k)
    batch = timed_ms(search, queries, windows * BATCH_HOPS, k)
    row = {"catalog": label, "one_p50": np.median(one), "one_p99": np.percentile(one, 99), "batch_p50": np.median(batch), "batch_p99": np.percentile(batch, 99)}
    log.info("%s", row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refs", type=Path, required=True, help="a refs CSV or folder (the catalog to shard)")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    wall0 = time.perf_counter()
    cfg = StreamConfig()
    faiss.omp_set_num_threads(IndexConfig().threads)  # as the daemon and the shard servers: idle OpenMP threads spin on the cores the servers need
    embedder = Embedder(DEFAULT_MODEL_DIR, 2)
    refs = read_refs(args.refs)
    queries = window_queries(embedder, refs, cfg, 4 * BATCH_HOPS)
    windows = len(cfg.windows_s)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole"
        build_index(refs, whole, embedder, IndexBuildConfig(), cfg)
        store = load_index(whole)
        rows.append(measure("one index, in-process", store.best_per_song_grouped, queries, cfg.top_k, windows))
        for n in args.shards:
            procs, urls = [], []
            for i in range(n):
                shard_dir = Path(tmp) / f"shard{n}-{i}"
                build_index(keep_shard(refs, f"{i}/{n}"), shard_dir, embedder, IndexBuildConfig(), cfg)
                proc, url = start_shard(shard_dir)
                procs.append(proc)
                urls.append(url)
            try:
                write_catalog(Path(tmp) / "catalog.json", urls)
                catalog = ShardedCatalog(Path(tmp) / "catalog.json", embedder.info.model_hash)
                row = measure(f"{n} shard servers, one process each", catalog.best_per_song_grouped, queries, cfg.top_k, windows)
                chroma_ms = []
                for r in range(len(catalog.songs)):
                    t0 = time.perf_counter()
                    catalog.song_chroma(r)  # first fetch of each song: not cached
                    chroma_ms.append((time.perf_counter() - t0) * 1000)
                row["chroma_p50"] = float(np.median(chroma_ms))
                rows.append(row)
                catalog.close()
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    lines = [
        SECTION,
        "",
        f"Date: {datetime.date.today().isoformat()} · model {embedder.info.model_hash} · {os.uname().machine}, {os.cpu_count()} cores · "
        f"command: `python {' '.join(['bench/bench_shards.py', *sys.argv[1:]])}` · {time.perf_counter() - wall0:.0f} s wall",
        "",
        f"{len(refs)} catalog songs ({store.n_vectors} vectors, flat); queries: real {'/'.join(f'{w:g}' for w in cfg.windows_s)}-s window "
        f"embeddings of catalog audio, k = {cfg.top_k}. One decision = {windows} windows; a poll batch = {BATCH_HOPS} hops = "
        f"{windows * BATCH_HOPS} windows in one call. {REPEATS} calls each; shard servers on 127.0.0.1, on the same 2 cores as the caller.",
        "",
        "| catalog | one decision ms p50 / p99 | poll batch ms p50 / p99 | one song's chroma, first fetch ms p50 |",
        "|---|---|---|---|",
    ]
    for r in rows:
        chroma = f"{r['chroma_p50']:.2f}" if "chroma_p50" in r else "in memory"
        lines.append(f"| {r['catalog']} | {r['one_p50']:.2f} / {r['one_p99']:.2f} | {r['batch_p50']:.2f} / {r['batch_p99']:.2f} | {chroma} |")
    markdown = "\n".join(lines) + "\n"
    publish(SECTION, markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
