"""Tune the decision layer on simulated tuning streams (never on the held-out streams).

For each stream config (windows, hop) the tuning streams are scored once per hop as the
daemon scores them (coverwatch.index_builder.calibrate.hop_scores); the daemon's own hysteresis then
replays every combination of start/end threshold and start/end hops over those scores.
Writes the table (best first: fewest false alarms, then recall, then latency) to
OUT/TUNING.md and OUT/tuning.json.

Usage: python bench/tune_decisions.py --index DIR --out DIR --streams STREAM.flac ... [--configs LABEL ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from coverwatch.evaluation.stream_eval import Trace, TruthPlay, pareto, stream_trace, tune_decisions, tuning_table
from coverwatch.streamer.config import Config, replace_section
from coverwatch.streamer.embed.artifacts import resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.store import load_index

log = logging.getLogger("tune_decisions")

STREAM_CONFIGS = {  # label -> (windows_s, hop_s)
    "w10-20-40 h2.5": ([10.0, 20.0, 40.0], 2.5),
    "w20-40 h2.5": ([20.0, 40.0], 2.5),
    "w10-20 h2.5": ([10.0, 20.0], 2.5),
    "w10-20-40 h5": ([10.0, 20.0, 40.0], 5.0),
}
STARTS = [0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
END_GAPS = [0.05, 0.1]
START_HOPS = [1, 2, 3]
END_HOPS = [2, 3, 5]


def cached_trace(folder: Path, embedder, index, stream: Path, stream_cfg) -> Trace:
    """`stream_trace`, kept as JSON in `folder` so that a rerun with more grid points is cheap."""
    path = folder / f"{stream.stem}.json"
    if path.exists():
        d = json.loads(path.read_text())
        scores = [{int(k): v for k, v in hop.items()} for hop in d["scores"]]
        plays = [TruthPlay(p["song_id"], p["start_s"], p["end_s"], p["info"]) for p in d["plays"]]
        positions = [{int(k): v for k, v in hop.items()} for hop in d.get("positions", [])]
        return Trace(d["name"], d["duration_s"], np.asarray(d["times"]), scores, d["song_ids"], plays, positions)
    trace = stream_trace(embedder, index, stream, stream_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    record = dataclasses.asdict(trace) | {"times": trace.times.tolist()}
    path.write_text(json.dumps(record))
    return trace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", nargs="+", default=list(STREAM_CONFIGS), choices=list(STREAM_CONFIGS))
    parser.add_argument("--streams", nargs="+", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = Config()
    embedder = Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)
    index = load_index(Path(args.index), expected_model_hash=embedder.info.model_hash)
    traces = {}
    for label in args.configs:
        windows, hop = STREAM_CONFIGS[label]
        stream_cfg = replace_section(cfg, "stream", windows_s=windows, hop_s=hop).stream
        started = time.perf_counter()
        traces[label] = [cached_trace(Path(args.out) / "traces" / label, embedder, index, Path(p), stream_cfg) for p in args.streams]
        log.info("%s: traced %d streams in %.0f s", label, len(args.streams), time.perf_counter() - started)
    rows = tune_decisions(traces, STARTS, END_GAPS, START_HOPS, END_HOPS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(rows, indent=1) + "\n")
    hours = sum(t.duration_s for t in next(iter(traces.values()))) / 3600
    text = f"# Decision tuning\n\nTuning streams: {', '.join(args.streams)} ({hours:.2f} h); index {args.index}; {len(rows)} configurations.\n\n"
    text += "## Recall against false alarms (best configuration at each false-alarm count)\n\n" + tuning_table(pareto(rows)) + "\n\n"
    by_recall = sorted(rows, key=lambda r: (-(r["recall all"] or 0.0), r["false alarms"], r["latency median s"] or float("inf")))
    (out / "TUNING.md").write_text(text + "## All configurations by recall (first 60)\n\n" + tuning_table(by_recall, 60) + "\n")
    print(tuning_table(pareto(rows)))


if __name__ == "__main__":
    main()
