"""Match events to a Kafka topic: key = stream id, value = the event's JSON, acks=all.

`flush` returns only once the broker has acknowledged every event added so far. While the
broker is unreachable it retries with doubling back-off (capped by
`kafka.retry_backoff_max_s`) and keeps the events in memory, so the daemon's loop, which
calls `flush` before committing any offset, stops consuming: back-pressure instead of
loss. `should_abort()` (a drain deadline) is the only way out without delivery, and then
nothing is committed, so the chunks are re-read after the restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.kafka_client import DeliveryAborted, producer_settings, wait_acknowledged
from coverwatch.streamer.service.metrics import Metrics
from coverwatch.streamer.sinks.events import MatchEvent

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.25


class KafkaEventSink:
    def __init__(
        self,
        cfg: KafkaConfig,
        metrics: Metrics | None = None,
        keepalive: Callable[[], None] = lambda: None,
        should_abort: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.keepalive = keepalive
        self.should_abort = should_abort
        self.pending: list[MatchEvent] = []
        self._producer: KafkaProducer | None = None

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**producer_settings(self.cfg, "events"))
        return self._producer

    def add(self, event: MatchEvent) -> None:
        self.pending.append(event)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.events_pending.set(len(self.pending))

    def _send_pending(self) -> None:
        """One attempt: send everything pending, wait for acks, keep only what failed."""
        producer = self._connect()
        futures = [
            (event, producer.send(self.cfg.events_topic, key=event.stream.encode(), value=event.to_json().encode(), headers=[("event_id", event.event_id.encode())]))
            for event in self.pending
        ]
        failed, first_error = [], None
        for event, future in futures:
            try:
                wait_acknowledged([future], self.cfg.send_timeout_s, self.keepalive, self.should_abort)
            except KafkaError as exc:
                failed.append(event)
                first_error = first_error or exc
        self.pending = failed
        if first_error is not None:
            raise KafkaError(f"{len(failed)} event(s) not acknowledged: {first_error!r}")

    def flush(self) -> None:
        backoff = FIRST_BACKOFF_S
        while self.pending:
            try:
                self._send_pending()
            except KafkaError as exc:
                if self.metrics:
                    self.metrics.kafka_errors.labels("produce_event").inc()
                log.warning("event delivery failed (%d pending, retry in %.2f s): %s", len(self.pending), backoff, exc)
                self._wait(backoff)
                backoff = min(2 * backoff, self.cfg.retry_backoff_max_s)
            finally:
                self._gauge()

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.keepalive()
            if self.should_abort():
                raise DeliveryAborted(f"{len(self.pending)} event(s) not delivered to {self.cfg.events_topic}")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._producer is not None:
                self._producer.close(timeout=self.cfg.send_timeout_s)
