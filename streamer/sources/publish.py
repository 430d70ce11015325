"""`coverwatch publish`: the reference capture client that sends live audio to Kafka.

A source (`file:PATH` or `mic[:DEVICE]`, see `coverwatch.streamer.sources.local`) delivers blocks; each block
becomes one message in the wire format of `coverwatch.streamer.sources.wire` (key = stream id, PCM value,
encoding / sample_rate / channels / seq / capture_ts headers) and is sent with a producer
that keeps a stream's chunks in order: acks="all", retries, one request in flight per
connection, and a bounded number of unacknowledged chunks (back-pressure instead of an
unbounded in-memory backlog while the broker is slow).

capture_ts is the wall-clock time (ms) of a block's first sample. For files it is the start
time plus the audio already sent, so timestamps stay consistent at any pace (`--fast`); for
a microphone it is the block's arrival time minus its duration.

    source = parse_source("file:song.wav", mic=cfg.mic, block_s=0.5, fast=True, stream_id="s1")
    stats = publish(source, "s1", "coverwatch.audio", cfg.kafka)

Broker trouble (unreachable bootstrap, no acknowledgement within the timeouts) is raised
as `PublishError` with a one-line message naming the broker, topic and cause.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.kafka_client import producer_settings
from coverwatch.streamer.sources.local import MicSource
from coverwatch.streamer.sources.wire import (
    ENCODINGS,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    STREAM_ID_PATTERN,
    encode_chunk,
)

log = logging.getLogger(__name__)

MAX_PENDING_CHUNKS = 500  # unacknowledged chunks before send() waits for the oldest one


class PublishError(RuntimeError):
    """The chunks could not be delivered (broker unreachable, timed out or refusing)."""


class Source(Protocol):
    def run(self, handler) -> None: ...

    def stop(self) -> None: ...


@dataclass
class PublishStats:
    """What one `publish` call sent; bytes counts PCM payload (message values) only."""

    chunks: int = 0
    frames: int = 0
    audio_s: float = 0.0
    bytes: int = 0
    elapsed_s: float = 0.0
    first_seq: int = 0
    next_seq: int = 0  # the seq the next chunk of this stream would get (for --start-seq on resume)
    interrupted: bool = False  # stopped by Ctrl-C rather than the end of the source

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.chunks} chunks (seq {self.first_seq}..{self.next_seq - 1}), {self.audio_s:.1f} s of audio, "
            f"{self.bytes / 1e6:.2f} MB in {self.elapsed_s:.2f} s ({self.chunks_per_s:.0f} chunks/s, "
            f"{self.megabytes_per_s:.2f} MB/s)"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return " ".join(text.split())


class ChunkProducer:
    """A KafkaProducer for audio chunks of one topic; errors surface as PublishError."""

    def __init__(self, kafka: KafkaConfig, topic: str, max_pending: int = MAX_PENDING_CHUNKS) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        self.topic, self.bootstrap, self.max_pending = topic, kafka.bootstrap_servers, max_pending
        self.settings = producer_settings(kafka, "publish")
        # A future resolves (acknowledged or expired) within the delivery timeout; wait a bit longer.
        self._wait_s = (self.settings["delivery_timeout_ms"] + self.settings["request_timeout_ms"]) / 1000 + 1.0
        self._pending: collections.deque = collections.deque()
        try:
            self._producer = KafkaProducer(**self.settings)
        except KafkaError as exc:
            raise self._error("cannot connect", exc) from exc

    def _error(self, what: str, exc: BaseException) -> PublishError:
        return PublishError(f"{what} to Kafka at {self.bootstrap} (topic {self.topic}): {_describe(exc)}")

    def send(self, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Queue one message; waits for the oldest unacknowledged ones beyond max_pending."""
        from kafka.errors import KafkaError

        self._reap()
        while len(self._pending) >= self.max_pending:
            self._wait(self._pending.popleft())
        try:
            self._pending.append(self._producer.send(self.topic, key=key, value=value, headers=headers))
        except KafkaError as exc:
            raise self._error("cannot send", exc) from exc

    def _reap(self) -> None:
        """Drop acknowledged futures from the front; raise for a failed one."""
        while self._pending and self._pending[0].is_done:
            self._wait(self._pending.popleft())

    def _wait(self, future) -> None:
        from kafka.errors import KafkaError

        try:
            future.get(timeout=self._wait_s)
        except KafkaError as exc:
            raise self._error("delivery failed", exc) from exc

    def flush(self) -> None:
        """Block until every queued message is acknowledged; PublishError otherwise."""
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=self._wait_s)
        except KafkaError as exc:
            raise self._error("flush failed", exc) from exc
        while self._pending:
            self._wait(self._pending.popleft())

    def close(self, timeout_s: float = 5.0) -> None:
        """Close after delivering what is queued (up to timeout_s); force-closes otherwise."""
        from kafka.errors import KafkaError

        try:
            self._producer.close(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("Kafka producer did not close cleanly (%s); dropping undelivered chunks", _describe(exc))
            self.abort()

    def abort(self) -> None:
        """Close at once, dropping undelivered messages (after an error)."""
        # kafka-python 3.0's close() raises from its internal flush *before* force-closing the
        # sender thread, which then retries forever and __del__ fails again; finish the job
        # here (private attributes, guarded).
        sender = getattr(self._producer, "_sender", None)
        if sender is not None and sender.is_alive():
            sender.force_close()
            sender.join(timeout=2.0)
        if hasattr(self._producer, "_unregister_cleanup"):
            self._producer._unregister_cleanup()
        self._producer._closed = True


class CaptureClock:
    """capture_ts (ms) of each block's first sample.

    Files: start time + audio sent so far, consistent at any pace. Microphones: arrival time
    minus the block's duration (blocks arrive when their last sample was captured).
    """

    def __init__(self, live: bool) -> None:
        self.live = live
        self.start_s: float | None = None
        self.sent_s = 0.0

    def stamp(self, frames: int, sample_rate: int) -> int:
        now = time.time()
        duration = frames / sample_rate
        if self.live:
            return round((now - duration) * 1000)
        if self.start_s is None:
            self.start_s = now
        ts = self.start_s + self.sent_s
        self.sent_s += duration
        return round(ts * 1000)


def _check_block(samples: np.ndarray, sample_rate: int, kafka: KafkaConfig) -> None:
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise PublishError(f"sample rate {sample_rate} Hz is outside the wire format's [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
    if not 1 <= channels <= MAX_CHANNELS:
        raise PublishError(f"{channels} channels; the wire format allows 1..{MAX_CHANNELS}")
    if len(samples) > kafka.max_chunk_s * sample_rate:
        raise PublishError(
            f"{len(samples) / sample_rate:.2f} s chunks exceed kafka.max_chunk_s = {kafka.max_chunk_s:g} s; use a shorter --chunk-s"
        )


def _finite(samples: np.ndarray, seq: int) -> np.ndarray:
    """NaN -> 0 and +-inf -> +-1 (the consumer would refuse the chunk, s16le would turn NaN into 0 silently)."""
    if np.isfinite(samples).all():
        return samples
    log.warning("chunk %d has NaN or infinite samples; replaced by 0 / +-1", seq)
    return np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)


def publish(source: Source, stream_id: str, topic: str, kafka: KafkaConfig, encoding: str = "s16le", start_seq: int = 0) -> PublishStats:
    """Send every block of `source` to `topic` as chunks of stream `stream_id`; flush and return stats.

    The message key is `stream_id` (the source's own stream id is not used); seq counts up from
    `start_seq`. Empty blocks are skipped.

    Ctrl-C (KeyboardInterrupt) stops the source, flushes what was sent and returns with
    `interrupted` set. Raises PublishError for broker trouble or audio the wire format cannot
    carry, ValueError for a bad stream id, encoding or start_seq.
    """
    if not STREAM_ID_PATTERN.fullmatch(stream_id):
        raise ValueError(f"stream id {stream_id!r} must match {STREAM_ID_PATTERN.pattern}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    if start_seq < 0:
        raise ValueError(f"start_seq must be >= 0, got {start_seq}")
    stats = PublishStats(first_seq=start_seq, next_seq=start_seq)
    clock = CaptureClock(live=isinstance(source, MicSource))
    producer = ChunkProducer(kafka, topic)
    log.info("publishing stream %s to %s at %s (%s)", stream_id, topic, kafka.bootstrap_servers, encoding)

    def handle(_source_stream: str, samples: np.ndarray, sample_rate: int) -> None:
        if not len(samples):
            return
        _check_block(samples, sample_rate, kafka)
        samples = _finite(samples, stats.next_seq)
        capture_ts = clock.stamp(len(samples), sample_rate)
        key, value, headers = encode_chunk(stream_id, samples, sample_rate, stats.next_seq, capture_ts, encoding)
        producer.send(key, value, headers)
        stats.chunks += 1
        stats.next_seq += 1
        stats.frames += len(samples)
        stats.audio_s += len(samples) / sample_rate
        stats.bytes += len(value)

    started = time.monotonic()
    try:
        try:
            source.run(handle)
        except KeyboardInterrupt:
            source.stop()
            stats.interrupted = True
            log.info("interrupted; flushing %d chunk(s) sent so far", stats.chunks)
        producer.flush()
    except BaseException:
        source.stop()
        producer.abort()
        raise
    producer.close()
    stats.elapsed_s = time.monotonic() - started
    log.info("published %s", stats.summary())
    return stats


__all__ = ["ChunkProducer", "PublishError", "PublishStats", "publish"]
