"""Prometheus metrics of the daemon, served over HTTP at /metrics (`[metrics] port`).

Names follow Prometheus conventions: base units (seconds), `_total` for counters, and only
bounded label values (stages, outcomes, reasons, partitions), never one per song or stream.
Each `Metrics` owns its registry, so several daemons can live in one test process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.process_collector import ProcessCollector

from coverwatch.streamer.sinks.events import EVENT_KINDS

log = logging.getLogger(__name__)

STAGES = ("decode", "resample", "cqt", "embed", "search", "align", "decide")
CHUNK_OUTCOMES = ("processed", "bad_chunk", "dead_letter", "duplicate", "replayed")
# Stage work is milliseconds; a whole chunk including a decision is tens of ms to seconds.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsPortError(OSError):
    """The /metrics server cannot listen on the configured address and port."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds
        self.chunks = Counter("coverwatch_chunks_total", "Audio chunks by outcome", ["outcome"], registry=r)
        self.audio_seconds = Counter("coverwatch_audio_seconds_total", "Seconds of audio processed", registry=r)
        self.stage_seconds = Histogram("coverwatch_stage_seconds", "Time per pipeline stage and call", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.chunk_latency = Histogram(
            "coverwatch_chunk_to_decision_seconds", "From a chunk's arrival to the end of its processing (decisions included)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.capture_latency = Histogram(
            "coverwatch_capture_to_decision_seconds", "From a Kafka chunk's capture timestamp to the end of its processing",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decisions = Counter("coverwatch_decisions_total", "Hop decisions taken", registry=r)
        self.matches = Counter("coverwatch_match_events_total", "Match events emitted", ["event"], registry=r)
        self.active_streams = Gauge("coverwatch_active_streams", "Streams with rolling state", registry=r)
        self.dead_letters = Counter("coverwatch_dead_letters_total", "Malformed chunks sent to the dead-letter topic", ["reason"], registry=r)
        self.sequence_gaps = Counter("coverwatch_sequence_gaps_total", "Chunks missing in a stream's sequence (each gap resets the stream)", registry=r)
        self.consumer_lag = Gauge("coverwatch_consumer_lag_messages", "High-water mark minus position", ["topic", "partition"], registry=r)
        self.kafka_errors = Counter("coverwatch_kafka_errors_total", "Kafka operations that failed (and were retried)", ["operation"], registry=r)
        self.events_pending = Gauge("coverwatch_events_pending", "Events waiting for broker acknowledgement", registry=r)
        self.index_songs = Gauge("coverwatch_index_songs", "Songs in the loaded index", registry=r)
        self.index_vectors = Gauge("coverwatch_index_vectors", "Vectors in the loaded index", registry=r)
        self.index_reloads = Counter("coverwatch_index_reloads_total", "SIGHUP index reloads", ["outcome"], registry=r)
        self.mic_overflows = Counter("coverwatch_mic_overflows_total", "Microphone blocks lost (PortAudio overflow or full queue)", registry=r)
        self.mic_up = Gauge("coverwatch_mic_up", "1 while the microphone delivers audio, 0 while it is lost (and before it opens)", registry=r)
        self.mic_reconnects = Counter("coverwatch_mic_reconnects_total", "Attempts to re-open a lost microphone", registry=r)
        self.sink_failures = Counter("coverwatch_sink_failures_total", "Event sink calls that failed (disk full, broker gone, ...)", ["sink", "action"], registry=r)
        self.model = Info("coverwatch_model", "The loaded model", registry=r)
        for outcome in CHUNK_OUTCOMES:
            self.chunks.labels(outcome)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        # Exported at 0 from the start, so "no plays for hours" is a query on a real series.
        for kind in EVENT_KINDS:
            self.matches.labels(kind)
        self.index_reloads.labels("ok")
        self.index_reloads.labels("failed")

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def set_model(self, model_hash: str, embedding_dim: int, n_bins: int) -> None:
        self.model.info({"hash": model_hash, "embedding_dim": str(embedding_dim), "cqt_bins": str(n_bins)})

    def set_index(self, songs: int, vectors: int) -> None:
        self.index_songs.set(songs)
        self.index_vectors.set(vectors)

    def count_events(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            self.matches.labels(kind).inc()

    def serve(self, address: str, port: int) -> object | None:
        """Start the /metrics HTTP server on a daemon thread; returns the server (or None if port 0).

        Raises MetricsPortError naming the address when it cannot listen (port taken, no permission)."""
        if port == 0:
            return None
        try:
            server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(
                exc.errno,
                f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}; another process may hold the port "
                "(set [metrics] port or --metrics-port, or 0 to turn metrics off)",
            ) from None
        log.info("metrics on http://%s:%d/metrics", address, server.server_port)
        return server
