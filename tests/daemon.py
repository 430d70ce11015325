"""Run `coverwatch serve` as a real subprocess and watch it: metrics over HTTP, logs, exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from coverwatch.streamer.sources.wire import encode_chunk
from tests.broker import free_port


def write_config(
    path: Path, bootstrap: str, audio_topic: str, events_topic: str, group: str, metrics_port: int, thresholds: str = "", kafka_extra: str = ""
) -> Path:
    """A daemon config for tests: short windows and hops, fast group membership, a free metrics port.

    `thresholds` holds start_threshold/end_threshold lines for the [decision] table,
    `kafka_extra` more lines for the [kafka] table."""
    path.write_text(
        f"""
[stream]
windows_s = [10.0, 20.0]
hop_s = 1.0
# the embedding score alone: the tests' thresholds are set between this model's measured
# embedding scores (test_kafka.shipped_model_index); the alignment term is tested elsewhere
align_weight = 0.0
[decision]
{thresholds}
start_hops = 1
end_hops = 2
history_hops = 4
[sinks]
stdout = true
[kafka]
bootstrap_servers = "{bootstrap}"
audio_topics = ["{audio_topic}"]
events_topic = "{events_topic}"
dead_letter_topic = "{audio_topic}.dlq"
checkpoint_topic = "{audio_topic}.checkpoints"
group_id = "{group}"
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
send_timeout_s = 3.0
retry_backoff_max_s = 1.0
{kafka_extra}
[metrics]
port = {metrics_port}
"""
    )
    return path


class Daemon:
    """`coverwatch serve --source kafka` in a subprocess, stdout/stderr to files."""

    def __init__(self, tmp_path: Path, name: str, config: Path, model_dir: Path, index_dir: Path, env: dict | None = None) -> None:
        self.name, self.config = name, config
        self.stdout_path, self.stderr_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        self.args = [sys.executable, "-m", "coverwatch", "--config", str(config), "serve", "--source", "kafka",
                     "--model", str(model_dir), "--index", str(index_dir)]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.port = int(next(line.split("=")[1] for line in config.read_text().splitlines() if line.startswith("port")))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(self.args, stdout=self.stdout_path.open("w"), stderr=self.stderr_path.open("w"), env=self.env)
        wait_for(lambda: self.metrics() is not None, 60, f"{self.name} never served metrics", self)
        return self

    def metrics(self) -> dict[str, float] | None:
        """{'name{label=value,...}': value} from a real scrape, or None if not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def metric(self, key: str) -> float:
        return (self.metrics() or {}).get(key, 0.0)

    def chunks(self, outcome: str = "processed") -> float:
        return self.metric(f"coverwatch_chunks_total{{outcome={outcome}}}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def logs(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the daemon if it still runs (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, message: str, daemon: Daemon | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"{message}: {daemon.name} exited {daemon.proc.returncode}\n{daemon.logs()}")
        time.sleep(0.2)
    raise AssertionError(f"{message} (after {timeout:.0f} s)" + (f"\n{daemon.logs()}" if daemon else ""))


def send_stream(
    bootstrap: str, topic: str, stream_id: str, audio: np.ndarray, rate: int, chunk_s: float = 0.5,
    first_seq: int = 0, t0_ms: int = 1_700_000_000_000, skip: frozenset[int] = frozenset(),
) -> int:  # fmt: skip
    """Send `audio` as chunks first_seq.. with a fixed capture clock; returns the next seq."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_in_flight_requests_per_connection=1)
    step = int(chunk_s * rate)
    seq = first_seq
    for start in range(0, len(audio), step):
        if seq not in skip:
            key, value, headers = encode_chunk(stream_id, audio[start : start + step], rate, seq, t0_ms + round(1000 * seq * chunk_s))
            producer.send(topic, key=key, value=value, headers=headers)
        seq += 1
    producer.flush()
    producer.close()
    return seq


__all__ = ["Daemon", "free_port", "send_stream", "wait_for", "write_config"]
