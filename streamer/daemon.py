"""`coverwatch serve`: the daemon's lifecycle.

Start order: model -> index (checked against the model) -> monitor -> sinks -> source; stop in
reverse in one `finally`. SIGINT/SIGTERM only set a flag (the source stops after its
current block, open matches are closed, sinks flushed); a second SIGINT forces the exit.
"""

from __future__ import annotations

import logging
import signal
import time
from enum import IntEnum
from pathlib import Path

from index_builder.store import load_index
from streamer.artifacts import resolve_model_dir
from streamer.config import Config
from streamer.embedder import Embedder
from streamer.events import MatchEvent
from streamer.pipeline import ChunkError, Monitor
from streamer.sinks import FanOut, FileSink, StdoutSink
from streamer.sources import parse_source

log = logging.getLogger(__name__)


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a runtime error (bad file, broken artefact, source failure)
    USAGE = 2  # bad command line or config
    INTERRUPTED = 130


def build_sinks(cfg: Config) -> FanOut:
    sinks = []
    if cfg.sinks.stdout:
        sinks.append(StdoutSink())
    if cfg.sinks.file:
        sinks.append(FileSink(Path(cfg.sinks.file)))
    return FanOut(sinks)


class Server:
    """Holds the running pieces so that signal handlers and `finally` can reach them."""

    def __init__(self, cfg: Config, source_spec: str, fast: bool, stream_id: str | None = None) -> None:
        self.cfg = cfg
        self.embedder = Embedder(resolve_model_dir(cfg.model.path), cfg.model.threads)
        if not cfg.index.path:
            raise ValueError("no index configured: set [index] path in the config or pass --index")
        self.index = load_index(Path(cfg.index.path), expected_model_hash=self.embedder.info.model_hash)
        log.info(
            "index %s: %d songs, %d vectors, model %s", cfg.index.path, len(self.index.songs), self.index.n_vectors, self.index.model_hash
        )
        self.monitor = Monitor(self.embedder, self.index, cfg.stream, cfg.decision)
        self.source = parse_source(source_spec, mic=cfg.mic, block_s=cfg.stream.chunk_s, fast=fast, stream_id=stream_id)
        self.sinks = build_sinks(cfg)
        self.audio_s = 0.0
        self._interrupts = 0

    def _emit(self, events: list[MatchEvent]) -> None:
        for event in events:
            self.sinks.add(event)
        if events:
            self.sinks.flush()

    def handle_chunk(self, stream_id: str, samples, sample_rate: int) -> None:
        try:
            events = self.monitor.process_chunk(stream_id, samples, sample_rate)
        except ChunkError as exc:
            self.monitor.counts["bad_chunks"] += 1
            log.warning("skipped chunk: %s", exc)
            return
        self.audio_s += len(samples) / sample_rate
        self._emit(events)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._interrupts += 1
        if self._interrupts > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("received %s: draining", signal.Signals(signum).name)
        self.source.stop()

    def run(self) -> ExitCode:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.perf_counter()
        try:
            self.source.run(self.handle_chunk)
        finally:
            for stream_id in list(self.monitor.streams):
                self._emit(self.monitor.end_stream(stream_id))
            self.sinks.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
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
