"""Accelerated soak: many hours of audio across many streams through one daemon, as fast as it goes.

S streams are generated on the fly (nothing is held in memory beyond one segment per stream)
from the demo material: plays of catalog tunes (the reference recordings at a random gain,
so each must be identified) separated by out-of-catalog tunes, silence and noise cut from
the demo stream, with a ground-truth timeline per stream. They are published round-robin
as 0.5-s s16le chunks at 22050 Hz to an S-partition topic of a local Tansu broker, never more
than LEAD_S ahead of what the daemon has processed, and one real `coverwatch serve --source
kafka` (production windows 10/20/40 s, hop 2.5 s, calibrated thresholds, file + Kafka event
sinks) consumes them. Every SAMPLE_S the daemon's RSS and open file descriptors are read
from /proc. The run ends at H hours per stream or at the wall-time limit, whichever comes
first: each stream finishes its segment and gets TAIL_S of silence, the daemon drains and
is stopped with SIGTERM, and its events are scored against the timelines (coverwatch.evaluation.scoring).

Writes bench/soak.png (RSS and fds against audio processed) and the soak section of
bench/RESULTS.md.

Usage: python bench/bench_soak.py [--streams 20] [--hours 24] [--wall-s 600]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from kafka import KafkaProducer
from report import write_section  # bench/report.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the tests' broker and daemon helpers
from coverwatch.evaluation.demo import default_workdir, ensure_demo_data, ensure_demo_index
from coverwatch.evaluation.scoring import Play, score_stream
from coverwatch.streamer.config import Config
from coverwatch.streamer.frontend.audio import SAMPLE_RATE
from coverwatch.streamer.sources.wire import encode_chunk
from tests.broker import TansuBroker, free_port
from tests.daemon import Daemon, wait_for

SECTION = "## Soak (bench/bench_soak.py)"
CHUNK_S = 0.5  # seconds per published chunk
CHUNK = int(CHUNK_S * SAMPLE_RATE)  # samples per chunk
LEAD_S = 15.0  # audio seconds per stream published ahead of the daemon (bounds the broker's memory and the drain)
SAMPLE_S = 5.0  # wall seconds between RSS / fd samples
TAIL_S = 45.0  # silence after each stream's last segment: the last play's decision and match_end
GAP_MIN_S = 20.0  # non-catalog audio between two plays, so every play is a separate match
GRACE_S = 15.0  # a play is caught by a match_start up to this long after its end
T0_MS = 1_700_000_000_000
PLOT = Path(__file__).resolve().parent / "soak.png"
FULL_STREAMS, FULL_HOURS = 20, 24  # the endurance run the figures are projected to


@dataclass
class Material:
    """What streams are cut from: catalog references and non-catalog segments, (N,) float32 at SAMPLE_RATE."""

    catalog: dict[str, np.ndarray]
    fillers: list[tuple[str, np.ndarray]]  # ("out_of_catalog" | "silence" | "noise", audio)


def load_material(workdir: Path) -> Material:
    catalog = {}
    with (workdir / "catalog" / "refs.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            audio, rate = soundfile.read(workdir / "catalog" / row["path"], dtype="float32")
            assert rate == SAMPLE_RATE and audio.ndim == 1, (row["path"], rate, audio.shape)
            catalog[row["song_id"]] = audio
    stream, rate = soundfile.read(workdir / "stream.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    truth = json.loads((workdir / "truth.json").read_text())
    fillers = [
        (kind, stream[int(seg["start_s"] * rate) : int(seg["end_s"] * rate)]) for kind in ("out_of_catalog", "noise") for seg in truth[kind]
    ]
    return Material(catalog, fillers)


@dataclass
class StreamPlan:
    """One stream's generator: its next samples come from `pending`, refilled segment by segment."""

    stream_id: str
    rng: np.random.Generator
    material: Material
    plays: list[Play] = field(default_factory=list)
    fillers: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, start_s, end_s) between plays
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    generated_s: float = 0.0
    seq: int = 0
    last_song: str | None = None
    finishing: bool = False  # no new segment: play out `pending`, then the tail
    tail_added: bool = False

    def _append(self, audio: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, audio.astype(np.float32)])
        self.generated_s += len(audio) / SAMPLE_RATE

    def _gap(self) -> None:
        """At least GAP_MIN_S of fillers and silence."""
        start = self.generated_s
        while self.generated_s - start < GAP_MIN_S:
            begin = self.generated_s
            if self.rng.random() < 0.25:
                kind = "silence"
                self._append(np.zeros(int(self.rng.uniform(2.0, 8.0) * SAMPLE_RATE), np.float32))
            else:
                kind, audio = self.material.fillers[self.rng.integers(len(self.material.fillers))]
                self._append(audio * self.rng.uniform(0.6, 1.0))
            self.fillers.append((kind, begin, self.generated_s))

    def _play(self) -> None:
        songs = [s for s in self.material.catalog if s != self.last_song]
        song = songs[self.rng.integers(len(songs))]
        audio = self.material.catalog[song]
        start = self.generated_s
        self._append(audio * self.rng.uniform(0.5, 1.0))
        self.plays.append(Play(song, start, self.generated_s))
        self.last_song = song

    def next_chunk(self) -> np.ndarray | None:
        """(CHUNK,) float32, or None once the stream has ended."""
        if len(self.pending) < CHUNK:
            if not self.finishing:
                self._gap()
                self._play()
            elif not self.tail_added:  # whole chunks of silence after the last play
                self._append(np.zeros(int(TAIL_S * SAMPLE_RATE) + (-len(self.pending)) % CHUNK, np.float32))
                self.tail_added = True
            elif len(self.pending) == 0:
                return None
        chunk, self.pending = self.pending[:CHUNK], self.pending[CHUNK:]
        return chunk

    @property
    def published_s(self) -> float:
        return self.seq * CHUNK_S


@dataclass
class Sample:
    wall_s: float
    audio_s: float
    rss_mb: float
    fds: int
    broker_rss_mb: float
    load1: float


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def write_config(path: Path, bootstrap: str, topic: str, events_file: Path) -> Path:
    path.write_text(
        f"""[sinks]
stdout = false
file = "{events_file}"
[kafka]
bootstrap_servers = "{bootstrap}"
audio_topics = ["{topic}"]
events_topic = "{topic}.events"
dead_letter_topic = "{topic}.dlq"
checkpoint_topic = "{topic}.checkpoints"
group_id = "soak-{uuid.uuid4().hex[:6]}"
[metrics]
port = {free_port()}
"""
    )
    return path


class Publisher(threading.Thread):
    """Round-robin over the streams, one chunk each per turn, at most LEAD_S ahead of the daemon."""

    def __init__(self, bootstrap: str, topic: str, plans: list[StreamPlan], hours: float, processed_s) -> None:
        super().__init__(name="publisher", daemon=True)
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_in_flight_requests_per_connection=1)
        self.topic, self.plans, self.hours, self.processed_s = topic, plans, hours, processed_s
        self.stop_requested = threading.Event()
        self.published_s = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by main()
            self.error = exc

    def _run(self) -> None:
        live = list(self.plans)
        while live:
            while self.published_s - self.processed_s() > LEAD_S * len(self.plans):
                time.sleep(0.2)
            for plan in list(live):
                if self.stop_requested.is_set() or plan.published_s >= self.hours * 3600:
                    plan.finishing = True
                chunk = plan.next_chunk()
                if chunk is None:
                    live.remove(plan)
                    continue
                key, value, headers = encode_chunk(plan.stream_id, chunk, SAMPLE_RATE, plan.seq, T0_MS + round(1000 * plan.seq * CHUNK_S))
                self.producer.send(self.topic, key=key, value=value, headers=headers)
                plan.seq += 1
                self.published_s += CHUNK_S
        self.producer.flush()
        self.producer.close()


def during(plan: StreamPlan, time_s: float) -> str:
    """What the stream played at `time_s`: a filler kind, "catalog play" or "tail"."""
    for kind, start, end in plan.fillers:
        if start <= time_s < end:
            return kind
    return "catalog play" if any(p.start_s <= time_s < p.end_s + GRACE_S for p in plan.plays) else "tail"


def score(events: list[dict], plans: list[StreamPlan]) -> dict:
    caught = missed = false = 0
    latencies = []
    false_during: dict[str, int] = {}
    for plan in plans:
        # On Kafka, stream_time_s is the capture clock: seconds since T0_MS on the timelines' scale.
        mine = [{**e, "stream_time_s": e["stream_time_s"] - T0_MS / 1000} for e in events if e["stream"] == plan.stream_id]
        result = score_stream(mine, plan.plays, GRACE_S)
        caught += len(result.caught)
        missed += len(result.missed)
        false += len(result.false_matches)
        for e in result.false_matches:  # the decision lags the audio: look a window back
            kind = during(plan, e["stream_time_s"] - 10.0)
            false_during[kind] = false_during.get(kind, 0) + 1
        latencies += [latency for _, latency in result.caught]
    starts = sum(e["event"] == "match_start" for e in events)
    ends = sum(e["event"] == "match_end" for e in events)
    plays = sum(len(p.plays) for p in plans)
    return {"plays": plays, "caught": caught, "missed": missed, "false": false, "starts": starts, "ends": ends,
            "latency_s": float(np.median(latencies)) if latencies else float("nan"),
            "false_during": ", ".join(f"{n} in {kind}" for kind, n in sorted(false_during.items())) or "none"}  # fmt: skip


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [s.audio_s / 3600 for s in samples]
    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_rss.plot(hours, [s.rss_mb for s in samples], label="daemon RSS")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_ylim(0, max(s.rss_mb for s in samples) * 1.2)
    ax_rss.legend(loc="lower right")
    ax_fd.plot(hours, [s.fds for s in samples], color="tab:orange", label="daemon open fds")
    ax_fd.set_ylabel("open file descriptors")
    ax_fd.set_ylim(0, max(s.fds for s in samples) * 1.5)
    ax_fd.set_xlabel("hours of audio processed (all streams)")
    ax_fd.legend(loc="lower right")
    fig.suptitle(f"coverwatch soak: one daemon, sampled every {SAMPLE_S:.0f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--hours", type=float, default=24.0, help="hours of audio per stream (the run may end sooner: --wall-s)")
    parser.add_argument("--wall-s", type=float, default=600.0, help="stop generating after this many wall seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md and soak.png alone")
    args = parser.parse_args()
    workdir = ensure_demo_data(default_workdir())
    material = load_material(workdir)
    model_dir = Path(__file__).resolve().parents[1] / "streamer" / "default_model"
    index_dir = ensure_demo_index(workdir, Config())
    rng = np.random.default_rng(args.seed)
    plans = [StreamPlan(f"station-{i:02d}", np.random.default_rng(rng.integers(2**32)), material) for i in range(args.streams)]
    samples: list[Sample] = []
    with TansuBroker() as broker, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        topic = broker.create_topic(f"soak-{uuid.uuid4().hex[:6]}", args.streams)
        events_file = tmp / "events.jsonl"
        daemon = Daemon(tmp, "soak", write_config(tmp / "soak.toml", broker.bootstrap, topic, events_file), model_dir, index_dir)
        with daemon:
            pid = daemon.proc.pid
            started = time.monotonic()

            def processed_s() -> float:
                return daemon.metric("coverwatch_audio_seconds_total")

            def take_sample() -> None:
                now, load1 = time.monotonic() - started, os.getloadavg()[0]
                samples.append(Sample(now, processed_s(), rss_mb(pid), open_fds(pid), rss_mb(broker.process.pid), load1))

            publisher = Publisher(broker.bootstrap, topic, plans, args.hours, processed_s)
            publisher.start()
            while publisher.is_alive() or processed_s() < publisher.published_s - 1e-6:
                take_sample()
                if time.monotonic() - started > args.wall_s:
                    publisher.stop_requested.set()
                assert daemon.proc.poll() is None, daemon.logs()
                assert publisher.error is None, publisher.error
                time.sleep(SAMPLE_S)
            wait_for(lambda: processed_s() >= publisher.published_s - 1e-6, 600, "daemon did not catch up", daemon)
            take_sample()
            wall_s = time.monotonic() - started
            metrics = daemon.metrics()
            code = daemon.stop(timeout=60)
        events = [json.loads(line) for line in events_file.read_text().splitlines()]
    result = score(events, plans)
    audio_s = samples[-1].audio_s
    warm = next((s for s in samples if s.wall_s >= 0.1 * wall_s), samples[0])  # after model load and the first windows
    rss, fds = [s.rss_mb for s in samples], [s.fds for s in samples]
    late = [s.rss_mb for s in samples if s.wall_s >= 0.5 * wall_s]
    full_s = FULL_STREAMS * FULL_HOURS * 3600
    cpu_s = metrics.get("process_cpu_seconds_total", float("nan"))
    command = "python bench/bench_soak.py " + " ".join(sys.argv[1:])
    markdown = f"""{SECTION}

Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (1-min load average during the run: {min(s.load1 for s in samples):.1f}-{max(s.load1 for s in samples):.1f}) · command: `{command}`

{args.streams} generated streams (catalog tunes at random gain between non-catalog tunes, noise and silence cut from the demo stream; 22050 Hz s16le, {CHUNK_S}-s chunks) on a
{args.streams}-partition topic of a local Tansu broker, fed as fast as one daemon (windows 10/20/40 s, hop 2.5 s, calibrated thresholds, file and Kafka event sinks) takes them;
the daemon's RSS and open fds read from /proc every {SAMPLE_S:.0f} s ({len(samples)} samples). Plot: [soak.png](soak.png).

| figure | value |
|---|---|
| audio processed | {audio_s / 3600:.2f} h ({audio_s / args.streams / 60:.1f} min per stream) in {wall_s:.0f} s wall: {audio_s / wall_s:.1f} s of audio per wall second; daemon CPU {cpu_s:.0f} s: {audio_s / cpu_s:.1f} s of audio per CPU second |
| daemon RSS: start (after {warm.wall_s:.0f} s) / end / max | {warm.rss_mb:.0f} / {rss[-1]:.0f} / {max(rss):.0f} MiB (second half of the run: {min(late):.0f}-{max(late):.0f} MiB) |
| daemon open fds: start (after {warm.wall_s:.0f} s) / end / max | {warm.fds} / {fds[-1]} / {max(fds)} |
| events vs ground truth | {result["plays"]} catalog plays: {result["caught"]} caught, {result["missed"]} missed, {result["false"]} false match_start ({result["false_during"]}); {result["starts"]} match_start / {result["ends"]} match_end events; median detection {result["latency_s"]:.1f} s after the play began |
| exit code after SIGTERM | {code} |
| {FULL_HOURS} h x {FULL_STREAMS} streams | {full_s / (audio_s / wall_s) / 3600:.1f} h of wall time at this run's speed; {full_s / (audio_s / cpu_s) / 3600:.1f} daemon CPU-hours (what a machine that gives the daemon its cores needs, divided by the cores it uses) |
"""
    print(markdown)
    if not args.no_write:
        plot(samples, PLOT)
        write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
