"""Benchmark of the daemon's per-chunk path on the demo stream (one stream, real time chunks).

Prints and records in bench/RESULTS.md:
  * real-time factor: audio seconds processed per CPU second of this process;
  * chunk-to-decision latency: wall time from a chunk's arrival (process_chunk called)
    to its decision (process_chunk returned), mean and p99, over chunks that took a
    decision and over all chunks;
  * the split of time between resampling, CQT, encoder, search and the decision step.

Usage: python bench/bench_stream.py [--workdir DIR] [--chunk-s 0.5] [--rate 44100] [--align-weight W]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import soundfile
import soxr
from report import write_section  # bench/report.py, beside this script

from coverwatch.evaluation.demo import default_workdir, ensure_demo_data, ensure_demo_index
from coverwatch.streamer.config import Config, replace_section
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.store import load_index
from coverwatch.streamer.service.pipeline import Monitor

SECTION = "## Streaming path (bench/bench_stream.py)"


def run(workdir: Path, chunk_s: float, rate: int, threads: int, align_weight: float | None = None) -> dict:
    cfg = Config() if align_weight is None else replace_section(Config(), "stream", align_weight=align_weight)
    ensure_demo_data(workdir)
    index_dir = ensure_demo_index(workdir, cfg)
    embedder = Embedder(DEFAULT_MODEL_DIR, threads)
    monitor = Monitor(embedder, load_index(index_dir, embedder.info.model_hash), cfg.stream, cfg.decision, batch_size=cfg.model.batch_size)
    faiss.omp_set_num_threads(cfg.index.threads)  # as the daemon does
    audio, source_rate = soundfile.read(workdir / "stream.wav", dtype="float32")
    if rate != source_rate:  # feed at a typical capture rate so resampling is measured too
        audio = soxr.resample(audio, source_rate, rate).astype(np.float32)
    chunk = int(chunk_s * rate)
    latencies, decided = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, len(audio), chunk):
        decisions_before = monitor.counts["decisions"]
        t0 = time.perf_counter()
        monitor.process_chunk("bench", audio[start : start + chunk], rate)
        latencies.append(time.perf_counter() - t0)
        decided.append(monitor.counts["decisions"] > decisions_before)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    lat = np.array(latencies) * 1000
    dec = lat[np.array(decided)]
    audio_s = len(audio) / rate
    stages = dict(monitor.times.seconds)
    return {
        "audio_s": audio_s,
        "cpu_s": cpu,
        "wall_s": wall,
        "rtf_cpu": audio_s / cpu,
        "rtf_wall": audio_s / wall,
        "chunks": len(lat),
        "decisions": int(monitor.counts["decisions"]),
        "lat_all_mean": float(lat.mean()),
        "lat_all_p99": float(np.percentile(lat, 99)),
        "lat_dec_mean": float(dec.mean()),
        "lat_dec_p99": float(np.percentile(dec, 99)),
        "stages": stages,
        "chunk_s": chunk_s,
        "rate": rate,
        "threads": threads,
        "windows": cfg.stream.windows_s,
        "hop_s": cfg.stream.hop_s,
        "align_weight": cfg.stream.align_weight,
    }


def to_markdown(r: dict, command: str) -> str:
    total = sum(r["stages"].values())
    rows = "\n".join(f"| {k} | {v:.2f} | {100 * v / total:.0f} % |" for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1]))
    return f"""{SECTION}

Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {r["threads"]} onnxruntime threads · command: `{command}`

One stream: the demo stream ({r["audio_s"]:.0f} s) fed as {r["chunk_s"]} s chunks at {r["rate"]} Hz, windows {r["windows"]} s, a decision every {r["hop_s"]} s ({r["decisions"]} decisions), alignment check weight {r["align_weight"]} (0 = off).

| figure | value |
|---|---|
| real-time factor (audio s per CPU s) | {r["rtf_cpu"]:.1f}x |
| real-time factor (audio s per wall s) | {r["rtf_wall"]:.1f}x |
| chunk-to-decision latency, chunks that decided: mean / p99 | {r["lat_dec_mean"]:.1f} ms / {r["lat_dec_p99"]:.1f} ms |
| chunk processing latency, all {r["chunks"]} chunks: mean / p99 | {r["lat_all_mean"]:.1f} ms / {r["lat_all_p99"]:.1f} ms |

| stage | seconds | share |
|---|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--chunk-s", type=float, default=0.5)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--align-weight", type=float, default=None, help="override [stream] align_weight (0 = embedding alone)")
    args = parser.parse_args()
    result = run(args.workdir, args.chunk_s, args.rate, args.threads, args.align_weight)
    markdown = to_markdown(result, "python bench/bench_stream.py " + " ".join(sys.argv[1:]))
    print(markdown)
    write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
