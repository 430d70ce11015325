"""Choose the alignment check's weight and delay on the tuning stream (never on held-out streams or the demo).

For each (align_weight, align_delay) the index is calibrated on non-catalog audio exactly
as `coverwatch calibrate` does (the daemon's hop scores, leader statistic, Gumbel fit for
`target_false_alarms_per_day`), then the tuning streams are scored the same way and the
daemon's own hysteresis is replayed over them at those calibrated thresholds. The index
itself is not modified. Writes OUT/ALIGNMENT_TUNING.md and OUT/alignment_tuning.json.

Usage: python bench/tune_alignment.py --index DIR --calibration BG.flac ... --streams STREAM.flac ... --out DIR
       [--weights 0 0.5 1 1.5] [--delays 3 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from coverwatch.evaluation.stream_eval import Trace, plays_from_truth, replay, score_events, summarize
from coverwatch.index_builder.calibrate import embedding_hop_scores, fit_statistics
from coverwatch.streamer.config import Config, replace_section
from coverwatch.streamer.decide.calibration import fuse_hops, leaders, run_statistic
from coverwatch.streamer.embed.artifacts import resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.frontend.decode import load_audio
from coverwatch.streamer.search.store import load_index

log = logging.getLogger("tune_alignment")


def calibrated_thresholds(index, measured: list[tuple], cfg: Config) -> dict:
    """`calibrate_index`'s fit on `embedding_hop_scores` results, without writing the index."""
    stats = [
        run_statistic(*leaders(fuse_hops(scores, queries, index, cfg.stream)), cfg.decision.start_hops) for _, scores, queries in measured
    ]
    return fit_statistics(stats, cfg)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", required=True)
    parser.add_argument("--calibration", nargs="+", required=True, help="non-catalog audio")
    parser.add_argument("--streams", nargs="+", required=True, help="tuning streams (with their .json truth)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--delays", nargs="+", type=int, default=[3, 5])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    base = Config()
    embedder = Embedder(resolve_model_dir(base.model.path), base.model.threads)
    index = load_index(Path(args.index), expected_model_hash=embedder.info.model_hash)
    # Embedding scores do not depend on the alignment settings: measured once, fused per setting.
    background = [embedding_hop_scores(embedder, index, load_audio(Path(p)), base.stream) for p in args.calibration]
    streams = [(Path(p), embedding_hop_scores(embedder, index, load_audio(Path(p)), base.stream)) for p in args.streams]
    rows = []
    for weight in args.weights:
        for delay in args.delays if weight > 0 else args.delays[:1]:
            started = time.perf_counter()
            cfg = replace_section(base, "stream", align_weight=weight, align_delay=delay)
            fit = calibrated_thresholds(index, background, cfg)
            traces = []
            for path, (times, scores, queries) in streams:
                truth = json.loads(path.with_suffix(".json").read_text())
                fused = fuse_hops(scores, queries, index, cfg.stream)
                traces.append(
                    Trace(path.stem, float(truth["duration_s"]), times, fused, [s.song_id for s in index.songs], plays_from_truth(truth))
                )
            d = cfg.decision
            results = [
                score_events(
                    t.name,
                    replay(t, fit["start_threshold"], fit["end_threshold"], d.start_hops, d.end_hops, d.history_hops),
                    t.plays,
                    t.duration_s,
                )
                for t in traces
            ]
            summary = summarize(results)
            caught = sum(p.caught for r in results for p in r.plays)
            rows.append(
                {
                    "align_weight": weight,
                    "align_delay": delay if weight > 0 else None,
                    "start": round(fit["start_threshold"], 3),
                    "start 90% interval": [round(x, 3) for x in fit["start_threshold_interval"]],
                    "end": round(fit["end_threshold"], 3),
                    "caught": f"{caught}/{sum(len(r.plays) for r in results)}",
                    **summary,
                }
            )
            log.info("weight %g delay %d: %s in %.0f s", weight, delay, rows[-1]["caught"], time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment_tuning.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    cols = (
        "align_weight",
        "align_delay",
        "start",
        "start 90% interval",
        "end",
        "caught",
        "false alarms",
        "match_start precision",
        "latency median s",
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    text = (
        f"# Alignment tuning\n\nIndex {args.index}; calibration audio {', '.join(args.calibration)}; "
        f"tuning streams {', '.join(args.streams)}; thresholds calibrated for "
        f"{base.index_build.target_false_alarms_per_day:g} false alarm(s) per 24 h at every setting.\n\n{table}\n"
    )
    (out / "ALIGNMENT_TUNING.md").write_text(text)
    print(table)


if __name__ == "__main__":
    main()
