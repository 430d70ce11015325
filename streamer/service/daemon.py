"""`coverwatch serve`: the daemon's lifecycle.

Start order: metrics -> model -> index (checked against the model) -> monitor -> sinks ->
source, then READY to systemd; stop in reverse in one `finally`. Signals only set flags that
the processing loop reads between chunks:

    SIGTERM / SIGINT  drain: finish the chunk in hand, deliver its events, commit, exit 0;
                      if events cannot be delivered within `service.drain_timeout_s`, exit
                      without committing (the chunks are re-read on restart). A second
                      SIGINT forces the exit.
    SIGHUP            reload the index from `[index] path` and swap it in between two chunks
                      (no audio is dropped: Kafka and the microphone queue buffer meanwhile);
                      a broken index is refused and the old one kept.

The loop pings the systemd watchdog, so a loop stuck for `WatchdogSec` gets restarted.
"""

from __future__ import annotations

import logging
import signal
import time
from enum import IntEnum
from pathlib import Path

import faiss

from coverwatch.streamer.config import Config
from coverwatch.streamer.embed.artifacts import ArtifactError, resolve_model_dir
from coverwatch.streamer.embed.embedder import Embedder
from coverwatch.streamer.search.shards import open_catalog
from coverwatch.streamer.service.metrics import Metrics
from coverwatch.streamer.service.notify import SystemdNotifier
from coverwatch.streamer.service.pipeline import ChunkError, Monitor
from coverwatch.streamer.sinks.events import MatchEvent
from coverwatch.streamer.sinks.kafka import KafkaEventSink
from coverwatch.streamer.sinks.local import FanOut, FileSink, StdoutSink
from coverwatch.streamer.sources.local import MicSource, parse_source
from coverwatch.streamer.sources.wire import AudioChunk

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a runtime error (bad file, broken artefact, source failure)
    USAGE = 2  # bad command line or config
    INTERRUPTED = 130


class Server:
    """Holds the running pieces so that signal handlers, the source and `finally` can reach them."""

    def __init__(self, cfg: Config, source_spec: str, fast: bool, stream_id: str | None = None) -> None:
        self.cfg = cfg
        self.notifier = SystemdNotifier.from_env()
        self.metrics = Metrics()
        self.metrics_server = None  # started by run(), so a failed start-up binds no port
        self.embedder = Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)
        self.metrics.set_model(self.embedder.info.model_hash, self.embedder.info.embedding_dim, self.embedder.info.n_bins)
        if not cfg.index.path:
            raise ValueError("no index configured: set [index] path in the config or pass --index")
        self.index = self._load_index()
        self.monitor = Monitor(self.embedder, self.index, cfg.stream, cfg.decision, self.metrics, batch_size=cfg.model.batch_size)
        faiss.omp_set_num_threads(cfg.index.threads)
        self.is_kafka = source_spec == "kafka"
        if self.is_kafka:
            from coverwatch.streamer.sources.kafka import KafkaSource

            self.source = KafkaSource(cfg.kafka, self.monitor.replay_horizon_s(), self.metrics)
        else:
            self.source = parse_source(source_spec, mic=cfg.mic, block_s=cfg.stream.chunk_s, fast=fast, stream_id=stream_id, metrics=self.metrics)
        self.sinks = self._build_sinks()
        self.audio_s = 0.0
        self._interrupts = 0
        self._reload_requested = False
        self._drain_deadline: float | None = None
        self._mic_lost = 0
        self._in_flight: list[tuple[float, float]] = []  # live Kafka chunks queued: (perf_counter at submit, capture end s)

    # -- set-up -------------------------------------------------------------------------
    def _load_index(self):
        index = open_catalog(Path(self.cfg.index.path), expected_model_hash=self.embedder.info.model_hash)  # a folder, or a sharded catalog file
        log.info("index %s: %d songs, %d vectors, model %s", self.cfg.index.path, len(index.songs), index.n_vectors, index.model_hash)
        return index

    def _build_sinks(self) -> FanOut:
        sinks = []
        if self.cfg.sinks.stdout:
            sinks.append(StdoutSink())
        if self.cfg.sinks.file:
            sinks.append(FileSink(Path(self.cfg.sinks.file)))
        if (self.is_kafka or self.cfg.sinks.kafka) and self.cfg.kafka.events_topic:
            sinks.append(KafkaEventSink(self.cfg.kafka, self.metrics, keepalive=self.tick, should_abort=self._past_drain_deadline))
        return FanOut(sinks, on_failure=lambda sink, action: self.metrics.sink_failures.labels(sink, action).inc())

    # -- what the sources drive -----------------------------------------------------------
    def _emit(self, events: list[MatchEvent]) -> None:
        for event in events:
            self.sinks.add(event)
        self.metrics.count_events(e.event for e in events)

    def _take_outbox(self, tagged: list[tuple[object, MatchEvent]]) -> None:
        """Emit the monitor's events tagged live; the queued chunks' decisions are now taken."""
        self._emit([event for emit, event in tagged if emit])
        now_perf, now_wall = time.perf_counter(), time.time()
        for submitted, capture_end_s in self._in_flight:
            self.metrics.chunk_latency.observe(now_perf - submitted)
            self.metrics.capture_latency.observe(max(0.0, now_wall - capture_end_s))
        self._in_flight.clear()

    def _count_audio(self, samples, sample_rate: int) -> None:
        seconds = len(samples) / sample_rate
        self.audio_s += seconds
        self.metrics.audio_seconds.inc(seconds)

    def process(self, chunk: AudioChunk, emit: bool) -> None:
        """Queue one Kafka chunk (its decisions are taken in the batch's `deliver`); raises
        ChunkError for a chunk that must be skipped."""
        started = time.perf_counter()
        self.monitor.submit(chunk.stream_id, chunk.samples, chunk.sample_rate, chunk.capture_ts_ms / 1000, tag=emit)
        self._count_audio(chunk.samples, chunk.sample_rate)
        if emit:
            self._in_flight.append((started, chunk.capture_ts_ms / 1000 + chunk.duration_s))

    def end_stream(self, stream_id: str, emit: bool) -> None:
        self._take_outbox(self.monitor.end_stream(stream_id, tag=emit))

    def open_match(self, stream_id: str) -> tuple[str, float] | None:
        return self.monitor.open_match(stream_id)

    def restore_match(self, stream_id: str, song_id: str | None, started_s: float) -> None:
        self.monitor.restore_match(stream_id, song_id, started_s)

    def deliver(self) -> bool:
        """Take the queued decisions, then flush every sink; True when all of them took every
        event (Kafka: acknowledged)."""
        self._take_outbox(self.monitor.flush())
        return self.sinks.flush()

    def tick(self) -> None:
        """Called between chunks: watchdog, reload requests, microphone losses."""
        self.notifier.watchdog()
        if self._reload_requested:
            self._reload_requested = False
            self._reload_index()
        if isinstance(self.source, MicSource):
            lost = self.source.overflows + self.source.dropped_blocks
            if lost > self._mic_lost:
                self.metrics.mic_overflows.inc(lost - self._mic_lost)
                self._mic_lost = lost

    def handle_chunk(self, stream_id: str, samples, sample_rate: int) -> None:
        """One block from a file or microphone source."""
        started = time.perf_counter()
        try:
            events = self.monitor.process_chunk(stream_id, samples, sample_rate)
            self._count_audio(samples, sample_rate)
        except ChunkError as exc:
            self.monitor.counts["bad_chunks"] += 1
            self.metrics.chunks.labels("bad_chunk").inc()
            log.warning("skipped chunk: %s", exc)
            return
        self.metrics.chunks.labels("processed").inc()
        self._emit(events)
        if events:
            self.deliver()
        self.metrics.chunk_latency.observe(time.perf_counter() - started)
        self.tick()

    # -- signals --------------------------------------------------------------------------
    def _reload_index(self) -> None:
        self.notifier.reloading("reloading the index")
        try:
            previous = self.monitor.index
            self.monitor.replace_index(self._load_index())
            if hasattr(previous, "close"):  # a sharded catalog's connections
                previous.close()
            self.metrics.index_reloads.labels("ok").inc()
        except (ArtifactError, OSError, ValueError) as exc:
            self.metrics.index_reloads.labels("failed").inc()
            log.error("index reload refused, keeping the loaded index: %s", exc)
        self.notifier.ready(self._status())

    def _past_drain_deadline(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading the index between chunks")
            self._reload_requested = True
            return
        self._interrupts += 1
        if self._interrupts > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("received %s: draining (at most %.0f s)", signal.Signals(signum).name, self.cfg.service.drain_timeout_s)
        self._drain_deadline = time.monotonic() + self.cfg.service.drain_timeout_s
        self.notifier.stopping("draining")
        self.source.stop()

    def _status(self) -> str:
        return f"{len(self.monitor.index.songs)} songs indexed; {len(self.monitor.streams)} streams"

    # -- run ------------------------------------------------------------------------------
    def run(self) -> ExitCode:
        # First, so that a taken port fails the start (MetricsPortError, exit 1) before any handler is installed.
        self.metrics_server = self.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        started = time.perf_counter()
        self.notifier.ready(self._status())
        try:
            self.source.run(self if self.is_kafka else self.handle_chunk)
        finally:
            if not self.is_kafka:  # a file or microphone stream ends here; a Kafka stream lives on
                for stream_id in list(self.monitor.streams):
                    self.end_stream(stream_id, emit=True)
            self.sinks.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            self.notifier.close()
            elapsed = time.perf_counter() - started
            log.info(
                "served %.1f s of audio in %.1f s (%.1fx real time); chunks=%d bad_chunks=%d decisions=%d matches=%d stages=%s",
                self.audio_s,
                elapsed,
                self.audio_s / max(elapsed, 1e-9),
                self.monitor.counts["chunks"],
                self.monitor.counts["bad_chunks"],
                self.monitor.counts["decisions"],
                self.monitor.counts["match_start"],
                {k: round(v, 2) for k, v in self.monitor.times.seconds.items()},
            )
        return ExitCode.OK  # a drained stop after SIGTERM/SIGINT is a clean exit
