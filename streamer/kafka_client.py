"""Settings every Kafka client of the daemon shares (the audio consumer, the event and
dead-letter producers, checkpoints, `coverwatch publish`): TLS/SASL from [kafka], producer
settings that are acknowledged, ordered and bounded in time, and a watchdog-friendly wait
for acknowledgements."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from kafka.errors import KafkaTimeoutError

from coverwatch.streamer.config import KafkaConfig
from coverwatch.streamer.sources.wire import MAX_VALUE_BYTES

log = logging.getLogger(__name__)

WAIT_STEP_S = 1.0  # longest wait without a watchdog ping
PROBE_TIMEOUT_S = 1.0  # one TCP connection attempt to a bootstrap server
PROBE_PAUSE_S = 1.0  # between rounds of attempts (a stop request is seen within this)
LINGER_MS = 5
REQUEST_OVERHEAD_BYTES = 64 * 1024  # record and request framing around the largest chunk


class DeliveryAborted(RuntimeError):
    """Events could not be delivered before the caller gave up (shutdown deadline)."""


class NoBrokerError(OSError):
    """No bootstrap server accepted a connection within [kafka] connect_timeout_s."""


def bootstrap_addresses(servers: str) -> list[tuple[str, int]]:
    """"host:port,[v6]:port,host" -> [(host, port)] (Kafka's default port 9092 where none is given)."""
    addresses = []
    for entry in (e.strip() for e in servers.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or "]" in port:  # no port (a bare host or [v6])
            host, port = entry, "9092"
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def wait_for_broker(cfg: KafkaConfig, should_stop: Callable[[], bool], keepalive: Callable[[], None] = lambda: None) -> bool:
    """Wait until a bootstrap server accepts TCP connections: True when one does, False when
    `should_stop()` says to give up first, NoBrokerError after `connect_timeout_s`.

    The Kafka clients' own start-up bootstrap blocks for 30 s without a way to interrupt it
    and logs every refused connection as an error; this probe keeps SIGTERM prompt and says
    once, plainly, what is missing."""
    addresses = bootstrap_addresses(cfg.bootstrap_servers)
    deadline = time.monotonic() + cfg.connect_timeout_s
    reason, warned = "", False
    while True:
        for host, port in addresses:
            try:
                with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                    if warned:
                        log.info("Kafka broker %s:%d is reachable", host, port)
                    return True
            except OSError as exc:
                reason = f"{host}:{port}: {exc.strerror or exc}"
        if not warned:
            log.warning("no Kafka broker reachable (%s); waiting up to %.0f s", reason, cfg.connect_timeout_s)
            warned = True
        keepalive()
        stop_by = min(deadline, time.monotonic() + PROBE_PAUSE_S)
        while time.monotonic() < stop_by:
            if should_stop():
                return False
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            raise NoBrokerError(
                f"no Kafka broker reachable at {cfg.bootstrap_servers} within {cfg.connect_timeout_s:g} s ({reason}); "
                "check [kafka] bootstrap_servers and that the broker runs"
            )


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
