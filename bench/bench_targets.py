"""The speed targets in one run: one stream, many streams, a large catalog; each against its baseline.

Runs the measurements of bench_stream.py, bench_streams.py and bench_two_stage.py with the
shipped model and the daemon's default settings (alignment check on), and writes one table
of figure / measured / baseline / ratio / target / met to bench/RESULTS.md (section "Speed
targets"). Baselines: the naive path of bench_streams.py (every window's CQT recomputed
from raw audio at every hop, one stream and one window at a time, no alignment check) for
the stream figures; exact float32 search for the catalog (recall@10 is the share of the
exact top-10 found; its latency is the brute-force pass over the catalog that gives the
ground truth, per query).

Usage: nice -n 5 python bench/bench_targets.py --covers /work/sim/leaveout [--songs 1000000] [--streams 200]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from bench_index import Distractors, real_set  # bench/ scripts, beside this one
from bench_stream import run as run_one_stream
from bench_streams import prepare, run_monitor, run_naive
from bench_two_stage import measure as measure_two_stage
from report import write_section

from coverwatch.evaluation.demo import default_workdir
from coverwatch.streamer.config import Config
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.index_types import TWO_STAGE_EF_CONSTRUCTION, spec_for

log = logging.getLogger("bench_targets")

SECTION = "## Speed targets (bench/bench_targets.py)"
TIMED_S = 10.0  # stream audio per stream in the many-streams run
NAIVE_STREAMS = 10  # the naive path is measured up to here (it grows linearly)
TARGET_RTF_PER_CPU = 100.0
TARGET_P99_MS = 250.0
TARGET_SEARCH_MS = 5.0
TARGET_RECALL = 0.95


def row(figure: str, measured: float, baseline: float | None, target: str, met: bool | None, fmt: str = "{:.1f}", lower_is_better: bool = False) -> str:
    """One table row; ratio = how many times better than the baseline (so > 1 is a gain either way)."""
    ratio = f"{(baseline / measured if lower_is_better else measured / baseline):.1f}x" if baseline and measured else ""
    base = fmt.format(baseline) if baseline is not None else ""
    verdict = "" if met is None else ("yes" if met else "no")
    return f"| {figure} | {fmt.format(measured)} | {base} | {ratio} | {target} | {verdict} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--covers", type=Path, required=True, help="a cover dataset folder (manifest.csv, split val) for the catalog run")
    parser.add_argument("--songs", type=int, default=1_000_000, help="catalog size of the two-stage run")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    wall0 = time.perf_counter()
    cfg = Config()

    one = run_one_stream(args.workdir, 0.5, 44100, cfg.model.threads)
    monitor, audio, warm_s, templates = prepare(cfg, args.workdir)
    naive_one = run_naive(monitor, cfg, audio, 1, warm_s, TIMED_S)
    naive_many = run_naive(monitor, cfg, audio, NAIVE_STREAMS, warm_s, TIMED_S)
    many = run_monitor("batched", monitor, audio, args.streams, warm_s, TIMED_S, templates, cfg.kafka.max_poll_records)
    log.info("streams done: %.1fx at %d streams", many.rtf, args.streams)

    faiss.omp_set_num_threads(2)
    real = real_set(args.covers, 120, 20.0, Embedder(DEFAULT_MODEL_DIR, 2))
    catalog = measure_two_stage(args.songs, real, Distractors.fit(real.ref_vectors), [TWO_STAGE_EF_CONSTRUCTION])
    default = spec_for("two_stage", 512, catalog["vectors"])
    point = next(s for s in catalog["sweep"] if (s["ef"], s["candidates"]) == (default.ef_search, default.candidates))

    naive_one_rtf_cpu = naive_one.audio_s / naive_one.cpu_s
    rows = [
        row("one stream: real time per CPU s (x)", one["rtf_cpu"], naive_one_rtf_cpu, f">= {TARGET_RTF_PER_CPU:.0f}x", one["rtf_cpu"] >= TARGET_RTF_PER_CPU),
        row("one stream: chunk-to-decision p99 (ms)", one["lat_dec_p99"], naive_one.pct(99, True), f"< {TARGET_P99_MS:.0f}", one["lat_dec_p99"] < TARGET_P99_MS, lower_is_better=True),
        row(
            f"{args.streams} streams: aggregate real time (x; keeps up at >= {args.streams})", many.rtf,
            naive_many.rtf, f">= {args.streams}x", many.rtf >= args.streams,
        ),
        row(f"{args.streams} streams: chunk-to-decision p99, deciding chunks (ms)", many.pct(99, True), None, f"< {TARGET_P99_MS:.0f}", many.pct(99, True) < TARGET_P99_MS),
        row(f"{args.streams} streams: CPU ms per stream-audio s", 1000 * many.cpu_s / many.audio_s, 1000 * naive_many.cpu_s / naive_many.audio_s, "", None, lower_is_better=True),
        row(
            f"{args.songs:,} songs: single query p50 (ms)", point["single_p50"], catalog["exact_ms_per_query"],
            f"< {TARGET_SEARCH_MS:.0f}", point["single_p50"] < TARGET_SEARCH_MS, "{:.2f}", lower_is_better=True,
        ),
        row(f"{args.songs:,} songs: single query p99 (ms)", point["single_p99"], None, f"< {TARGET_SEARCH_MS:.0f}", point["single_p99"] < TARGET_SEARCH_MS, "{:.2f}"),
        row(f"{args.songs:,} songs: recall@10 vs exact", point["recall10"], 1.0, f">= {TARGET_RECALL}", point["recall10"] >= TARGET_RECALL, "{:.3f}"),
    ]
    markdown = "\n".join(
        [
            SECTION,
            "",
            f"Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {os.cpu_count()} cores · model "
            f"{monitor.embedder.info.model_hash} · command: `python bench/bench_targets.py {' '.join(sys.argv[1:])}` · "
            f"total {(time.perf_counter() - wall0) / 60:.1f} min wall",
            "",
            f"Shipped model, default settings (windows {cfg.stream.windows_s} s every {cfg.stream.hop_s} s, alignment check weight "
            f"{cfg.stream.align_weight}, onnxruntime {cfg.model.threads} threads, flush every {cfg.kafka.max_poll_records} chunks). "
            f"Streams: the demo stream and index (one stream at 44.1 kHz through resampling; {args.streams} streams at 22.05 kHz, "
            f"each at its own offset, {TIMED_S:.0f} s each timed). Baseline for streams: the naive path (1 and {NAIVE_STREAMS} "
            f"streams; no alignment check, so the ratio understates the gain). Catalog: {args.songs:,} songs "
            f"({catalog['vectors']:,} vectors: 120 real leave-out songs from `{args.covers}` + synthetic distractors), two_stage "
            f"at its default efSearch {default.ef_search} / {default.candidates} candidates, against exact float32 search "
            "(latency: the chunked brute-force pass, per query, batched).",
            "",
            "Ratio: times better than the baseline (baseline / measured for times).",
            "",
            "| figure | measured | baseline | ratio | target | met |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(markdown, flush=True)
    if not args.no_write:
        write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
