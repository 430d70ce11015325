"""`coverwatch demo`: the daemon's main job on the bundled default, end to end.

1. render (once, cached) a demo catalog of ~30 folk tunes and a ~5-minute stream in which
   some catalog tunes are played as covers (other instrument, key, tempo, accompaniment)
   between out-of-catalog tunes, silence and noise (model/dataset.py: build_demo);
2. build (once per model) an index of the catalog with the shipped model, and calibrate it
   (once) on an hour of simulated non-catalog broadcast (coverwatch/evaluation/simulate.py, background
   mode, none of the demo's tunes), so the daemon decides with thresholds set for
   `index_build.target_false_alarms_per_day`;
3. run the real daemon (`Server`) over the stream, printing match events as they happen;
4. print which plays were caught and missed, and any false match, against the ground truth.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from coverwatch.evaluation.scoring import Play, score_stream
from coverwatch.index_builder.build import build_index
from coverwatch.index_builder.refs import read_refs
from coverwatch.streamer.config import Config, replace_section
from coverwatch.streamer.decide.calibration import settings_drift
from coverwatch.streamer.embed.artifacts import load_model_info, resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.store import FORMAT_VERSION, read_manifest
from coverwatch.streamer.service.daemon import ExitCode, Server
from coverwatch.streamer.sinks.events import MatchEvent

log = logging.getLogger(__name__)

CALIBRATION_SEED = 1  # the demo's calibration audio (a background stream of coverwatch/evaluation/simulate.py)
# An hour gives the 60 one-minute blocks below which `coverwatch calibrate` warns: on the
# simulated catalog the start threshold's 90 % bootstrap interval was 0.19 wide from 20 minutes
# of audio, 0.09 from an hour.
CALIBRATION_MINUTES = 60.0


def default_workdir() -> Path:
    return Path(os.environ.get("COVERWATCH_CACHE", Path.home() / ".cache" / "coverwatch")) / "demo"


class CollectingSink:
    """Keeps events in memory for the final score."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def add(self, event: MatchEvent) -> None:
        self.events.append(json.loads(event.to_json()))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def ensure_demo_data(workdir: Path) -> Path:
    if (workdir / "truth.json").exists() and (workdir / "catalog" / "refs.csv").exists():
        return workdir
    try:
        from coverwatch.model.dataset import build_demo
    except ImportError as exc:
        raise ImportError(f"rendering the demo needs the data extra (pip install '.[data]'): {exc}") from None
    log.info("rendering demo catalog and stream into %s (once)", workdir)
    return build_demo(workdir)


def ensure_demo_index(workdir: Path, cfg: Config, calibrated: bool = False) -> Path:
    """The demo catalog's index for the configured model (built once); with `calibrated`,
    also its stream calibration (rendered and measured once)."""
    model_dir = resolve_model_dir(cfg.model.path)
    # Named by model and index format: a model or format change builds a new one.
    index_dir = workdir / f"index-{load_model_info(model_dir).model_hash}-format{FORMAT_VERSION}"
    if not (index_dir / "manifest.json").exists():
        embedder = Embedder(model_dir, cfg.model.threads)
        build_index(read_refs(workdir / "catalog" / "refs.csv"), index_dir, embedder, cfg.index_build, cfg.stream, force=True)  # its own cache: a half-built one is replaced
    stream_calibration = read_manifest(index_dir).get("calibration", {}).get("stream") or {}
    # An index calibrated on less audio than the demo now renders (an older cache), or with
    # other scoring settings than the config's, is calibrated again.
    stale = stream_calibration.get("audio_s", 0.0) < 0.5 * CALIBRATION_MINUTES * 60.0 or settings_drift(
        {"stream": stream_calibration}, cfg.stream
    )
    if calibrated and stale:
        from coverwatch.evaluation.simulate import simulate_stream
        from coverwatch.index_builder.calibrate import calibrate_index

        truth = json.loads((workdir / "truth.json").read_text())
        demo_tunes = {ref.song_id for ref in read_refs(workdir / "catalog" / "refs.csv")}
        demo_tunes |= {o["tune_id"].replace("/", "_") for o in truth["out_of_catalog"]}
        log.info("rendering %.0f min of non-catalog audio to calibrate the demo index (once)", CALIBRATION_MINUTES)
        audio = simulate_stream(
            workdir / "calibration", CALIBRATION_SEED, CALIBRATION_MINUTES * 60.0, background=True, exclude=frozenset(demo_tunes)
        )
        calibrate_index(index_dir, [audio], Embedder(model_dir, cfg.model.threads), cfg)
    return index_dir


def summarize(events: list[dict], truth: dict) -> list[str]:
    plays = [Play(p["song_id"], p["start_s"], p["end_s"]) for p in truth["plays"]]
    titles = {p["song_id"]: p["title"] for p in truth["plays"]}
    result = score_stream(events, plays)
    lines = ["", f"demo result: caught {len(result.caught)} of {len(plays)} covers, {len(result.false_matches)} false match(es)"]
    for play, latency in result.caught:
        lines.append(
            f"  CAUGHT  {play.song_id:32s} {titles[play.song_id][:30]:30s} played {play.start_s:6.1f}-{play.end_s:6.1f} s, detected after {latency:4.1f} s"
        )
    for play in result.missed:
        lines.append(f"  MISSED  {play.song_id:32s} {titles[play.song_id][:30]:30s} played {play.start_s:6.1f}-{play.end_s:6.1f} s")
    for event in result.false_matches:
        lines.append(f"  FALSE   {event['song_id']:32s} at {event['stream_time_s']:6.1f} s (score {event['score']:.3f})")
    return lines


def run_demo(cfg: Config, workdir: Path | None, realtime: bool = False) -> ExitCode:
    workdir = ensure_demo_data(workdir or default_workdir())
    cfg = replace_section(cfg, "index", path=str(ensure_demo_index(workdir, cfg, calibrated=True)))
    cfg = replace_section(cfg, "metrics", port=0)  # a demo run must not collide with a running service
    server = Server(cfg, f"file:{workdir / 'stream.wav'}", fast=not realtime, stream_id="demo-radio")
    collector = CollectingSink()
    server.sinks.sinks.append(collector)
    code = server.run()
    truth = json.loads((workdir / "truth.json").read_text())
    thresholds = server.monitor.thresholds
    print("\n".join(summarize(collector.events, truth)), flush=True)
    print(f"thresholds: start {thresholds.start:.3f}, end {thresholds.end:.3f} ({thresholds.source})", flush=True)
    return code
