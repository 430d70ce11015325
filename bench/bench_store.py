"""The on-disk index format at catalog scale: what `save_index` and `load_index` cost for
10k, 100k and 1M songs (10 segment vectors each), against the format-1 layout that kept
the vector table as JSON inside manifest.json.

The FAISS part is a PQ index with 8-byte codes filled with random unit vectors: the store's
own cost (manifest, vector table, checksums) does not depend on the FAISS type, and a small
FAISS file keeps a 10M-vector run within memory and minutes. What the real FAISS file adds
(sha256 check and read) grows with its size; the sha256 rate measured here, applied to the
4.85 GiB IVF-SQ8 of a 1M-song catalog (bench_index.py), gives that share.

Format 1 is measured by doing what its code did (JSON rows [song, start, end] rounded to
3 decimals, json.dumps with indent=1; json.loads and np.asarray on load) for the sizes
where it fits in memory comfortably (up to --json-max-songs); beyond, its line is empty.

Usage: python bench/bench_store.py [--songs 10000 100000 1000000] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from report import write_section  # bench/report.py, beside this script

from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR, load_model_info, sha256_file
from coverwatch.streamer.search.store import IndexStore, SongEntry, load_index, save_index

SEGMENTS_PER_SONG = 10  # as bench_index.py
DIM = 512
ADD_CHUNK = 200_000  # vectors generated and added per step (~400 MB of float32)
IVF_SQ8_1M_GIB = 4.85  # the 1M-song IVF-SQ8 file of bench_index.py
SECTION = "## Index store at catalog scale (bench/bench_store.py)"


def filled_pq_index(n_vectors: int, rng: np.random.Generator) -> faiss.Index:
    """A trained PQ8 index holding n_vectors random unit vectors."""
    index = faiss.IndexPQ(DIM, 8, 8, faiss.METRIC_INNER_PRODUCT)
    train = rng.standard_normal((20_000, DIM)).astype(np.float32)
    faiss.normalize_L2(train)
    index.train(train)
    for start in range(0, n_vectors, ADD_CHUNK):
        chunk = rng.standard_normal((min(ADD_CHUNK, n_vectors - start), DIM)).astype(np.float32)
        faiss.normalize_L2(chunk)
        index.add(chunk)
    return index


def synthetic_store(n_songs: int, index: faiss.Index, model_hash: str) -> IndexStore:
    songs = [
        SongEntry(f"song{i:07d}", f"Title of song {i}", f"/catalog/audio/{i:07d}.flac", {"artist": f"artist {i % 5000}"})
        for i in range(n_songs)
    ]
    vector_song = np.repeat(np.arange(n_songs, dtype=np.int32), SEGMENTS_PER_SONG)
    starts = np.tile(np.arange(SEGMENTS_PER_SONG, dtype=np.float32) * 10.0, n_songs)
    spans = np.stack([starts, starts + 20.0], axis=1)
    no_chroma = (np.zeros((0, 12), np.float16), np.zeros(n_songs + 1, np.int64))  # the bench measures vectors and manifest
    return IndexStore(index, songs, vector_song, spans, model_hash, {"index_type": "pq8-bench"}, {}, *no_chroma)


def format1_costs(store: IndexStore, folder: Path) -> dict:
    """Write and read the format-1 vector table (JSON rows in the manifest)."""
    started = time.perf_counter()
    rows = [[int(s), round(float(a), 3), round(float(b), 3)] for s, (a, b) in zip(store.vector_song, store.vector_span)]
    text = json.dumps({"songs": [vars(s) for s in store.songs], "vectors": rows}, indent=1)
    path = folder / "format1.json"
    path.write_text(text)
    save_s = time.perf_counter() - started
    del rows, text
    started = time.perf_counter()
    manifest = json.loads(path.read_text())
    vectors = np.asarray(manifest["vectors"], dtype=np.float64).reshape(-1, 3)
    load_s = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    del manifest, vectors
    return {"save_s": save_s, "load_s": load_s, "manifest_mb": size / 1e6}


def measure(n_songs: int, json_max_songs: int, model, folder: Path) -> dict:
    rng = np.random.default_rng(n_songs)
    n_vectors = n_songs * SEGMENTS_PER_SONG
    store = synthetic_store(n_songs, filled_pq_index(n_vectors, rng), model.model_hash)
    index_dir = folder / f"idx{n_songs}"
    started = time.perf_counter()
    save_index(index_dir, store, model)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_index(index_dir)
    load_s = time.perf_counter() - started
    assert loaded.n_vectors == n_vectors and len(loaded.songs) == n_songs
    assert np.array_equal(loaded.vector_song, store.vector_song) and np.array_equal(loaded.vector_span, store.vector_span)
    faiss_file = next(index_dir.glob("vectors-*.faiss"))
    started = time.perf_counter()
    sha256_file(faiss_file)
    sha_s = time.perf_counter() - started
    row = {
        "songs": n_songs,
        "vectors": n_vectors,
        "save_s": save_s,
        "load_s": load_s,
        "manifest_mb": (index_dir / "manifest.json").stat().st_size / 1e6,
        "table_mb": next(index_dir.glob("table-*.npy")).stat().st_size / 1e6,
        "faiss_mb": faiss_file.stat().st_size / 1e6,
        "sha256_gb_per_s": faiss_file.stat().st_size / 1e9 / sha_s,
    }
    del loaded
    shutil.rmtree(index_dir)
    if n_songs <= json_max_songs:
        row["format1"] = format1_costs(store, folder)
    return row


def markdown(rows: list[dict], command: str) -> str:
    sha_rate = float(np.median([r["sha256_gb_per_s"] for r in rows]))
    sq8_bytes = IVF_SQ8_1M_GIB * 2**30
    lines = [
        SECTION,
        "",
        f"`{command}` on {datetime.date.today().isoformat()} ({platform.processor() or platform.machine()}, 2 cores shared with other jobs).",
        f"{SEGMENTS_PER_SONG} vectors a song; FAISS part: PQ8 (8-byte codes, random vectors). Times are wall seconds.",
        "",
        "| songs | vectors | save (s) | load + verify (s) | manifest.json | vector table | format 1: save (s) | format 1: load (s) | format 1: manifest.json |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        old = r.get("format1")
        old_cells = f"{old['save_s']:.2f} | {old['load_s']:.2f} | {old['manifest_mb']:.0f} MB" if old else "not run | not run | not run"
        lines.append(
            f"| {r['songs']:,} | {r['vectors']:,} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['manifest_mb']:.0f} MB | "
            f"{r['table_mb']:.0f} MB | {old_cells} |"
        )
    lines += [
        "",
        (
            f"sha256 of the FAISS file ran at {sha_rate:.2f} GB/s: checking the 1M-song IVF-SQ8 file ({IVF_SQ8_1M_GIB} GiB) "
            f"adds ~{sq8_bytes / 1e9 / sha_rate:.0f} s to a load (once per start or SIGHUP reload; the file is then mapped, not read)."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--songs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--json-max-songs", type=int, default=1_000_000, help="largest catalog also measured in format 1")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    model = load_model_info(DEFAULT_MODEL_DIR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="coverwatch-store-") as tmp:
        for n_songs in args.songs:
            rows.append(measure(n_songs, args.json_max_songs, model, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    section = markdown(rows, " ".join(["python bench/bench_store.py", *sys.argv[1:]]))
    print(section)
    if not args.no_write:
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
