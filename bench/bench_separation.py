"""How well live windows separate catalog covers from non-catalog audio, per hop, per
window length: the threshold-free view behind the stream evaluation's few play counts.

For each model (with an index of the same catalog built by that model) and each window
length, the daemon's own hop scoring (`coverwatch.index_builder.calibrate.hop_scores`, one window
length at a time, every vector searched) gives

- positives: in each simulated stream, the true song's score at every hop whose window
  lies entirely inside one of its plays (timeline: the .json beside the stream);
- negatives: at every hop of the non-catalog calibration audio, the best score of any
  catalog song (what a false alarm would be made of).

Reported: ROC AUC (chance that a positive beats a negative), the share of positive hops
where the true song leads all others, and the share above the highest negative (the
best the calibration audio reached). Writes the "Hop-level separation" section of
bench/RESULTS.md.

Usage: python bench/bench_separation.py --calibration BG.flac --streams S1.flac ... \
    --model LABEL MODEL_DIR INDEX_DIR [--model LABEL MODEL_DIR INDEX_DIR ...] [--windows 10 20 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from pathlib import Path

import numpy as np
from report import write_section  # bench/report.py, beside this script

from coverwatch.evaluation.stream_eval import plays_from_truth
from coverwatch.index_builder.calibrate import hop_scores
from coverwatch.streamer.config import Config
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.store import load_index

SECTION = "## Hop-level separation (bench/bench_separation.py)"
log = logging.getLogger("bench_separation")


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """(P,), (N,) scores -> P(positive > negative) + 0.5 P(tie), over all P x N pairs."""
    pairs = positives[:, None] - negatives[None, :]
    return float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())


def separation(embedder, index, background: np.ndarray, streams: list[tuple[np.ndarray, list]], window_s: float, cfg: Config) -> dict:
    """Decoded calibration audio and [(stream audio, its plays)] -> the figures for one window length."""
    stream_cfg = dataclasses.replace(cfg.stream, windows_s=[window_s], top_k=index.n_vectors)
    negatives = np.array([max(hop.values()) for hop in hop_scores(embedder, index, background, stream_cfg)[1] if hop])
    rows = index.song_rows()
    positives, leads = [], []
    for audio, plays in streams:
        times, scores = hop_scores(embedder, index, audio, stream_cfg)
        for play in plays:
            song = rows[play.song_id]
            for t, hop in zip(times, scores):
                if play.start_s <= t - window_s and t <= play.end_s and song in hop:
                    positives.append(hop[song])
                    leads.append(max(hop, key=hop.get) == song)
    positives = np.asarray(positives)
    return {
        "window_s": window_s,
        "positive_hops": len(positives),
        "negative_hops": len(negatives),
        "auc": roc_auc(positives, negatives),
        "true_song_leads": float(np.mean(leads)),
        "above_best_negative": float(np.mean(positives > negatives.max())),
        "best_negative": float(negatives.max()),
        "positive_median": float(np.median(positives)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calibration", type=Path, required=True, help="non-catalog audio")
    parser.add_argument("--streams", type=Path, nargs="+", required=True, help="simulated streams, timeline .json beside each")
    parser.add_argument("--model", nargs=3, action="append", metavar=("LABEL", "MODEL_DIR", "INDEX_DIR"), required=True)
    parser.add_argument("--windows", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = Config()
    background = load_audio(args.calibration)  # decoded once, scored by every model at every window length
    streams = [(load_audio(path), plays_from_truth(json.loads(path.with_suffix(".json").read_text()))) for path in args.streams]
    rows = []
    for label, model_dir, index_dir in args.model:
        embedder = Embedder(Path(model_dir), cfg.model.threads)
        index = load_index(Path(index_dir), expected_model_hash=embedder.info.model_hash)
        for window in args.windows:
            row = {"model": f"{label} ({embedder.info.model_hash[:8]})"} | separation(embedder, index, background, streams, window, cfg)
            log.info("%s", row)
            rows.append(row)
    command = "python bench/bench_separation.py " + " ".join(sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Date: {datetime.date.today()} · command: `{command}`",
        "",
        (
            f"Positives: the true song's score at hops whose window lies inside its play ({', '.join(p.name for p in args.streams)}); "
            f"negatives: the best catalog score at each hop of {args.calibration.name} (non-catalog audio)."
        ),
        "",
        "| model | window | ROC AUC | true song leads | above best negative | positive median | best negative | positive / negative hops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['window_s']:g} s | {r['auc']:.3f} | {r['true_song_leads']:.2f} | {r['above_best_negative']:.2f} | "
            f"{r['positive_median']:.3f} | {r['best_negative']:.3f} | {r['positive_hops']} / {r['negative_hops']} |"
        )
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.no_write:
        write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
