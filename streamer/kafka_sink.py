"""Match events to a Kafka topic: key = stream id, value = the event's JSON, acks=all.

`flush` returns only once the broker has acknowledged every event added so far. While the
broker is unreachable it retries with doubling back-off (capped by
`kafka.retry_backoff_max_s`) and keeps the events in memory, so the daemon's loop, which
calls `flush` before committing any offset, stops consuming: back-pressure instead of
loss. `should_abort()` (a drain deadline) is the only way out without delivery, and then
nothing is committed, so the chunks are re-read after the restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from streamer.config import KafkaConfig
from streamer.events import MatchEvent
from streamer.metrics import Metrics
from streamer.wire import MAX_VALUE_BYTES

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.25
WAIT_STEP_S = 1.0  # longest wait without a watchdog ping
LINGER_MS = 5
REQUEST_OVERHEAD_BYTES = 64 * 1024  # record and request framing around the largest chunk


class DeliveryAborted(RuntimeError):
    """Events could not be delivered before the caller gave up (shutdown deadline)."""


class SecretError(ValueError):
    """The Kafka password file or environment variable named in the config cannot be read."""


def read_kafka_password(cfg: KafkaConfig) -> str:
    """The SASL password from `sasl_password_file` (trailing newline stripped) or the
    environment variable named by `sasl_password_env`; never logged, never kept in the config."""
    if cfg.sasl_password_file:
        try:
            return Path(cfg.sasl_password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"kafka.sasl_password_file {cfg.sasl_password_file!r}: cannot read it ({exc.strerror})") from None
    if cfg.sasl_password_env not in os.environ:
        raise SecretError(f"kafka.sasl_password_env: environment variable {cfg.sasl_password_env!r} is not set")
    return os.environ[cfg.sasl_password_env]


def security_settings(cfg: KafkaConfig) -> dict:
    """TLS and SASL settings for every Kafka client (producers and consumers), from [kafka]."""
    settings: dict = {"security_protocol": cfg.security_protocol}
    if cfg.security_protocol.endswith("SSL"):
        settings.update(ssl_check_hostname=True, ssl_cafile=cfg.ssl_cafile or None, ssl_certfile=cfg.ssl_certfile or None, ssl_keyfile=cfg.ssl_keyfile or None)
    if cfg.security_protocol.startswith("SASL_"):
        settings.update(sasl_mechanism=cfg.sasl_mechanism, sasl_plain_username=cfg.sasl_plain_username, sasl_plain_password=read_kafka_password(cfg))
    return settings


def producer_settings(cfg: KafkaConfig, role: str) -> dict:
    """Settings for every producer (events, dead letters, publish): acks=all, ordered, bounded in time."""
    timeout_ms = max(100, int(cfg.send_timeout_s * 1000))
    return {
        "bootstrap_servers": cfg.brokers,
        "client_id": f"{cfg.client_id}-{role}",
        "acks": "all",
        "linger_ms": LINGER_MS,
        "retries": 2**31 - 1,  # bounded in time by delivery_timeout_ms, not by count
        "max_in_flight_requests_per_connection": 1,  # no reordering when a request is retried
        # Not idempotent: kafka-python 3.0's idempotent producer never re-acquires its producer
        # id after a batch expires during an outage, and then sends nothing. A retry may thus
        # duplicate a message; chunks carry seq numbers and events deterministic ids.
        "enable_idempotence": False,
        "request_timeout_ms": timeout_ms,
        "delivery_timeout_ms": 3 * timeout_ms + LINGER_MS,
        "max_block_ms": timeout_ms,
        "bootstrap_timeout_ms": timeout_ms,
        "reconnect_backoff_max_ms": max(50, int(cfg.retry_backoff_max_s * 1000)),
        "max_request_size": MAX_VALUE_BYTES + REQUEST_OVERHEAD_BYTES,
        **security_settings(cfg),
    }


def wait_acknowledged(futures: list, send_timeout_s: float, keepalive: Callable[[], None], should_abort: Callable[[], bool] = lambda: False) -> None:
    """Wait for produce futures in steps of at most WAIT_STEP_S, calling `keepalive` between
    steps (the systemd watchdog must not starve on a slow broker). Raises the first send
    error, KafkaTimeoutError past the producer's delivery timeout, DeliveryAborted on abort."""
    deadline = time.monotonic() + 3 * send_timeout_s + 1  # the delivery timeout of producer_settings
    for future in futures:
        while not future.is_done:
            keepalive()
            if should_abort():
                raise DeliveryAborted("delivery abandoned: shutdown deadline")
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"no acknowledgement within {3 * send_timeout_s + 1:.0f} s")
            with contextlib.suppress(KafkaTimeoutError):
                future.get(timeout=WAIT_STEP_S)
        future.get(timeout=0)  # raises the send error, if any


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
