"""Settings every Kafka client of the daemon shares (the audio consumer, the event and
dead-letter producers, checkpoints, `coverwatch publish`): TLS/SASL from [kafka], producer
settings that are acknowledged, ordered and bounded in time, and a watchdog-friendly wait
for acknowledgements."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from kafka.errors import KafkaTimeoutError

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.sources.wire import MAX_VALUE_BYTES

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
