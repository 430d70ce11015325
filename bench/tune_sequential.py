"""Experiment (issue 19): decisions from evidence accumulated over hops, against the daemon's hysteresis.

A CUSUM per song (Page 1954) on the daemon's fused hop scores,

    evidence(t) = min(cap, max(0, evidence(t - 1) + score(t) - drift + bonus(t))),

with `drift` a quantile of the hop's top score on non-catalog audio and `bonus` paid when
the song's aligned reference position (streamer/decide/alignment.py `alignment_match`)
moved forward with the stream at a tempo ratio of 0.5-2 since its previous aligned hop.
A song starts when its evidence reaches a threshold calibrated exactly as the daemon's
(Gumbel fit of the per-minute maxima of the highest evidence on non-catalog audio, for 1
false alarm per 24 h); it ends as in the hysteresis layer. Everything is replayed on the
per-hop score traces of `bench/tune_decisions.py` (tuning streams and calibration audio
only; the held-out streams are not used). Also measured: how the true song's score rises
after a play begins, and how often the aligned position "plays along" for true songs and
for the top song of non-catalog audio.

Usage: python bench/tune_sequential.py --index SIM/index --sim SIM --out bench/EXPERIMENT_sequential.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coverwatch.evaluation.stream_eval import replay_decider, score_events, summarize
from coverwatch.index_builder.calibrate import fit_statistics
from coverwatch.streamer.config import Config, replace_section
from coverwatch.streamer.decide.calibration import leaders, run_statistic
from coverwatch.streamer.decide.hysteresis import Decision, Hysteresis, end_decision
from coverwatch.streamer.embed.artifacts import resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.store import load_index
from tune_decisions import cached_trace

log = logging.getLogger("tune_sequential")

MIN_TEMPO_RATIO = 0.5  # reference seconds per stream second that still count as "playing along"
MAX_TEMPO_RATIO = 2.0
POSITION_SLACK_S = 1.5  # reference positions are read off 0.21-s chroma steps and a noisy path end
MAX_POSITION_GAP_S = 30.0  # positions further apart in stream time than this are not compared


def advanced_along(previous: tuple[float, float] | None, time_s: float, reference_s: float) -> bool:
    """Whether a song's aligned reference position moved forward with the stream since
    `previous` (stream time, reference time): by MIN..MAX_TEMPO_RATIO times the stream's
    advance, give or take POSITION_SLACK_S."""
    if previous is None:
        return False
    elapsed = time_s - previous[0]
    if not 0.0 < elapsed <= MAX_POSITION_GAP_S:
        return False
    moved = reference_s - previous[1]
    return MIN_TEMPO_RATIO * elapsed - POSITION_SLACK_S <= moved <= MAX_TEMPO_RATIO * elapsed + POSITION_SLACK_S


@dataclass
class Sequential:
    start_threshold: float  # evidence at which a match starts (calibrated)
    end_threshold: float  # fused score under which a hop counts against the current match
    drift: float  # subtracted from each hop's fused score (calibrated)
    end_hops: int
    consistency_bonus: float = 0.0
    cap_factor: float = 2.0  # evidence is capped at cap_factor x start_threshold
    lead_s: float = 0.0
    current: int | None = None
    current_started_s: float = 0.0
    current_play_start_s: float = 0.0
    last_above_s: float = 0.0
    below: int = 0
    evidence: dict[int, float] = field(default_factory=dict)  # song -> accumulated evidence (> 0 only)
    rise_s: dict[int, float] = field(default_factory=dict)  # song -> hop at which its evidence last rose from 0
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)  # song -> (stream s, reference s) last aligned
    last_scores: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.start_threshold <= 0:
            raise ValueError(f"evidence start_threshold must be > 0, got {self.start_threshold}")

    @property
    def cap(self) -> float:
        return self.cap_factor * self.start_threshold

    def reset(self, time_s: float) -> list[Decision]:
        """Forget the stream's state (gap, end of stream); an open match ends now."""
        decisions = []
        if self.current is not None:
            decisions.append(self._end(self.last_scores.get(self.current, 0.0), time_s, self.last_above_s))
        self.current, self.below = None, 0
        self.evidence.clear()
        self.rise_s.clear()
        self.positions.clear()
        self.last_scores.clear()
        return decisions

    def _end(self, score: float, time_s: float, play_end_s: float) -> Decision:
        return end_decision(self.current, max(score, 0.0), time_s, self.current_started_s, self.current_play_start_s, play_end_s, self.lead_s if self.below else 0.0)

    def _accumulate(self, scores: dict[int, float], time_s: float, positions: dict[int, float]) -> None:
        for song in set(self.evidence) | set(scores):
            score = scores.get(song, 0.0)
            bonus = 0.0
            if song in positions:
                if advanced_along(self.positions.get(song), time_s, positions[song]):
                    bonus = self.consistency_bonus
                self.positions[song] = (time_s, positions[song])
            before = self.evidence.get(song, 0.0)
            after = min(self.cap, max(0.0, before + score - self.drift + bonus))
            if after > 0.0:
                if before == 0.0:
                    self.rise_s[song] = time_s
                self.evidence[song] = after
            else:
                self.evidence.pop(song, None)
                self.rise_s.pop(song, None)
        for song in [s for s, (t, _) in self.positions.items() if time_s - t > MAX_POSITION_GAP_S]:
            del self.positions[song]

    def update(self, scores: dict[int, float], time_s: float, positions: dict[int, float] | None = None) -> list[Decision]:
        """One hop: `scores` maps song row -> fused score (absent = not retrieved);
        `positions` song row -> aligned reference time (s) at this hop, where known."""
        self._accumulate(scores, time_s, positions or {})
        self.last_scores = dict(scores)
        current_score = scores.get(self.current, float("-inf")) if self.current is not None else float("-inf")
        ready = [s for s, e in self.evidence.items() if e >= self.start_threshold and s != self.current and s in scores]
        challenger = max(ready, key=scores.__getitem__, default=None)
        if challenger is not None and scores[challenger] <= current_score:
            challenger = None

        decisions: list[Decision] = []
        if self.current is not None:
            self.below = self.below + 1 if current_score < self.end_threshold else 0
            if not self.below:
                self.last_above_s = time_s
            if self.below >= self.end_hops or challenger is not None:
                play_end = min(self.last_above_s, self._play_start(challenger)) if challenger is not None else self.last_above_s
                decisions.append(self._end(current_score, time_s, play_end))
                self.evidence.pop(self.current, None)  # a finished song builds its evidence afresh
                self.rise_s.pop(self.current, None)
                self.current, self.below = None, 0
        if self.current is None and challenger is not None:
            self.current, self.current_started_s, self.below = challenger, time_s, 0
            self.current_play_start_s, self.last_above_s = self._play_start(challenger), time_s
            reference_s = positions.get(challenger) if positions else None
            decisions.append(
                Decision("match_start", challenger, scores[challenger], time_s, time_s, self.current_play_start_s, reference_s=reference_s)
            )
        return decisions

    def _play_start(self, song: int) -> float:
        return max(0.0, self.rise_s[song] - self.lead_s)


# --- the experiment ---------------------------------------------------------------------

WINDOW_CONFIGS = {"w10-20-40": [10.0, 20.0, 40.0], "w5-10-20-40": [5.0, 10.0, 20.0, 40.0]}
DRIFT_QUANTILES = (0.5, 0.75, 0.9, 0.97)
BONUSES = (0.0, 0.15, 0.3)
HYSTERESIS_STARTS = (0.8, 0.75, 0.7)
LEAD_S = 5.0  # play_lead_s of the daemon's default windows
CURVE_DRIFT_QUANTILE = 0.97  # the CUSUM drift of the swept curve (the best row of the table)
HOP_S = 2.5  # the default [stream] hop_s (the traces are made with it)


def evidence_statistic(trace, drift: float, bonus: float) -> np.ndarray:
    """(H,) highest evidence among the hop's retrieved songs, uncapped and never starting."""
    accumulator = Sequential(1e12, 0.0, drift, 1, bonus, cap_factor=1.0)
    out = []
    for t, scores, positions in zip(trace.times, trace.scores, trace.positions):
        accumulator._accumulate(scores, float(t), positions)
        out.append(max((accumulator.evidence.get(song, 0.0) for song in scores), default=0.0))
    return np.asarray(out)


def figures(traces, make) -> dict:
    return summarize([score_events(t.name, replay_decider(t, make()), t.plays, t.duration_s) for t in traces])


def row(layer: str, settings: str, s: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"
    return f"| {layer} | {settings} | {s['caught']}/{s['plays']} | {s['false alarms']} | {fmt(s['latency median s'])} | {fmt(s['latency p90 s'])} |"


def rise_table(traces) -> list[str]:
    """Median true-song score and share of hops it leads, by seconds since its play began."""
    by_delay: dict[float, list[tuple[float, bool]]] = {}
    for t in traces:
        rows = {song: i for i, song in enumerate(t.song_ids)}
        for play in t.plays:
            for time_s, scores in zip(t.times, t.scores):
                since = time_s - play.start_s
                if 0 <= since <= 40 and time_s <= play.end_s:
                    lead = bool(scores) and max(scores, key=scores.get) == rows[play.song_id]
                    by_delay.setdefault(int(since // HOP_S) * HOP_S, []).append((scores.get(rows[play.song_id], 0.0), lead))
    lines = ["| s since play start | hops | true song's score, median | p75 | leads |", "|---|---|---|---|---|"]
    for since in sorted(by_delay):
        v = np.array([x for x, _ in by_delay[since]])
        lines.append(f"| {since:g} | {len(v)} | {np.median(v):.2f} | {np.quantile(v, 0.75):.2f} | {np.mean([x for _, x in by_delay[since]]):.2f} |")
    return lines


def plays_along_table(tuning, calibration) -> list[str]:
    """Share of hops whose aligned position moved with the stream since `lag` hops before."""
    lines = ["| lag | true song, inside its play (after 20 s) | top song of non-catalog audio |", "|---|---|---|"]
    for lag in (1, 2, 4, 8):
        def along(trace, hop, song):
            if hop < lag or song not in trace.positions[hop] or song not in trace.positions[hop - lag]:
                return False
            previous = (float(trace.times[hop - lag]), trace.positions[hop - lag][song])
            return advanced_along(previous, float(trace.times[hop]), trace.positions[hop][song])
        true_hops = [along(t, h, {s: i for i, s in enumerate(t.song_ids)}[p.song_id])
                     for t in tuning for p in t.plays for h, time_s in enumerate(t.times) if p.start_s + 20 <= time_s <= p.end_s]  # fmt: skip
        null_hops = [along(t, h, max(s, key=s.get)) for t in calibration for h, s in enumerate(t.scores) if s]
        lines.append(f"| {lag} ({lag * HOP_S:g} s) | {np.mean(true_hops):.2f} | {np.mean(null_hops):.2f} |")
    return lines


def plot_curves(path: Path, curves: dict[str, list[dict]]) -> None:
    """Recall against false alarms per hour, one line per layer over its threshold sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["false alarms per hour"] for p in points], [p["recall all"] for p in points], "o-", label=name)
    ax.set(xlabel="false alarms per hour (tuning streams)", ylabel="play recall", ylim=(0, 1), title="threshold sweeps, shipped model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", required=True)
    parser.add_argument("--sim", required=True, help="simulation folder (streams/sim-1-20m, sim-2-20m; calibration/bg-1..3-20m)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--traces", default="runs/tune_sequential", help="cache of per-hop score traces")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    sim = Path(args.sim)
    tuning_files = [sim / "streams" / f"sim-{seed}-20m.flac" for seed in (1, 2)]
    calibration_files = [sim / "calibration" / f"bg-{seed}-20m.flac" for seed in (1, 2, 3)]
    cfg = Config()
    embedder = Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)
    index = load_index(Path(args.index), expected_model_hash=embedder.info.model_hash)
    lines = [
        "# Experiment: sequential evidence (CUSUM) against the hysteresis layer",
        "",
        f"Date: {datetime.date.today().isoformat()} · model {embedder.info.model_hash} · index {args.index}",
        f"Command: `python bench/tune_sequential.py --index {args.index} --sim {args.sim} --out {args.out}`",
        "Tuning streams sim-1, sim-2 (0.67 h, 18 plays); thresholds of both layers calibrated on bg-1..3 (1 h of non-catalog audio) for 1 false alarm / 24 h.",
        "",
        "| layer | settings | caught | false alarms | latency median s | p90 s |",
        "|---|---|---|---|---|---|",
    ]
    for label, windows in WINDOW_CONFIGS.items():
        stream_cfg = replace_section(cfg, "stream", windows_s=windows).stream
        folder = Path(args.traces) / label
        tuning = [cached_trace(folder, embedder, index, f, stream_cfg) for f in tuning_files]
        calibration = [cached_trace(folder, embedder, index, f, stream_cfg) for f in calibration_files]
        hysteresis = fit_statistics([run_statistic(*leaders(t.scores), cfg.decision.start_hops) for t in calibration], cfg)
        end = hysteresis["end_threshold"]
        for start in (hysteresis["start_threshold"], *HYSTERESIS_STARTS):
            tag = "calibrated " if start == hysteresis["start_threshold"] else ""
            s = figures(tuning, lambda: Hysteresis(start, min(end, start), cfg.decision.start_hops, cfg.decision.end_hops, lead_s=LEAD_S))
            lines.append(row("hysteresis", f"{label}, {tag}start {start:.3f}", s))
        tops = np.concatenate([leaders(t.scores)[1] for t in calibration])
        tops = tops[np.isfinite(tops)]
        for q in DRIFT_QUANTILES:
            drift = float(np.quantile(tops, q))
            for bonus in BONUSES:
                threshold = fit_statistics([evidence_statistic(t, drift, bonus) for t in calibration], cfg)["start_threshold"]
                s = figures(tuning, lambda: Sequential(threshold, end, drift, cfg.decision.end_hops, bonus, lead_s=LEAD_S))
                lines.append(row("CUSUM", f"{label}, drift q{q:g} = {drift:.3f}, bonus {bonus:g}, calibrated threshold {threshold:.2f}", s))
        if label == "w10-20-40":
            rise, along = rise_table(tuning), plays_along_table(tuning, calibration)
            drift = float(np.quantile(tops, CURVE_DRIFT_QUANTILE))
            curves = {
                "hysteresis (start_hops 2)": [figures(tuning, lambda: Hysteresis(t, min(end, t), cfg.decision.start_hops, cfg.decision.end_hops, lead_s=LEAD_S))
                                              for t in np.linspace(0.5, 1.0, 11)],
                f"CUSUM (drift q{CURVE_DRIFT_QUANTILE:g})": [figures(tuning, lambda: Sequential(h, end, drift, cfg.decision.end_hops, lead_s=LEAD_S))
                                                            for h in np.geomspace(0.05, 2.0, 11)],
            }  # fmt: skip
            plot_curves(Path(args.out).with_suffix(".png"), curves)
    lines += ["", "## How fast the evidence comes (tuning streams, default windows)", "", *rise, ""]
    lines += ["## Does the aligned position separate covers from other music?", "", *along, ""]
    lines += [f"Recall against false alarms per hour over threshold sweeps: [{Path(args.out).with_suffix('.png').name}]({Path(args.out).with_suffix('.png').name})", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
