"""N concurrent live streams on this machine: the batched Monitor against two baselines.

For each N, every stream is first brought to steady state (all windows filled), then fed
`--timed-s` seconds of real rendered audio (the demo stream, each stream at its own offset)
as 0.5-s chunks, round-robin over the streams, as fast as possible. Three ways of running:

  batched    Monitor.submit chunk by chunk, one Monitor.flush after every `--poll-records`
             chunks (what the Kafka daemon does with each poll batch; default
             `[kafka] max_poll_records`) and at the end of each round over the streams: the
             due windows of the batch go through the encoder together (equal lengths, up to
             `[model] batch_size` per call) and one FAISS search;
  unbatched  Monitor.process_chunk per chunk: decisions taken stream by stream (the
             daemon's file/microphone path, and the Kafka path before batching);
  naive      no rolling state: at every hop each window's CQT is recomputed from its raw
             audio, each window embedded and searched on its own, one stream at a time.

Streams' decision times are staggered over the hop (five phases), as independent live
streams are. Figures: aggregate real-time factor (stream audio seconds per wall second;
the machine keeps up with N live streams while it is >= N), CPU seconds per stream-audio
second, chunk-to-decision latency (a chunk's submit until its batch's decisions are taken;
p50/p99 over all chunks and over chunks that made a decision due), RSS per stream.

Usage: python bench/bench_streams.py [--streams 1 10 50 100 200 400] [--naive-up-to 50]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import soxr  # noqa: E402
from report import write_section  # noqa: E402  bench/report.py, beside this script

from coverwatch.evaluation.demo import default_workdir, ensure_demo_data, ensure_demo_index  # noqa: E402
from coverwatch.streamer.config import Config  # noqa: E402
from coverwatch.streamer.decide.hysteresis import Hysteresis  # noqa: E402
from coverwatch.streamer.embed.artifacts import DEFAULT_MODEL_DIR  # noqa: E402
from coverwatch.streamer.embed.embedder import Embedder  # noqa: E402
from coverwatch.streamer.frontend.audio import SAMPLE_RATE, seconds_to_frames  # noqa: E402
from coverwatch.streamer.search.store import IndexStore, load_index  # noqa: E402
from coverwatch.streamer.service.pipeline import Monitor  # noqa: E402

SECTION_PREFIX = "## Many streams (bench/bench_streams.py"
CHUNK_S = 0.5
PLOT_PATTERN = "streams_scaling_hop{hop:g}_poll{poll}.png"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def state_bytes(state) -> int:
    """Memory held by one stream's state: the frame ring (the bulk), pending CQT input,
    per-song score history (bounded by history_hops x songs retrieved)."""
    ring = state.ring._frames.nbytes + state.ring._energy.nbytes
    history = sum(64 + 8 * len(scores) for scores in state.decider.history.values())
    return ring + state.cqt._pending.nbytes + history


@dataclass
class Run:
    mode: str
    streams: int
    audio_s: float  # stream audio processed in the timed part (all streams)
    wall_s: float
    cpu_s: float
    latency_ms: np.ndarray  # per chunk
    deciding: np.ndarray  # per chunk: True when the chunk made a decision due
    state_mb: float = float("nan")  # per stream
    stages: dict = dataclasses.field(default_factory=dict)  # wall s per Monitor stage (batched/unbatched)

    @property
    def rtf(self) -> float:
        return self.audio_s / self.wall_s

    def pct(self, q: float, deciding_only: bool = False) -> float:
        lat = self.latency_ms[self.deciding] if deciding_only else self.latency_ms
        return float(np.percentile(lat, q)) if len(lat) else float("nan")


def offsets(n: int, audio_len: int, need: int) -> list[int]:
    """A distinct start sample per stream, spread over the source audio."""
    span = max(1, audio_len - need)
    return [int((i * 37.3 * SAMPLE_RATE) % span) for i in range(n)]


def n_phases(cfg: Config) -> int:
    """Decision phases to stagger streams over: the chunks in one hop."""
    return max(1, round(cfg.stream.hop_s / CHUNK_S))


def warm_templates(monitor: Monitor, audio: np.ndarray, warm_s: float, phases: int) -> list:
    """`phases` streams in steady state, warmed with 0..phases-1 extra chunks so that their
    next decisions fall in different rounds; returned as detached StreamStates."""
    templates = []
    for phase in range(phases):
        sid = f"template{phase}"
        monitor.submit(sid, audio[: int((warm_s + phase * CHUNK_S) * SAMPLE_RATE)], SAMPLE_RATE)
        monitor.flush()
        templates.append(monitor.streams.pop(sid))
    return templates


def clone(monitor: Monitor, template, stream_id: str):
    """A new stream in the template's steady state (deep copy sharing the ONNX sessions)."""
    state = copy.deepcopy(template, memo={id(monitor.embedder): monitor.embedder})
    state.stream_id = stream_id
    monitor.streams[stream_id] = state
    return state


def run_monitor(
    mode: str, monitor: Monitor, audio: np.ndarray, n: int, warm_s: float, timed_s: float, templates: list, poll_records: int
) -> Run:
    monitor.streams.clear()
    starts = offsets(n, len(audio), int((warm_s + timed_s + len(templates) * CHUNK_S) * SAMPLE_RATE))
    positions = {}
    for i in range(n):
        state = clone(monitor, templates[i % len(templates)], f"s{i}")
        positions[state.stream_id] = starts[i] + state.samples_in
    held = sum(state_bytes(state) for state in monitor.streams.values()) / n / 2**20
    chunk = int(CHUNK_S * SAMPLE_RATE)
    latencies, deciding = [], []
    stages0 = dict(monitor.times.seconds)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(round(timed_s / CHUNK_S)):
        submitted = []
        for sid, pos in positions.items():
            before = monitor.counts["decisions"]
            t0 = time.perf_counter()
            if mode == "batched":
                monitor.submit(sid, audio[pos : pos + chunk], SAMPLE_RATE)
                submitted.append(t0)
                if len(submitted) == poll_records:  # 0: never here, once per round
                    monitor.flush()
                    done = time.perf_counter()
                    latencies.extend(done - t for t in submitted)
                    submitted = []
            else:
                monitor.process_chunk(sid, audio[pos : pos + chunk], SAMPLE_RATE)
                latencies.append(time.perf_counter() - t0)
            deciding.append(monitor.counts["decisions"] > before)
            positions[sid] = pos + chunk
        if submitted:
            monitor.flush()
            done = time.perf_counter()
            latencies.extend(done - t for t in submitted)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    monitor.streams.clear()
    stages = {k: v - stages0.get(k, 0.0) for k, v in monitor.times.seconds.items()}
    return Run(mode, n, n * timed_s, wall, cpu, np.array(latencies) * 1000, np.array(deciding), held, stages)


class NaiveStream:
    """Baseline: raw audio of the longest window; every hop recomputes everything."""

    def __init__(self, cfg: Config, thresholds: tuple[float, float], keep: int) -> None:
        self.audio = np.zeros(0, np.float32)
        self.keep = keep
        self.samples = 0
        self.next_hop = 0
        self.decider = Hysteresis(*thresholds, cfg.decision.start_hops, cfg.decision.end_hops, cfg.decision.history_hops)

    def push(self, samples: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, samples])[-self.keep :]
        self.samples += len(samples)


def naive_hop(stream: NaiveStream, embedder: Embedder, index: IndexStore, cfg: Config, time_s: float) -> None:
    scores: dict[int, float] = {}
    for window_s in cfg.stream.windows_s:
        need = (seconds_to_frames(window_s) - 1) * 512 + embedder.kernel_length
        if len(stream.audio) < need:
            continue
        frames = embedder.cqt(np.ascontiguousarray(stream.audio[-need:]))
        for song, score in index.best_per_song(embedder.embed(frames[None]), cfg.stream.top_k).items():
            scores[song] = max(scores.get(song, -1.0), score)
    stream.decider.update(scores, time_s)


def run_naive(monitor: Monitor, cfg: Config, audio: np.ndarray, n: int, warm_s: float, timed_s: float) -> Run:
    keep = (seconds_to_frames(max(cfg.stream.windows_s)) - 1) * 512 + monitor.embedder.kernel_length
    hop = int(cfg.stream.hop_s * SAMPLE_RATE)
    phases = n_phases(cfg)
    starts = offsets(n, len(audio), int((warm_s + timed_s + phases * CHUNK_S) * SAMPLE_RATE))
    streams, positions = [], []
    for i in range(n):  # steady state: the buffer full, phases staggered like the Monitor runs
        stream = NaiveStream(cfg, (monitor.thresholds.start, monitor.thresholds.end), keep)
        warm = int((warm_s + (i % phases) * CHUNK_S) * SAMPLE_RATE)
        stream.push(audio[starts[i] : starts[i] + warm])
        stream.next_hop = (warm // hop + 1) * hop
        streams.append(stream)
        positions.append(starts[i] + warm)
    chunk = int(CHUNK_S * SAMPLE_RATE)
    latencies, deciding = [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(round(timed_s / CHUNK_S)):
        for i, stream in enumerate(streams):
            t0 = time.perf_counter()
            stream.push(audio[positions[i] : positions[i] + chunk])
            positions[i] += chunk
            due = stream.samples >= stream.next_hop
            if due:
                naive_hop(stream, monitor.embedder, monitor.index, cfg, stream.next_hop / SAMPLE_RATE)
                stream.next_hop += hop
            latencies.append(time.perf_counter() - t0)
            deciding.append(due)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Run("naive", n, n * timed_s, wall, cpu, np.array(latencies) * 1000, np.array(deciding))


def plot(runs: list[Run], path: Path) -> None:
    fig, (ax_rtf, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("batched", "o-"), ("unbatched", "s--"), ("naive", "x:")):
        rs = [r for r in runs if r.mode == mode]
        if not rs:
            continue
        ns = [r.streams for r in rs]
        ax_rtf.plot(ns, [r.rtf for r in rs], style, label=mode)
        ax_lat.plot(ns, [r.pct(99, True) for r in rs], style, label=f"{mode} p99 (deciding chunks)")
    top = max(r.streams for r in runs)
    ax_rtf.plot([1, top], [1, top], "k-", lw=0.8, label="needed: N streams in real time")
    for ax in (ax_rtf, ax_lat):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_rtf.set_ylabel("stream audio s per wall s (aggregate)")
    ax_lat.set_ylabel("chunk-to-decision latency (ms)")
    ax_lat.axhline(250, color="r", lw=0.8)
    fig.suptitle("coverwatch: concurrent streams on this machine (fed as fast as possible)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def flush_rule(poll_records: int) -> str:
    return "flush every round" if poll_records == 0 else f"flush every {poll_records} chunks"


def to_markdown(
    section: str, runs: list[Run], cfg: Config, command: str, load: tuple[float, ...], timed_s: float, rss_gb: float,
    poll_records: int, plot_name: str,
) -> str:  # fmt: skip
    rows = []
    batched = {r.streams: r for r in runs if r.mode == "batched"}
    for r in runs:
        gain = batched[r.streams].rtf / r.rtf if r.mode != "batched" and r.streams in batched else float("nan")
        rows.append(
            f"| {r.streams} | {r.mode} | {r.rtf:.1f}x | {'yes' if r.rtf >= r.streams else 'no'} | {1000 * r.cpu_s / r.audio_s:.1f} ms "
            f"| {r.pct(50):.0f} / {r.pct(99):.0f} | {r.pct(50, True):.0f} / {r.pct(99, True):.0f} "
            f"| {r.state_mb:.2f} | {'' if np.isnan(gain) else f'{gain:.1f}x'} |"
        )
    keeps = [n for n, r in batched.items() if r.rtf >= n]
    widest = batched[max(batched)] if batched else None
    split = ", ".join(f"{k} {100 * v / sum(widest.stages.values()):.0f} %" for k, v in sorted(widest.stages.items(), key=lambda kv: -kv[1])) if widest and widest.stages else "n/a"
    if poll_records == 0:
        batch_rule = "one batch per round of chunks, so it includes the round"
    else:
        batch_rule = f"a batch is {poll_records} chunks (a Kafka poll batch of `max_poll_records` {poll_records}) or the rest of a round"
    return f"""{section}

Date: {datetime.date.today().isoformat()} · machine: {platform.machine()}, {os.cpu_count()} cores, load average before the run {load[0]:.2f} · onnxruntime threads {cfg.model.threads}, encoder batch {cfg.model.batch_size}, FAISS threads {cfg.index.threads} · command: `{command}`

Real rendered audio (the demo stream, each stream at its own offset, 22050 Hz mono so no
resampling), windows {cfg.stream.windows_s} s every {cfg.stream.hop_s} s (all filled: steady
state), {CHUNK_S}-s chunks, {timed_s:.0f} s of audio per stream timed, decisions staggered over
the {n_phases(cfg)} chunks of a hop. *RT factor* = stream audio seconds per wall second over all streams; the
machine keeps up with N live streams when it is >= N. Latency: from a chunk's submit until
its batch's decisions are taken (batched: {batch_rule});
*gain* = batched RT factor / this mode's. State per stream = bytes held by a
steady-state stream (frame ring, pending CQT input, score history); peak process RSS over
the whole run (model, index, all streams): {rss_gb:.2f} GiB.

| N | mode | RT factor | keeps up | CPU per stream-audio s | latency p50 / p99, all chunks (ms) | p50 / p99, deciding chunks (ms) | state / stream (MB) | batched gain |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Largest N measured that keeps up in real time (batched): {max(keeps) if keeps else "none"}. Wall time by stage at
N = {widest.streams if widest else "n/a"} (batched): {split}.

![streams scaling]({plot_name})
"""


def prepare(cfg: Config, workdir: Path) -> tuple[Monitor, np.ndarray, float, list]:
    """The demo index and stream, a Monitor as the daemon builds it, and the steady-state
    stream templates: (monitor, stream audio at SAMPLE_RATE, warm-up seconds, templates)."""
    ensure_demo_data(workdir)
    index_dir = ensure_demo_index(workdir, cfg)
    embedder = Embedder(DEFAULT_MODEL_DIR, cfg.model.threads)
    monitor = Monitor(embedder, load_index(index_dir, embedder.info.model_hash), cfg.stream, cfg.decision, batch_size=cfg.model.batch_size)
    import faiss

    faiss.omp_set_num_threads(cfg.index.threads)
    audio, rate = soundfile.read(workdir / "stream.wav", dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE).astype(np.float32)
    warm_s = max(cfg.stream.windows_s) + cfg.stream.hop_s
    return monitor, audio, warm_s, warm_templates(monitor, audio, warm_s, n_phases(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=default_workdir())
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 10, 50, 100, 200, 400])
    parser.add_argument("--unbatched-up-to", type=int, default=100, help="the per-chunk baseline grows linearly; stop measuring it here")
    parser.add_argument("--naive-up-to", type=int, default=50)
    parser.add_argument("--timed-s", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=None, help="override [model] batch_size")
    parser.add_argument("--threads", type=int, default=None, help="override [model] threads (onnxruntime intra-op)")
    parser.add_argument("--hop-s", type=float, default=None, help="override [stream] hop_s (the issue's target is stated for 5 s)")
    parser.add_argument(
        "--poll-records",
        type=int,
        default=Config().kafka.max_poll_records,
        help="batched: flush after this many chunks (a Kafka poll batch); 0 = once per round over all streams",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    args = parser.parse_args()
    load = os.getloadavg()
    cfg = Config()
    if args.batch_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, batch_size=args.batch_size))
    if args.threads:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, threads=args.threads))
    if args.hop_s:
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, hop_s=args.hop_s))
    monitor, audio, warm_s, templates = prepare(cfg, args.workdir)
    runs = []
    for n in args.streams:
        modes = ["batched"] + (["unbatched"] if n <= args.unbatched_up_to else [])
        for mode in modes:
            runs.append(run_monitor(mode, monitor, audio, n, warm_s, args.timed_s, templates, args.poll_records))
            r = runs[-1]
            print(f"N={n:4d} {mode:9s} RT {r.rtf:7.1f}x  p99(deciding) {r.pct(99, True):7.0f} ms  state/stream {r.state_mb:.2f} MB", flush=True)
        if n <= args.naive_up_to:
            runs.append(run_naive(monitor, cfg, audio, n, warm_s, args.timed_s))
            print(f"N={n:4d} naive     RT {runs[-1].rtf:7.1f}x", flush=True)
    plot_path = Path(__file__).with_name(PLOT_PATTERN.format(hop=cfg.stream.hop_s, poll=args.poll_records))
    if not args.no_write:
        plot(runs, plot_path)
    section = f"{SECTION_PREFIX}, hop {cfg.stream.hop_s:g} s, {flush_rule(args.poll_records)})"
    command = "python bench/bench_streams.py " + " ".join(sys.argv[1:])
    markdown = to_markdown(section, runs, cfg, command, load, args.timed_s, peak_rss_bytes() / 2**30, args.poll_records, plot_path.name)
    print(markdown)
    if not args.no_write:
        write_section(section, markdown)


if __name__ == "__main__":
    main()
